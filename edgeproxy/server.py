"""Process lifecycle: listeners, providers, signals, graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
import uuid

import structlog
from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler

from edgeproxy.acme import AcmeManager
from edgeproxy.admin import make_admin_app
from edgeproxy.errors import error_response
from edgeproxy.forward import Proxy, make_session
from edgeproxy.health import HealthMonitor
from edgeproxy.logs import flush_access_log, get_logger
from edgeproxy.metrics import Metrics
from edgeproxy.policies.auth import JwtVerifier
from edgeproxy.policies.config import jwt_config, make_limiter
from edgeproxy.providers.docker import DockerProvider
from edgeproxy.providers.files import FileProvider
from edgeproxy.providers.swarm import SwarmAwareWatcher, start_swarm
from edgeproxy.settings import Address, Settings, unknown_settings
from edgeproxy.table import RouteTable
from edgeproxy.tls import CertStore
from edgeproxy.watcher import Watcher


def make_cert_store(settings: Settings) -> CertStore:
    """Certificates from the settings' files (raises CertError naming the bad file)."""
    store = CertStore(settings.tls_certs_dir, settings.tls_cert, settings.tls_key)
    store.load()
    return store


def acme_hosts(table: RouteTable) -> frozenset[str]:
    """Hosts of every route with gateway.tls=acme: the certificates to keep."""
    return frozenset(h for r in table.routes if r.spec.tls == "acme" for h in r.spec.hosts)


async def _flush_logs(interval: float = 0.1) -> None:
    while True:
        await asyncio.sleep(interval)
        flush_access_log()


class ListenError(RuntimeError):
    """A listener could not bind its address."""


class _ProxyRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering malformed requests with our JSON errors, and
    closing connections whose request head does not arrive in time (slowloris) with 408."""

    header_timeout = 30.0  # set per server from EDGEPROXY_HEADER_TIMEOUT
    _header_timer: asyncio.TimerHandle | None = None
    _armed_at_count = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_header_timer()  # a connection that sends nothing at all is slow too

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        super().data_received(data)
        if self._request_count > before:
            self._disarm_header_timer()  # a whole request head arrived
        elif self._header_timer is None and self._current_request is None and data:
            self._arm_header_timer()  # the first bytes of the next request head

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self.header_timeout > 0:
            self._armed_at_count = self._request_count
            self._header_timer = asyncio.get_running_loop().call_later(
                self.header_timeout, self._header_deadline)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_deadline(self) -> None:
        self._header_timer = None
        transport = self.transport
        if (self._request_count != self._armed_at_count or self._current_request is not None
                or transport is None or transport.is_closing()):
            return
        body = (b'{"error": {"status": 408, "code": "request_timeout", "message": '
                b'"the request head did not arrive in time", "request_id": null}}')
        transport.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                        b"Connection: close\r\nContent-Length: %d\r\n\r\n%b"
                        % (len(body), body))
        self.force_close()
        transport.close()

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if isinstance(exc, LineTooLong):
            status, code = 431, "header_too_large"
            text = "a request header line is too large"
        elif status == 400:
            code, text = "bad_request", f"malformed HTTP request: {getattr(exc, 'message', exc)}"
        else:
            return super().handle_error(request, status, exc, message)
        resp = error_response(status, code, text, uuid.uuid4().hex)
        resp.force_close()  # the stream can't be trusted after a framing error
        return resp


class ProxyServer(web.Server):
    """aiohttp's low-level server with our error answers for unparsable or slow requests."""

    header_timeout = 30.0

    def __call__(self) -> RequestHandler:
        handler = _ProxyRequestHandler(self, loop=self._loop, **self._kwargs)
        handler.header_timeout = self.header_timeout
        return handler


