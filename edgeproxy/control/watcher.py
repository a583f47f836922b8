"""Holds observations, coalesces changes, builds a new table and swaps it in atomically."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import time
from collections.abc import Callable, Iterable, Mapping

from edgeproxy.core.logs import get_logger
from edgeproxy.core.settings import Settings
from edgeproxy.routes.model import Container, Route, RouteSpec, Upstream
from edgeproxy.routes.table import FileRoute, RouteTable, build_table

# Longer than any sane stop timeout: a mark older than this on a running container is stale.
_STOP_MARK_TTL = 120.0


class Watcher:
    """The single owner of the live RouteTable; providers report, the watcher rebuilds."""

    def __init__(self, settings: Settings, quiet: bool = False) -> None:
        self.settings = settings
        # True in every worker but the first: they keep the same table without reporting it.
        self.quiet = quiet
        self.table = RouteTable()
        self.swaps = 0
        self.last_swap = 0.0
        # Per provider source: True/False once it has connected or failed, None before.
        self.sources_connected: dict[str, bool | None] = {"docker": None} if settings.docker else {}
        self._containers: dict[str, dict[str, Container]] = {}  # source -> id -> container
        self._stopping: dict[str, float] = {}  # container id -> when the stop/kill arrived
        self._file_routes: tuple[FileRoute, ...] = ()
        self._seen: dict[str, int] = {}
        self._seen_counter = itertools.count(1)
        self._failing: dict[str, str] = {}  # upstream key -> why its active check fails
        self._held: dict[RouteSpec, tuple[str, float]] = {}  # spec -> (name, monotonic deadline)
        self._live: tuple[Route, ...] = ()
        self.on_swap: list[Callable[[RouteTable], None]] = []
        self.on_event_lag: Callable[[float], None] | None = None
        # Recent route changes, newest last, for the dashboard and /routes.
        self.changes: collections.deque[dict[str, object]] = collections.deque(maxlen=100)
        self._dirty = asyncio.Event()
        self._urgent = asyncio.Event()
        # Extra workers keep the same table but don't repeat its lifecycle events.
        self._log = _Quiet() if quiet else get_logger("watcher")
        self._warned: set[tuple[str, str]] = set()
        self.changed = asyncio.Condition()

    # --- provider inputs: the providers.Observations interface, called on the event loop --

    @property
    def docker_connected(self) -> bool | None:
        """The Docker provider's connection: None while connecting, False when disabled."""
        if not self.settings.docker:
            return False
        return self.sources_connected.get("docker")

    def connected(self, up: bool, source: str = "docker") -> None:
        """A provider's connection came up or went down."""
        self.sources_connected[source] = up

    def observed_lag(self, seconds: float, source: str = "docker") -> None:
        """Event-to-observation lag of a provider (a metric)."""
        if self.on_event_lag is not None:
            self.on_event_lag(seconds)

    def _all_containers(self) -> dict[str, Container]:
        out: dict[str, Container] = {}
        for items in self._containers.values():
            out.update(items)
        return out

    def _stamp(self, c: Container) -> Container:
        """Keep the order in which containers were first seen (tie-break for conflicts)."""
        seen = self._seen.get(c.id)
        if seen is None:
            seen = self._seen[c.id] = next(self._seen_counter)
        return c if c.seen == seen else dataclasses.replace(c, seen=seen)

    def resync(self, containers: Iterable[Container], source: str = "docker") -> None:
        """Replace every observation of `source` with a fresh list (other sources stay)."""
        self._containers[source] = {c.id: self._stamp(c) for c in containers}
        known = self._all_containers()
        self._seen = {cid: n for cid, n in self._seen.items() if cid in known}
        # Keep a recent stop mark on a container that is still running (it may be mid graceful
        # stop); drop old ones: a start may have been missed while disconnected, and a stale
        # mark would drain the replica forever.
        now = time.monotonic()
        self._stopping = {cid: t for cid, t in self._stopping.items()
                          if cid in known and now - t < _STOP_MARK_TTL
                          and known[cid].state == "running"}
        self._mark()

    def update(self, container: Container, source: str = "docker") -> None:
        """One container of `source` changed (from an inspect after an event)."""
        self._containers.setdefault(source, {})[container.id] = self._stamp(container)
        self._mark()

    def remove(self, container_id: str, source: str = "docker") -> None:
        """A container of `source` was destroyed."""
        self._containers.get(source, {}).pop(container_id, None)
        self._seen.pop(container_id, None)
        self._stopping.pop(container_id, None)
        self._mark()

    def stopping(self, container_id: str) -> None:
        """A stop or kill arrived: take the replica out of rotation before it dies."""
        if container_id not in self._stopping:
            self._stopping[container_id] = time.monotonic()
            self._mark(urgent=True)

    def started(self, container_id: str) -> None:
        """A (re)start arrived: a previous stop no longer applies."""
        if self._stopping.pop(container_id, None) is not None:
            self._mark()

    def set_active_health(self, key: str, reason: str | None) -> None:
        """An active health check flipped: `reason` says why it fails, None means it passes."""
        if reason is None:
            if self._failing.pop(key, None) is not None:
                self._mark()
        elif key not in self._failing:
            self._failing[key] = reason
            self._mark(urgent=True)

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
        """A table from the current observations; vanished Docker routes are held for a while."""
        now = time.monotonic()
        self._held = {s: v for s, v in self._held.items() if v[1] > now}
        new = self._build_once()
        live = {r.spec for r in new.routes if r.source == "docker"}
        hold = self.settings.hold_period
        gone = [r for r in self._live if r.spec not in live and r.spec not in self._held]
        if gone and hold > 0:
            for r in gone:
                self._held[r.spec] = (r.name, now + hold)
                self._log.info("route_held", route=r.name, hold_s=hold)
            new = self._build_once()
        for spec in list(self._held):
            if spec in live:
                del self._held[spec]
        self._live = tuple(r for r in new.routes if r.source == "docker")
        return new

    def _build_once(self) -> RouteTable:
        containers = [
            dataclasses.replace(c, stopping=True) if c.id in self._stopping else c
            for c in self._all_containers().values()
        ]
        s = self.settings
        return build_table(containers, self._file_routes, label_prefix=s.label_prefix,
                           exposed_by_default=s.exposed_by_default, network=s.network,
                           failing=self._failing,
                           held=[(name, spec) for spec, (name, _) in self._held.items()])

    def next_expiry(self) -> float | None:
        """Seconds until the first held route expires, if any."""
        if not self._held:
            return None
        return max(0.0, min(until for _, until in self._held.values()) - time.monotonic())

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
        for callback in self.on_swap:
            try:
                callback(new)
            except Exception:  # noqa: BLE001 - one listener must not stop the others
                self._log.exception("swap_listener_failed")
        return True

    async def run(self) -> None:
        """Coalesce bursts: at most one swap per debounce interval, newest state wins."""
        while True:
            expiry = self.next_expiry()
            if expiry is None:
                await self._dirty.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._dirty.wait(), expiry + 0.01)
            self._dirty.clear()
            self._urgent.clear()
            try:
                swapped = self.rebuild_now()
            except Exception:  # noqa: BLE001 - keep serving the last table, keep watching
                self._log.exception("table_build_failed")
                swapped = False
            if swapped:
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
        now = time.time()
        for name, r in after.items():
            prev = before.get(name)
            if prev is None:
                self._log.info("route_added", route=name, **_summary(r))
                self.changes.append({"time": now, "event": "route_added", "route": name,
                                     **_summary(r), "what": describe_change(None, r)})
            elif prev != r:
                what = describe_change(prev, r)
                self._log.info("route_changed", route=name, what=what, **_summary(r))
                self.changes.append({"time": now, "event": "route_changed", "route": name,
                                     **_summary(r), "what": what})
        for name in sorted(before.keys() - after.keys()):
            self._log.info("route_removed", route=name)
            self.changes.append({"time": now, "event": "route_removed", "route": name,
                                 "what": describe_change(before[name], None)})


