"""Process lifecycle: listeners, providers, signals, graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
import time
import uuid
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler

from edgeproxy.acme import ChallengeBook
from edgeproxy.admin import make_admin_app
from edgeproxy.control import ControlPlane, Publisher, acme_hosts, make_cert_store
from edgeproxy.dataview import WorkerReports
from edgeproxy.errors import error_response
from edgeproxy.feed import TableFeed
from edgeproxy.forward import Proxy, make_session
from edgeproxy.logs import flush_access_log, get_logger
from edgeproxy.metrics import Metrics
from edgeproxy.policies.auth import JwtVerifier, jwt_config_problem
from edgeproxy.policies.config import jwt_config, make_limiter
from edgeproxy.settings import Address, Settings, unknown_settings
from edgeproxy.table import RouteTable
from edgeproxy.tls import CertStore

__all__ = ["ListenError", "acme_hosts", "make_cert_store", "serve", "serve_control"]

ADMIN_WAIT_FOR_WORKERS = 30.0
"""Seconds a first start holds the admin listener back until every worker listens: /healthz
answering means traffic is served. After that the admin listener opens regardless."""


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


async def serve(settings: Settings, stop: asyncio.Event | None = None, worker: int = 0,
                control_path: str | None = None) -> None:
    """Run one worker until SIGTERM/SIGINT (or `stop` is set), then drain and return.

    Without `control_path` the control plane (discovery, health checks, ACME) and the admin
    listener run in this process too: the single-process mode. With it, this worker holds the
    data plane only and gets its table from the control plane over that Unix socket; it does
    not listen before the first table arrived."""
    if settings.workers > 1:
        structlog.contextvars.bind_contextvars(worker=worker)
    log = get_logger("server")
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    if control_path is None:  # else the control plane warns, once
        for name in unknown_settings():
            log.warning("setting_unknown", variable=name)

    control: ControlPlane | None = None
    feed: TableFeed | None = None
    table: Callable[[], RouteTable] = RouteTable  # an empty one until a source is set up
    metrics = Metrics(lambda: table())
    if control_path is None:
        plane = control = ControlPlane(settings, metrics)

        def control_table() -> RouteTable:
            return plane.watcher.table

        table = control_table
    session = make_session(settings)
    verifier = JwtVerifier(jwt_config(settings))
    limiter = make_limiter(settings)
    await verifier.start()
    await limiter.start()
    proxy = Proxy(settings, lambda: table(), session, metrics=metrics, verifier=verifier,
                  limiter=limiter)
    warned_auth: set[str] = set()

    def warn_unprotectable(new: RouteTable) -> None:
        problem = verifier.problem
        if problem is None or worker != 0:
            return
        for r in new.routes:
            if r.spec.auth is not None and r.name not in warned_auth:
                warned_auth.add(r.name)
                log.error("route_auth_unavailable", route=r.name, answers=503, reason=problem)

    on_table: list[Callable[[RouteTable], None]] = [
        warn_unprotectable,
        lambda new: proxy.balancer.forget({u.key for r in new.routes for u in r.upstreams})]
    tasks: list[asyncio.Task[None]] = [asyncio.create_task(_flush_logs(), name="log-flush")]
    store: CertStore | None = None
    if control is not None:
        control.watcher.on_swap.extend(on_table)
        await control.start()
        store = control.store
        if store is not None and control.acme is not None:
            proxy.tls(store, control.acme)
    elif control_path is not None:
        if settings.tls_listen is not None:
            store = make_cert_store(settings)
            book = ChallengeBook(settings.state_dir)
            proxy.tls(store, book)
            tasks.append(asyncio.create_task(store.watch(settings.tls_reload), name="certs"))
        else:
            book = None

        def status() -> dict[str, Any]:
            now_m, now_w = time.monotonic(), time.time()
            return {
                "in_flight": proxy.in_flight,
                "inflight": dict(proxy.balancer.inflight),
                "ejected": {k: now_w + (until - now_m)
                            for k, until in proxy.balancer.ejected.items() if until > now_m},
                "jwks_error": verifier.jwks_error,
                "ratelimit_healthy": limiter.healthy,
                "ratelimit_error": limiter.last_error,
            }

        feed = TableFeed(control_path, worker, status, book, store)
        feed.on_table.extend(on_table)
        current = feed

        def feed_table() -> RouteTable:
            return current.table

        table = feed_table
        tasks.append(asyncio.create_task(feed.run(), name="feed"))
        # Serve the current table before accepting anything: a restarted worker never answers
        # 404 for a route the others serve.
        waiter = asyncio.create_task(feed.first.wait())
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({waiter, stopper}, timeout=1.0,
                                     return_when=asyncio.FIRST_COMPLETED)
        if not done:
            log.warning("control_waiting", path=control_path, pid=os.getpid())
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        stopper.cancel()

    # auto_decompress=False: a gzip request body goes upstream as the client sent it.
    server = ProxyServer(proxy.handle, access_log=None, handler_cancellation=True,
                         auto_decompress=False, max_field_size=settings.max_header_size,
                         max_line_size=settings.max_header_size)
    server.header_timeout = settings.header_timeout
    runner = web.ServerRunner(server, handle_signals=False,
                              shutdown_timeout=settings.drain_timeout)
    admin_runner: web.AppRunner | None = None
    if control is not None:
        admin_runner = web.AppRunner(make_admin_app(control.watcher, proxy),
                                     access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    listeners: list[tuple[web.BaseRunner, Address, ssl.SSLContext | None]] = [
        (runner, settings.listen, None)]
    if store is not None and settings.tls_listen is not None:
        listeners.append((runner, settings.tls_listen, store.context()))
    if admin_runner is not None:
        await admin_runner.setup()
        listeners.append((admin_runner, settings.admin_listen, None))
    try:
        if not stop.is_set():
            await _listen(listeners, settings)
            if feed is not None:
                feed.listening = True
                feed.report_now()
            log.info("listening", proxy=str(settings.listen), pid=os.getpid(),
                     tls=str(settings.tls_listen) if settings.tls_listen else None,
                     admin=str(settings.admin_listen) if admin_runner is not None else None,
                     docker=settings.docker, routes_file=str(settings.routes_file or "") or None,
                     workers=settings.workers,
                     table=feed.generation if feed is not None else None)
            await stop.wait()
        log.info("draining", in_flight=proxy.in_flight, timeout_s=settings.drain_timeout)
    finally:
        if control is not None:
            await control.close()
        # Closes the listener first, then waits up to the drain timeout for in-flight requests.
        await runner.cleanup()
        if admin_runner is not None:
            await admin_runner.cleanup()
        await _cancel(tasks)
        proxy.close()
        flush_access_log()
        await session.close()
        await verifier.close()
        await limiter.close()
        log.info("stopped")


async def serve_control(settings: Settings, control_path: str, restarted: bool = False,
                        stop: asyncio.Event | None = None) -> None:
    """Run the control plane of a multi-worker proxy: discovery, health checks, ACME, the
    table publisher on `control_path` and the admin listener, until SIGTERM/SIGINT."""
    structlog.contextvars.bind_contextvars(worker="control")
    log = get_logger("server")
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    for name in unknown_settings():
        log.warning("setting_unknown", variable=name)
    control: ControlPlane | None = None

    def live_table() -> RouteTable:
        return control.watcher.table if control is not None else RouteTable()

    def tls_status() -> dict[str, Any] | None:
        if control is None or control.store is None:
            return None
        acme = control.acme
        return {"certificates": [c.as_dict() for c in control.store.certificates()],
                "acme": acme.status() if acme is not None else []}

    metrics = Metrics(live_table)
    reports = WorkerReports(metrics, jwt_config_problem(jwt_config(settings)), tls_status)
    publisher = Publisher(control_path, reports)
    control = ControlPlane(settings, metrics, publisher, restarted=restarted)
    all_listening = asyncio.Event()
    publisher.on_worker_listening = lambda _: (
        all_listening.set() if len(publisher.listening_workers) >= settings.workers else None)
    await publisher.start()
    await control.start()
    admin_runner = web.AppRunner(make_admin_app(control.watcher, reports, reports),
                                 access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await admin_runner.setup()
    try:
        if not restarted:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ADMIN_WAIT_FOR_WORKERS):
                    waiter = asyncio.create_task(all_listening.wait())
                    stopper = asyncio.create_task(stop.wait())
                    try:
                        await asyncio.wait({waiter, stopper},
                                           return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        waiter.cancel()
                        stopper.cancel()
        if not stop.is_set():
            await _listen([(admin_runner, settings.admin_listen, None)], settings, reuse=False)
            log.info("control_listening", admin=str(settings.admin_listen),
                     socket=control_path, workers=settings.workers, restarted=restarted,
                     docker=settings.docker)
            await stop.wait()
    finally:
        await admin_runner.cleanup()
        await publisher.close()
        await control.close()
        flush_access_log()
        log.info("control_stopped")


async def _listen(listeners: list[tuple[web.BaseRunner, Address, ssl.SSLContext | None]],
                  settings: Settings, reuse: bool = True) -> None:
    for r, addr, context in listeners:
        try:
            await web.TCPSite(r, addr.host, addr.port, backlog=1024, ssl_context=context,
                              reuse_port=(reuse and settings.workers > 1) or None).start()
        except OSError as exc:
            raise ListenError(f"cannot listen on {addr}: {exc.strerror or exc}") from None


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await t
