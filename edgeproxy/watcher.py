"""Holds observations, coalesces changes, builds a new table and swaps it in atomically."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Iterable

from edgeproxy.logs import get_logger
from edgeproxy.model import Container, Route
from edgeproxy.settings import Settings
from edgeproxy.table import FileRoute, RouteTable, build_table


class Watcher:
    """The single owner of the live RouteTable; providers report, the watcher rebuilds."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.table = RouteTable()
        self.swaps = 0
        self.last_swap = 0.0
        self.docker_connected: bool | None = None if settings.docker else False
        self._containers: dict[str, Container] = {}
        self._stopping: set[str] = set()
        self._file_routes: tuple[FileRoute, ...] = ()
        self._dirty = asyncio.Event()
        self._urgent = asyncio.Event()
        self._log = get_logger("watcher")
        self._warned: set[tuple[str, str]] = set()
        self.changed = asyncio.Condition()

    # --- provider inputs (called on the event loop) -----------------------------------------

    def resync(self, containers: Iterable[Container]) -> None:
        """Replace every Docker observation with a fresh list."""
        self._containers = {c.id: c for c in containers}
        # A start may have been missed while disconnected; a stale mark would drain forever.
        self._stopping.clear()
        self._mark()

    def update(self, container: Container) -> None:
        """One container changed (from an inspect after an event)."""
        self._containers[container.id] = container
        self._mark()

    def remove(self, container_id: str) -> None:
        """A container was destroyed."""
        self._containers.pop(container_id, None)
        self._stopping.discard(container_id)
        self._mark()

    def stopping(self, container_id: str) -> None:
        """A stop or kill arrived: take the replica out of rotation before it dies."""
        if container_id not in self._stopping:
            self._stopping.add(container_id)
            self._mark(urgent=True)

    def started(self, container_id: str) -> None:
        """A (re)start arrived: a previous stop no longer applies."""
        if container_id in self._stopping:
            self._stopping.discard(container_id)
            self._mark()

    def set_file_routes(self, routes: Iterable[FileRoute]) -> None:
        """Replace the routes that come from the routes file."""
        self._file_routes = tuple(routes)
        self._mark()

    def _mark(self, urgent: bool = False) -> None:
        self._dirty.set()
        if urgent:
            self._urgent.set()

    # --- building ---------------------------------------------------------------------------

    def build(self) -> RouteTable:
        """A table from the current observations (pure apart from reading them)."""
        containers = [
            dataclasses.replace(c, stopping=True) if c.id in self._stopping else c
            for c in self._containers.values()
        ]
        s = self.settings
        return build_table(containers, self._file_routes, label_prefix=s.label_prefix,
                           exposed_by_default=s.exposed_by_default, network=s.network)

    def rebuild_now(self) -> bool:
        """Build and swap if anything changed; True when a new table went in."""
        new = self.build()
        old = self.table
        self._report(new)
        if new == old:
            return False
        self.table = new
        self.swaps += 1
        self.last_swap = time.time()
        self._log_diff(old, new)
        return True

    async def run(self) -> None:
        """Coalesce bursts: at most one swap per debounce interval, newest state wins."""
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            self._urgent.clear()
            if self.rebuild_now():
                async with self.changed:
                    self.changed.notify_all()
            if self.settings.debounce:
                # A replica going away must not wait out the debounce: cut it short.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._urgent.wait(), self.settings.debounce)

    # --- logging ----------------------------------------------------------------------------

    def _report(self, table: RouteTable) -> None:
        for d in table.decisions:
            for err in d.errors:
                key = (d.container, str(err))
                if key not in self._warned:
                    self._warned.add(key)
                    self._log.warning("label_invalid", container=d.container, label=err.label,
                                      value=err.value, reason=err.reason)
        for c in table.conflicts:
            key = (c.container, c.reason)
            if key not in self._warned:
                self._warned.add(key)
                self._log.warning("route_conflict", container=c.container, reason=c.reason)
        if len(self._warned) > 10_000:
            self._warned.clear()

    def _log_diff(self, old: RouteTable, new: RouteTable) -> None:
        before = {r.name: r for r in old.routes}
        after = {r.name: r for r in new.routes}
        for name, r in after.items():
            prev = before.get(name)
            if prev is None:
                self._log.info("route_added", route=name, **_summary(r))
            elif prev != r:
                self._log.info("route_changed", route=name, **_summary(r))
        for name in before.keys() - after.keys():
            self._log.info("route_removed", route=name)


def _summary(r: Route) -> dict[str, object]:
    return {
        "hosts": list(r.spec.hosts) or None,
        "paths": list(r.spec.paths),
        "replicas": len(r.upstreams),
        "healthy": len(r.pool),
        "source": r.source,
    }
