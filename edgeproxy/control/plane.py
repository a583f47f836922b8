"""The control plane, once per proxy: providers -> watcher -> table, active health and ACME;
with several workers it publishes each table (and ACME answers and certificates) to them over a
Unix socket, and collects their status for the admin API.

Wire format on the socket: a 4-byte big-endian length, then a pickled tuple. The socket lives in
a private directory (mode 0700) made by the supervisor; only processes of the same user, forked
from that supervisor, can reach it, which is what makes unpickling its messages acceptable.

Control plane -> worker:
    ("table", generation, RouteTable, sent_at)     on connect, then on every swap
    ("challenge", token, key_authorization|None)   ACME HTTP-01 answers to serve (None: drop)
    ("cert", names, cert_pem, key_pem)              a certificate ACME obtained
Worker -> control plane:
    ("status", WorkerStatus)                        about once a second and after each table
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import struct
import time
from collections.abc import Callable, Mapping
from typing import Any

from edgeproxy.clients.session import make_session
from edgeproxy.control.acme import AcmeManager
from edgeproxy.control.health import HealthMonitor
from edgeproxy.control.providers.docker import DiscoveryStatus, DockerProvider
from edgeproxy.control.providers.files import FileProvider
from edgeproxy.control.providers.swarm import SwarmProvider, start_swarm
from edgeproxy.control.watcher import SwarmAwareWatcher, Watcher
from edgeproxy.core.logs import get_logger
from edgeproxy.core.settings import Settings
from edgeproxy.core.tls import CertStore
from edgeproxy.routes.table import RouteTable
from edgeproxy.telemetry.dataview import WorkerReports, WorkerStatus
from edgeproxy.telemetry.metrics import Metrics

STARTUP_GRACE = 5.0
"""Seconds a first start waits for Docker's first list before publishing the table it has: a
proxy whose Docker is down still serves its routes file. A restarted control plane never
publishes before Docker answers (the workers keep the last table meanwhile)."""

STATUS_INTERVAL = 1.0
"""Seconds between a worker's status reports."""

_HEADER = struct.Struct(">I")
_MAX_MESSAGE = 256 * 1024 * 1024  # a table of many thousand routes is a few MB


class ControlChannelError(ConnectionError):
    """The control socket carried something that is not one of our messages."""


def encode(message: tuple[Any, ...]) -> bytes:
    """One framed message."""
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


async def read_message(reader: asyncio.StreamReader) -> tuple[Any, ...]:
    """The next framed message; raises asyncio.IncompleteReadError at EOF."""
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if size > _MAX_MESSAGE:
        raise ControlChannelError(f"control message of {size} bytes; expected at most "
                                  f"{_MAX_MESSAGE}")
    message = pickle.loads(await reader.readexactly(size))  # noqa: S301 - private 0700 socket
    if not isinstance(message, tuple) or not message:
        raise ControlChannelError(f"control message {type(message).__name__}; expected a tuple")
    return message


def acme_hosts(table: RouteTable) -> frozenset[str]:
    """Hosts of every route with gateway.tls=acme: the certificates to keep."""
    return frozenset(h for r in table.routes if r.spec.tls == "acme" for h in r.spec.hosts)


def make_cert_store(settings: Settings) -> CertStore:
    """Certificates from the settings' files (raises CertError naming the bad file)."""
    store = CertStore(settings.tls_certs_dir, settings.tls_cert, settings.tls_key)
    store.load()
    return store