# RouteSpec fields as the labels name them (gateway.<key>), for change descriptions.
_SETTING_NAMES = {"hosts": "host", "paths": "path", "connect_timeout": "timeout.connect",
                  "read_timeout": "timeout.read", "request_headers": "request.headers",
                  "response_headers": "response.headers", "tls_verify": "tls.verify",
                  "tls_ca": "tls.ca", "tls_server_name": "tls.server_name",
                  "tls_redirect": "tls.redirect", "hsts": "tls.hsts",
                  "hsts_subdomains": "tls.hsts.subdomains", "health": "health.*",
                  "auth": "auth.*", "cors": "cors.*"}


def _setting_text(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple) and all(isinstance(v, str) for v in value):
        return ",".join(value) or "none"
    if isinstance(value, (str, int, float)):
        return f"{value:g}" if isinstance(value, float) else str(value)
    return ""  # a structured setting (health, auth, headers...): its name says enough


def _replica(u: Upstream) -> str:
    # A routes-file replica is named by its URL, which already holds the address.
    # A stopped container has no address: nothing to say where it is.
    return u.name if u.address in u.name or not u.host else f"{u.name} at {u.address}"


def describe_change(old: Route | None, new: Route | None) -> list[str]:
    """What changed between two versions of a route, one short line per difference: which
    replica (added, removed, its state, address or weight) and which setting."""
    if new is None:
        assert old is not None  # noqa: S101 - one side is always given
        return [f"last replica gone: {', '.join(u.name for u in old.upstreams) or 'none'}"
                if old.upstreams else "removed"]
    if old is None:
        return [f"replica {_replica(u)} ({u.state})" for u in new.upstreams]
    out: list[str] = []
    if old.source != new.source:
        out.append(f"source {old.source} -> {new.source}")
    for f in dataclasses.fields(new.spec):
        before, after = getattr(old.spec, f.name), getattr(new.spec, f.name)
        if before != after:
            name = _SETTING_NAMES.get(f.name, f.name)
            a, b = _setting_text(before), _setting_text(after)
            out.append(f"{name} {a} -> {b}" if a and b else f"{name} changed")
    was = {u.name: u for u in old.upstreams}
    now = {u.name: u for u in new.upstreams}
    for name, u in now.items():
        p = was.get(name)
        if p is None:
            out.append(f"replica {_replica(u)} added ({u.state})")
            continue
        if p.state != u.state:
            out.append(f"replica {name} {p.state} -> {u.state}"
                       + (f" ({u.reason})" if u.reason else ""))
        elif p.reason != u.reason and u.reason:
            out.append(f"replica {name}: {u.reason}")
        if p.address != u.address and p.host and u.host:  # losing the address = stopping
            out.append(f"replica {name} moved {p.address} -> {u.address}")
        if p.weight != u.weight:
            out.append(f"replica {name} weight {p.weight} -> {u.weight}")
    for name in sorted(was.keys() - now.keys()):
        out.append(f"replica {name} removed")
    return out or ["changed"]