async def serve(settings: Settings, stop: asyncio.Event | None = None, worker: int = 0) -> None:
    """Run the proxy until SIGTERM/SIGINT (or `stop` is set), then drain and return.

    Worker 0 also serves the admin listener and logs route lifecycle events; other workers
    keep the same table quietly."""
    if settings.workers > 1:
        structlog.contextvars.bind_contextvars(worker=worker)
    log = get_logger("server")
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    for name in unknown_settings():
        log.warning("setting_unknown", variable=name)

    swarm_on = settings.docker and settings.swarm != "false"
    watcher = (SwarmAwareWatcher if swarm_on else Watcher)(settings, quiet=worker != 0)
    session = make_session(settings)
    metrics = Metrics(lambda: watcher.table)
    verifier = JwtVerifier(jwt_config(settings))
    limiter = make_limiter(settings)
    await verifier.start()
    await limiter.start()
    proxy = Proxy(settings, lambda: watcher.table, session, metrics=metrics, verifier=verifier,
                  limiter=limiter)
    watcher.on_swap.append(lambda _: metrics.table_swaps.inc())
    watcher.on_event_lag = metrics.docker_event_lag.observe
    monitor = HealthMonitor(session, watcher.set_active_health)
    watcher.on_swap.append(monitor.reconcile)
    warned_auth: set[str] = set()

    def warn_unprotectable(table: RouteTable) -> None:
        problem = verifier.problem
        if problem is None:
            return
        for r in table.routes:
            if r.spec.auth is not None and r.name not in warned_auth:
                warned_auth.add(r.name)
                log.error("route_auth_unavailable", route=r.name, answers=503, reason=problem)

    watcher.on_swap.append(warn_unprotectable)
    watcher.on_swap.append(
        lambda table: proxy.balancer.forget({u.key for r in table.routes for u in r.upstreams}))
    tasks: list[asyncio.Task[None]] = [asyncio.create_task(watcher.run(), name="watcher"),
                                       asyncio.create_task(_flush_logs(), name="log-flush")]

    store: CertStore | None = None
    acme: AcmeManager | None = None
    if settings.tls_listen is not None:
        store = make_cert_store(settings)
        acme = AcmeManager(
            settings.acme_directory, settings.acme_email, settings.state_dir, store,
            renew_before_days=settings.acme_renew_before / 86400,
            verify_ssl=str(settings.acme_ca_bundle) if settings.acme_ca_bundle else True)
        proxy.tls(store, acme)
        manager = acme
        watcher.on_swap.append(lambda table: manager.ensure_soon(acme_hosts(table)))
        tasks.append(asyncio.create_task(store.watch(settings.tls_reload), name="certs"))
        tasks.append(asyncio.create_task(acme.run(), name="acme"))

    files: FileProvider | None = None
    if settings.routes_file is not None:
        files = FileProvider(watcher, settings.routes_file, settings.routes_file_poll)
        files.load_once()
        watcher.rebuild_now()
        tasks.append(asyncio.create_task(files.run(), name="routes-file"))
    docker: DockerProvider | None = None
    if settings.docker:
        docker = DockerProvider(watcher, loop)
        docker.on_reconnect = metrics.docker_reconnects.inc
        docker.start()
    swarm = start_swarm(watcher, loop, settings)

    # auto_decompress=False: a gzip request body goes upstream as the client sent it.
    server = ProxyServer(proxy.handle, access_log=None, handler_cancellation=True,
                         auto_decompress=False, max_field_size=settings.max_header_size,
                         max_line_size=settings.max_header_size)
    server.header_timeout = settings.header_timeout
    runner = web.ServerRunner(server, handle_signals=False,
                              shutdown_timeout=settings.drain_timeout)
    admin_runner = web.AppRunner(make_admin_app(watcher, proxy),
                                 access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    await admin_runner.setup()
    listeners: list[tuple[web.BaseRunner, Address, ssl.SSLContext | None]] = [
        (runner, settings.listen, None)]
    if store is not None and settings.tls_listen is not None:
        listeners.append((runner, settings.tls_listen, store.context()))
    if worker == 0:
        listeners.append((admin_runner, settings.admin_listen, None))
    try:
        for r, addr, context in listeners:
            try:
                await web.TCPSite(r, addr.host, addr.port, backlog=1024, ssl_context=context,
                                  reuse_port=settings.workers > 1 or None).start()
            except OSError as exc:
                raise ListenError(f"cannot listen on {addr}: {exc.strerror or exc}") from None
        log.info("listening", proxy=str(settings.listen),
                 tls=str(settings.tls_listen) if settings.tls_listen else None,
                 admin=str(settings.admin_listen) if worker == 0 else None,
                 docker=settings.docker, routes_file=str(settings.routes_file or "") or None,
                 workers=settings.workers)
        await stop.wait()
        log.info("draining", in_flight=proxy.in_flight, timeout_s=settings.drain_timeout)
    finally:
        if docker is not None:
            docker.stop()
        if swarm is not None:
            swarm.stop()
        # Closes the listener first, then waits up to the drain timeout for in-flight requests.
        await runner.cleanup()
        await admin_runner.cleanup()
        await monitor.close()
        if acme is not None:
            await acme.close()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        proxy.close()
        flush_access_log()
        await session.close()
        await verifier.close()
        await limiter.close()
        log.info("stopped")