class Publisher:
    """The control socket's server side: replays the current state to a worker that connects,
    then broadcasts every change to all of them."""

    def __init__(self, path: str, reports: WorkerReports) -> None:
        self.path = path
        self.reports = reports
        self.generation = 0
        self._table: bytes | None = None  # the framed current table, once ready
        self._challenges: dict[str, str] = {}
        self._certs: dict[tuple[str, ...], bytes] = {}
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.AbstractServer | None = None
        self._log = get_logger("control")
        self.listening_workers: set[int] = set()
        self.on_worker_listening: Callable[[int], None] | None = None

    async def start(self) -> None:
        """Listen on the socket (replacing a stale one left by a killed control plane)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._server = await asyncio.start_unix_server(self._serve, path=self.path)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        """Stop listening and drop every worker connection."""
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    def publish(self, table: RouteTable) -> None:
        """A new table: framed once, written to every worker."""
        self.generation += 1
        self._table = encode(("table", self.generation, table, time.time()))
        self._broadcast(self._table)

    def challenge(self, token: str, answer: str | None) -> None:
        """An ACME HTTP-01 token to answer (or, with None, to forget)."""
        if answer is None:
            self._challenges.pop(token, None)
        else:
            self._challenges[token] = answer
        self._broadcast(encode(("challenge", token, answer)))

    def certificate(self, names: tuple[str, ...], cert_pem: bytes, key_pem: bytes) -> None:
        """A certificate ACME obtained: every worker serves it too."""
        frame = encode(("cert", names, cert_pem, key_pem))
        self._certs[names] = frame
        self._broadcast(frame)

    def _broadcast(self, frame: bytes) -> None:
        for w in list(self._writers):
            if w.is_closing():
                self._writers.discard(w)
                continue
            w.write(frame)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for frame in self._certs.values():
            writer.write(frame)
        for token, answer in self._challenges.items():
            writer.write(encode(("challenge", token, answer)))
        if self._table is not None:
            writer.write(self._table)
        self._writers.add(writer)
        who: WorkerStatus | None = None
        try:
            while True:
                message = await read_message(reader)
                if message[0] == "status" and isinstance(message[1], WorkerStatus):
                    who = message[1]
                    self.reports.report(who)
                    if who.listening and who.worker not in self.listening_workers:
                        self.listening_workers.add(who.worker)
                        if self.on_worker_listening is not None:
                            self.on_worker_listening(who.worker)
                # A bounded buffer: a worker that stops reading must not grow our memory.
                if writer.transport.get_write_buffer_size() > _MAX_MESSAGE:
                    raise ControlChannelError("worker does not read its control messages")
        except (asyncio.IncompleteReadError, ConnectionError, ControlChannelError,
                pickle.UnpicklingError, EOFError) as exc:
            if not isinstance(exc, asyncio.IncompleteReadError):
                self._log.warning("control_worker_dropped", error=f"{type(exc).__name__}: {exc}")
        finally:
            self._writers.discard(writer)
            if who is not None:
                self.reports.gone(who.worker, who.pid)
            writer.close()


class ControlPlane:
    """Discovery (Docker, routes file) into the Watcher, active health checks, ACME.

    `publisher` is None when the control plane shares the only worker's process: that worker
    reads `watcher.table` directly."""

    def __init__(self, settings: Settings, metrics: Metrics,
                 publisher: Publisher | None = None, restarted: bool = False) -> None:
        self.settings = settings
        self.metrics = metrics
        self.publisher = publisher
        self.restarted = restarted
        swarm_on = settings.docker and settings.swarm != "false"
        self.watcher: Watcher = (SwarmAwareWatcher if swarm_on else Watcher)(settings)
        self._swarm: SwarmProvider | None = None
        self.store: CertStore | None = None
        self.acme: AcmeManager | None = None
        self.ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._docker: DockerProvider | None = None
        self._monitor: HealthMonitor | None = None
        self._log = get_logger("control")

    def discovery(self) -> DiscoveryStatus | None:
        """The Docker provider's status (None: discovery is off), for /healthz."""
        return self._docker.status if self._docker is not None else None

    async def start(self) -> None:
        """Load the routes file, start the providers, the prober and ACME; returns at once."""
        settings, watcher, metrics = self.settings, self.watcher, self.metrics
        loop = asyncio.get_running_loop()
        self._session = make_session(settings)
        watcher.on_swap.append(lambda _: metrics.table_swaps.inc())
        watcher.on_event_lag = metrics.docker_event_lag.observe
        self._monitor = HealthMonitor(self._session, watcher.set_active_health)
        watcher.on_swap.append(self._monitor.reconcile)
        self._tasks.append(asyncio.create_task(watcher.run(), name="watcher"))
        if settings.tls_listen is not None:
            store = self.store = make_cert_store(settings)
            acme = self.acme = AcmeManager(
                settings.acme_directory, settings.acme_email, settings.state_dir, store,
                renew_before_days=settings.acme_renew_before / 86400,
                verify_ssl=str(settings.acme_ca_bundle) if settings.acme_ca_bundle else True)
            if self.publisher is not None:
                publisher = self.publisher
                acme.on_certificate = publisher.certificate

                def on_challenge(token: str, answer: str | None) -> None:
                    # From ACME's ordering thread: hand over to the event loop.
                    loop.call_soon_threadsafe(publisher.challenge, token, answer)

                acme.on_challenge = on_challenge
            watcher.on_swap.append(lambda table: acme.ensure_soon(acme_hosts(table)))
            self._tasks.append(asyncio.create_task(store.watch(settings.tls_reload),
                                                   name="certs"))
            self._tasks.append(asyncio.create_task(acme.run(), name="acme"))
        if settings.routes_file is not None:
            files = FileProvider(watcher, settings.routes_file, settings.routes_file_poll)
            files.load_once()
            watcher.rebuild_now()
            self._tasks.append(asyncio.create_task(files.run(), name="routes-file"))
        if settings.docker:
            self._docker = DockerProvider(watcher, loop,
                                          backoff_max=settings.docker_backoff_max,
                                          events_idle=settings.docker_events_idle)
            self._docker.on_reconnect = metrics.docker_reconnects.inc
            self._docker.start()
        if isinstance(watcher, SwarmAwareWatcher):
            aware = watcher

            def remember(containers: Mapping[str, str]) -> None:
                aware.task_of = dict(containers)  # one reference swap, read on the loop

            self._swarm = start_swarm(watcher, loop, settings, remember)
        if self.publisher is None:
            self.ready.set()
        else:
            self._tasks.append(asyncio.create_task(self._publish_when_synced(self.publisher),
                                                   name="publish"))

    async def _publish_when_synced(self, publisher: Publisher) -> None:
        """Publish the first table once it holds Docker's list, then every swap."""
        watcher = self.watcher
        deadline = None if self.restarted else time.monotonic() + STARTUP_GRACE
        while self.settings.docker and watcher.docker_connected is not True:
            if deadline is not None and time.monotonic() > deadline:
                self._log.warning("control_publishing_without_docker",
                                  waited_s=STARTUP_GRACE)
                break
            await asyncio.sleep(0.01)
        # The resync was posted before the connection flag: build from it now rather than
        # wait for the watcher's turn.
        watcher.rebuild_now()
        # First of the swap listeners: the workers' copy should not wait for logs or probes.
        watcher.on_swap.insert(0, publisher.publish)
        publisher.publish(watcher.table)
        self.ready.set()
        self._log.info("control_publishing", routes=len(watcher.table.routes),
                       docker=watcher.docker_connected, restarted=self.restarted)

    async def close(self) -> None:
        """Stop providers, probes, ACME and every task."""
        if self._docker is not None:
            self._docker.stop()
        if self._swarm is not None:
            self._swarm.stop()
        if self._monitor is not None:
            await self._monitor.close()
        if self.acme is not None:
            await self.acme.close()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        with contextlib.suppress(AttributeError):
            await self._session.close()