def _summary(r: Route) -> dict[str, object]:
    return {
        "hosts": list(r.spec.hosts) or None,
        "paths": list(r.spec.paths),
        "replicas": len(r.upstreams),
        "healthy": len(r.pool),
        "source": r.source,
    }


class _Quiet:
    """A logger that drops events (for workers other than the first)."""

    def _drop(self, *_: object, **__: object) -> None:
        return None

    info = warning = error = debug = exception = _drop


# Labels Docker puts on a Swarm task's container.
_TASK_LABEL = "com.docker.swarm.task.id"
_SERVICE_LABEL = "com.docker.swarm.service.id"


class SwarmAwareWatcher(Watcher):
    """The Watcher with what Swarm mode adds on the Docker side: once Swarm is on, task
    containers are dropped from the Docker source (a task is routed as a task, never twice),
    and a task container's stop or kill drains its task at once."""

    def __init__(self, settings: Settings, quiet: bool = False) -> None:
        super().__init__(settings, quiet)
        self.swarm_active = False
        self.task_of: Mapping[str, str] = {}  # container id -> task id, from the tasks list

    def _is_task(self, c: Container) -> bool:
        return self.swarm_active and (_TASK_LABEL in c.labels or _SERVICE_LABEL in c.labels)

    def resync(self, items: Iterable[Container], source: str = "docker") -> None:
        """Replace one source's observations; the Docker source without task containers."""
        if source == "swarm" and not self.swarm_active:
            self.swarm_active = True
            docker_items = list(self._containers.get("docker", {}).values())
            super().resync([c for c in docker_items if not self._is_task(c)], "docker")
        if source == "docker":
            items = [c for c in items if not self._is_task(c)]
        super().resync(items, source)

    def update(self, item: Container, source: str = "docker") -> None:
        """One observation changed; a task's container is the Swarm source's business."""
        if not (source == "docker" and self._is_task(item)):
            super().update(item, source)

    def stopping(self, item_id: str) -> None:
        """A stop or kill arrived: for a task's container, drain the task too."""
        super().stopping(item_id)
        task = self.task_of.get(item_id)
        if task is not None:
            super().stopping(task)
