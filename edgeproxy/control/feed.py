"""A worker's link to the control plane: tables, ACME answers and certificates in; status out.

The worker keeps the last table it received for as long as the control plane is away, and
reconnects with a short backoff; the control plane replays its current state on connect."""

from __future__ import annotations

import asyncio
import os
import pickle
import time
from collections.abc import Callable, Mapping
from typing import Any

from edgeproxy.control.acme import ChallengeBook
from edgeproxy.control.plane import STATUS_INTERVAL, ControlChannelError, encode, read_message
from edgeproxy.core.logs import get_logger
from edgeproxy.core.tls import CertError, CertStore
from edgeproxy.routes.table import RouteTable
from edgeproxy.telemetry.dataview import WorkerStatus

BACKOFF_MAX = 0.5
"""Longest wait between two attempts to reach the control plane (seconds)."""


class TableFeed:
    """Holds the table this worker serves; `first` is set once one arrived."""

    def __init__(self, path: str, worker: int,
                 status: Callable[[], Mapping[str, Any]],
                 challenges: ChallengeBook | None = None,
                 store: CertStore | None = None) -> None:
        self.path = path
        self.worker = worker
        self.table = RouteTable()
        self.generation = 0
        self.received_at = 0.0
        self.first = asyncio.Event()
        self.listening = False
        self.on_table: list[Callable[[RouteTable], None]] = []
        self._status = status
        self._challenges = challenges
        self._store = store
        self._writer: asyncio.StreamWriter | None = None
        self._log = get_logger("feed")

    def report_now(self) -> None:
        """Send this worker's status at once (after a table, after it starts listening)."""
        writer = self._writer
        if writer is None or writer.is_closing():
            return
        status = WorkerStatus(self.worker, os.getpid(), table=self.generation,
                              table_at=self.received_at, listening=self.listening,
                              **self._status())
        writer.write(encode(("status", status)))

    async def run(self) -> None:
        """Stay connected until cancelled."""
        backoff = 0.05
        lost_at: float | None = None
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(self.path)
            except OSError as exc:
                if lost_at is None:
                    lost_at = time.monotonic()
                    # At start the control plane may not listen yet: that is no news.
                    log = self._log.warning if self.generation else self._log.debug
                    log("control_unreachable", error=str(exc), serving_table=self.generation)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            backoff = 0.05
            if lost_at is not None and self.generation:
                self._log.info("control_reconnected",
                               after_s=round(time.monotonic() - lost_at, 3))
            lost_at = None
            self._writer = writer
            reporter = asyncio.create_task(self._report_loop(), name="feed-status")
            try:
                while True:
                    self._apply(await read_message(reader))
            except (asyncio.IncompleteReadError, ConnectionError, ControlChannelError,
                    pickle.UnpicklingError, EOFError) as exc:
                lost_at = time.monotonic()
                self._log.warning("control_lost", error=type(exc).__name__,
                                  serving_table=self.generation)
            finally:
                reporter.cancel()
                # gather: the reporter's own cancellation is returned, while a cancellation of
                # this task (shutdown) still propagates. Suppressing CancelledError here swallowed
                # a shutdown that arrived just after the control plane went away: the worker then
                # reconnected forever and never exited.
                await asyncio.gather(reporter, return_exceptions=True)
                self._writer = None
                writer.close()

    async def _report_loop(self) -> None:
        while True:
            self.report_now()
            await asyncio.sleep(STATUS_INTERVAL)

    def _apply(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "table":
            _, generation, table, sent = message
            if not isinstance(table, RouteTable):
                raise ControlChannelError(f"table message carries {type(table).__name__}")
            self.table = table
            self.generation = generation
            now = self.received_at = time.time()
            # `at` and `lag_ms` let bench/discovery.py measure how far apart workers swap.
            self._log.debug("table_received", generation=generation, routes=len(table.routes),
                            at=now, lag_ms=round((now - sent) * 1000, 3))
            self.first.set()
            for callback in self.on_table:
                try:
                    callback(table)
                except Exception:  # noqa: BLE001 - one listener must not stop the others
                    self._log.exception("table_listener_failed")
            self.report_now()
        elif kind == "challenge":
            if self._challenges is not None:
                self._challenges.put(message[1], message[2])
        elif kind == "cert":
            if self._store is not None:
                try:
                    self._store.add_certificate(message[1], message[2], message[3])
                except CertError as exc:
                    self._log.warning("acme_certificate_invalid", names=list(message[1]),
                                      error=exc.problem)
        else:
            raise ControlChannelError(f"unknown control message {kind!r}")
