"""Process lifecycle: listeners, providers, signals, graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import SERVER_SOFTWARE, RawRequestMessage
from aiohttp.http_exceptions import LineTooLong
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from edgeproxy.clients.session import make_session
from edgeproxy.control.acme import ChallengeBook
from edgeproxy.control.feed import TableFeed
from edgeproxy.control.plane import ControlPlane, Publisher, acme_hosts, make_cert_store
from edgeproxy.core.logs import flush_access_log, get_logger
from edgeproxy.core.settings import Address, Settings, unknown_settings
from edgeproxy.core.tls import CertStore, Edge
from edgeproxy.ops.admin import make_admin_app
from edgeproxy.policies.auth import JwtVerifier, jwt_config_problem
from edgeproxy.policies.config import jwt_config, make_limiter
from edgeproxy.proxy.errors import error_response
from edgeproxy.proxy.http1 import http1_handler
from edgeproxy.proxy.http2 import H2Front, H2Site, h2_front  # edgeproxy-h2
from edgeproxy.proxy.pipeline import BodyMalformed, Proxy
from edgeproxy.routes.table import RouteTable
from edgeproxy.telemetry.dataview import WorkerReports
from edgeproxy.telemetry.metrics import Metrics

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


# After an answer that closes the connection the proxy half-closes at once (the client reads
# the end of the answer and EOF), then discards what the client still sends for at most this
# long before closing: closing with unread bytes would reset the connection and could destroy
# the answer in flight. nginx's lingering close does the same (lingering_timeout 5s).
LINGER_SECONDS = 2.0

_HEAD_END = b"\r\n\r\n"
_HEAD_START_KEPT = 128
_EMPTY_LINE_START = (b"\r", b"\n")


class _HeadRefused(Exception):
    """A request head over one of the connection's limits, refused before it is parsed."""

    def __init__(self, status: int, code: str, text: str) -> None:
        super().__init__(text)
        self.status, self.code, self.text = status, code, text


GC_GEN0_THRESHOLD = 20_000
"""Allocations between two young-generation collections in a worker (CPython's default: 700)."""


def tune_gc() -> None:
    """Make the cyclic garbage collector cheap for a worker that is up and listening.

    Nearly everything a request allocates is freed by reference counting; what the collector
    finds is little (about 2,000 objects in 60,000 requests, mostly closed upstream connections).
    Yet at CPython's default threshold it ran a young collection every few requests and a full
    one, walking every object of the heap, every few seconds: measured, a fifth of a worker's
    CPU per request on the plain route. So: the heap built at start (modules, settings, the
    table) moves out of the collector's sight (gc.freeze), and young collections run every
    GC_GEN0_THRESHOLD allocations. Cyclic garbage still goes, only in larger batches."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])


def _says_close(resp: web.StreamResponse) -> bool:
    """Whether an answer ends its connection: aiohttp's own flag or a `Connection: close`."""
    if not resp.keep_alive:
        return True
    headers = resp.headers
    if not headers:  # an answer written in one piece by the pipeline keeps none here
        return False
    value = headers.get("Connection")
    if not value:
        return False
    return "close" in (token.strip().lower() for token in value.split(","))


class _ProxyRequestHandler(RequestHandler):
    """aiohttp's connection handler with the connection's own limits and timeouts.

    aiohttp's parser bounds single lines only and buffers a whole head before it says anything,
    so the bytes are measured here as they arrive, before the parser sees them: the input is
    cut where a head or a body ends (a head and a chunked body end right after CRLFCRLF, a
    sized body after its Content-Length) and each head's bytes and lines are counted against
    EDGEPROXY_MAX_HEADER_SIZE and EDGEPROXY_MAX_HEADERS. A connection is, in turn: idle (the
    keep-alive timeout closes it quietly), receiving a head (the header timeout, counted from
    its first byte or from when the connection became free, answers 408), or busy with a
    request. An answer that closes the connection ends reading at once."""

    header_timeout = 30.0  # these four are set per server from the settings
    max_head = 32 * 1024
    max_headers = 100
    max_target = 8 * 1024

    _header_timer: asyncio.TimerHandle | None = None
    _head_size = 0  # bytes of the head now arriving, 0 between heads
    _head_lines = 0  # line ends in it
    _head_start = b""  # its first bytes: a too long request target is 414, not 431
    _line1 = 0  # the length of its request line (so far)
    _carry = b""  # the last bytes fed, for a CRLFCRLF split across two reads
    _body: StreamReader | None = None  # the request body still arriving
    _body_left: int | None = None  # of a sized body, the bytes still due
    _finished = 0  # answers finished: fewer than _request_count means busy
    _done = False  # the connection answered its last: nothing more is read or served
    _lingering: asyncio.Transport | None = None
    _linger_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_header_timer()  # a connection that sends nothing at all is slow too

    def data_received(self, data: bytes) -> None:
        if self._done:
            return  # lingering after the last answer: discarded, never parsed
        if (self._head_size == 0 and self._body is None and not self._carry
                and data.find(_HEAD_END) == len(data) - 4 and len(data) <= self.max_head
                and data[:1] not in _EMPTY_LINE_START
                and data.count(b"\n") - 2 <= self.max_headers
                and not (self._upgraded or self._payload_parser is not None or self._close
                         or self._force_close or self._buffer_paused)):
            # The usual read: one whole head, within the limits, nothing after it. It is
            # parsed at once, so no header timer is armed for it (the cut below would find
            # the same single piece; this only skips its bookkeeping).
            self._head_start = data  # a too long target is told by it (no copy: reset below)
            before = self._request_count
            RequestHandler.data_received(self, data)
            if self._request_count != before:
                message, payload = self._messages[-1]
                if payload is EMPTY_PAYLOAD and message.__class__ is not _ErrInfo:
                    # A head without a body, parsed: the next head is measured from zero.
                    self._head_start = b""
                    if self._header_timer is not None:
                        self._disarm_header_timer()
                    return
                self._after_feed(message, payload)
            return
        pos = 0
        while pos < len(data) or not data:
            if (not data or self._upgraded or self._payload_parser is not None
                    or self._close or self._force_close or self._buffer_paused):
                # A WebSocket, a closing connection, b"" (aiohttp resuming its own buffer), or
                # aiohttp's queue of pipelined requests full (reading is paused; what is read
                # meanwhile is at most one read, parsed when the queue drains).
                self._feed(data[pos:])
                return
            if self._body is not None:
                if self._body_left is not None:
                    end = pos + self._body_left
                else:
                    end = self._after_head_end(data, pos)
                piece = data[pos:end]
                if self._body_left is not None:
                    self._body_left -= len(piece)
                else:
                    self._carry = (self._carry + piece)[-3:]
                self._feed(piece)
                if self._body is not None and (self._body_left == 0 or self._body.is_eof()):
                    self._body = self._body_left = None
                    self._carry = b""
            else:
                end = self._after_head_end(data, pos)
                piece = data[pos:end]
                refused = self._measure_head(piece, complete=end < len(data) or
                                             (self._carry + piece).endswith(_HEAD_END))
                if refused is not None:
                    self._refuse(refused)
                    return
                self._feed(piece)
            pos = end
            if self._done:
                return

    def _after_head_end(self, data: bytes, pos: int) -> int:
        """Where the input is cut: right after the next CRLFCRLF at or after pos, else its end."""
        if self._carry and pos == 0:
            joined = (self._carry + data[:3]).find(_HEAD_END)
            if joined >= 0:
                return joined + 4 - len(self._carry)
        found = data.find(_HEAD_END, pos)
        return len(data) if found < 0 else found + 4

    def _measure_head(self, piece: bytes, complete: bool) -> _HeadRefused | None:
        """Count a head's next bytes against the limits, before the parser buffers them."""
        if self._head_size == 0:
            # Empty lines before a request line are skipped (RFC 9112 2.2), by llhttp too:
            # they are not part of the head, and must not make a long target look like a
            # long header line.
            piece = piece.lstrip(b"\r\n")
            if not piece:
                return None
        size = self._head_size + len(piece)
        lines = self._head_lines + piece.count(b"\n")
        if len(self._head_start) < _HEAD_START_KEPT:
            self._head_start += piece[:_HEAD_START_KEPT - len(self._head_start)]
        if self._head_lines == 0:
            nl = piece.find(b"\n")
            self._line1 = size if nl < 0 else self._head_size + nl
        if size > self.max_head:
            if self._line1 > self.max_target:
                return _HeadRefused(414, "uri_too_long",
                                    f"the request target is longer than {self.max_target} bytes")
            return _HeadRefused(431, "header_too_large",
                                f"the request head is larger than {self.max_head} bytes")
        # Lines ended so far: the request line, each header, and the blank line once complete.
        if lines - 1 - complete > self.max_headers:
            return _HeadRefused(431, "header_too_large",
                                f"the request head has more than {self.max_headers} headers")
        started = self._head_size == 0 and size > 0
        self._head_size, self._head_lines = size, lines
        self._carry = (self._carry + piece)[-3:]
        if started and self._finished == self._request_count:
            self._arm_header_timer()  # the header timeout runs from a head's first byte
        return None

    def _feed(self, piece: bytes) -> None:
        before = self._request_count
        super().data_received(piece)
        if self._request_count == before or not self._messages:
            return
        message, payload = self._messages[-1]
        self._after_feed(message, payload)

    def _after_feed(self, message: Any, payload: StreamReader) -> None:
        # A head ended (the input is cut there): measure the next one from zero.
        if isinstance(message, _ErrInfo) and isinstance(message.exc, LineTooLong):
            self._target_too_long = self._is_target(message.exc)
        self._head_size = self._head_lines = 0
        self._head_start = self._carry = b""
        self._disarm_header_timer()
        if isinstance(message, _ErrInfo):
            self._done = True  # the parser can't be trusted past an error; nothing more is read
            if self._body is not None:
                # It failed inside a request's body (a bad chunk size): llhttp drops that body
                # without a word, so its reader would wait for the replica's read timeout.
                if self._finished < self._request_count - 1:
                    # Still being served: the handler learns now; its 400 closes.
                    self._body.set_exception(BodyMalformed(message.message))
                else:
                    # Already answered, aiohttp only discards the rest: that ends here, and
                    # the 400 queued behind it answers and closes.
                    self._body.feed_eof()
                self._body = self._body_left = None
        elif not payload.is_eof():
            self._body = payload
            length = message.headers.get("Content-Length")
            # What the parser already took from its own buffer (it buffers when its queue
            # is full) is not due any more.
            self._body_left = (int(length) - payload.total_bytes
                               if length is not None and not message.chunked else None)

    _target_too_long = False

    def _is_target(self, exc: LineTooLong) -> bool:
        """Whether the parser's too-long line is the request target (414) or a header (431)."""
        line = exc.args[0] if exc.args else b""
        if isinstance(line, str):
            line = line.encode("latin-1", "replace")
        prefix = bytes(line).removesuffix(b"...")
        rest = self._head_start.partition(b" ")[2]
        n = min(len(prefix), len(rest))
        return n > 0 and rest[:n] == prefix[:n]

    def _refuse(self, exc: _HeadRefused) -> None:
        """Queue a refusal of the head now arriving, behind any request still being answered,
        and read nothing more from the connection."""
        self._done = True
        self._disarm_header_timer()
        self._head_size = 0
        self._messages.append((_ErrInfo(status=exc.status, exc=exc, message=exc.text),
                               EMPTY_PAYLOAD))
        self._request_count += 1
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def log_access(self, request: web.BaseRequest, resp: web.StreamResponse,
                   start_time: float | None) -> None:
        # aiohttp's finish_response calls this last, once the answer is written (or the
        # client is gone): a plain call, where an async finish_response override costs a
        # coroutine per request. aiohttp's own access logger is off (access_log=None).
        self._finished += 1
        # A body found malformed while it was answered without reading it (a 401, say):
        # aiohttp would read on to discard it and log the error as unhandled. Close instead.
        # (_done is set wherever a body is found malformed: most answers skip the lookup.)
        if _says_close(resp) or (self._done
                                 and isinstance(request.content.exception(), BodyMalformed)):
            self._close_after_answer()
        elif self._finished == self._request_count and self._head_size > 0:
            self._arm_header_timer()  # a head that began while the connection was busy

    def _close_after_answer(self) -> None:
        """End the connection right after its last answer: FIN at once, nothing more parsed."""
        self._done = True
        self._disarm_header_timer()
        transport = self.transport  # (under uvloop not an asyncio.Transport, but alike)
        self.transport = None  # aiohttp's loop must neither close it early nor write to it
        self.force_close()
        if transport is None or transport.is_closing():
            return
        if not transport.can_write_eof():
            transport.close()  # TLS: close_notify, then close
            return
        transport.write_eof()  # sent after whatever is still buffered: the answer
        with contextlib.suppress(RuntimeError):
            transport.resume_reading()  # keep draining, so closing later resets nothing
        self._lingering = transport
        self._linger_timer = asyncio.get_running_loop().call_later(LINGER_SECONDS,
                                                                   transport.close)

    def force_close(self) -> None:
        super().force_close()
        if self._lingering is not None:
            self._lingering.close()

    def eof_received(self) -> None:
        if self._lingering is not None:
            self._lingering.close()  # the client is done too

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm_header_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        self._lingering = None
        super().connection_lost(exc)

    def _process_keepalive(self) -> None:
        if self._done or (self._head_size > 0 and self.header_timeout > 0):
            # A head is arriving: the header timeout governs it, not the idle timeout (unless
            # it is off). The handle is cleared so aiohttp arms a fresh one after the answer.
            self._keepalive_handle = None
            return
        super()._process_keepalive()

    def _arm_header_timer(self) -> None:
        if self.header_timeout > 0 and self._header_timer is None:
            self._header_timer = asyncio.get_running_loop().call_later(
                self.header_timeout, self._header_deadline)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_deadline(self) -> None:
        self._header_timer = None
        transport = self.transport
        if (self._done or self._finished < self._request_count
                or transport is None or transport.is_closing()):
            return
        body = (b'{"error": {"status": 408, "code": "request_timeout", "message": '
                b'"the request head did not arrive in time", "request_id": null}}')
        transport.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                        b"Connection: close\r\nContent-Length: %d\r\n\r\n%b"
                        % (len(body), body))
        self._close_after_answer()

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if isinstance(exc, _HeadRefused):
            status, code, text = exc.status, exc.code, exc.text
        elif isinstance(exc, LineTooLong) and self._target_too_long:
            status, code = 414, "uri_too_long"
            text = f"the request target is longer than {self.max_target} bytes"
        elif isinstance(exc, LineTooLong):
            status, code = 431, "header_too_large"
            text = f"a request header is larger than {self.max_head} bytes"
        elif status == 400:
            code, text = "bad_request", f"malformed HTTP request: {getattr(exc, 'message', exc)}"
        else:
            return super().handle_error(request, status, exc, message)
        resp = error_response(status, code, text, uuid.uuid4().hex, {"Connection": "close"})
        resp.force_close()  # the stream can't be trusted after a framing error
        return resp


class _ProxyRequest(web.BaseRequest):
    """A request whose answers carry no `Server` of ours (aiohttp adds its name and version)."""

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        # aiohttp ran headers.setdefault(SERVER, SERVER_SOFTWARE) just before this hook: the
        # very same str object means it is aiohttp's; a replica's Server is another object.
        if response.headers.get(hdrs.SERVER) is SERVER_SOFTWARE:
            del response.headers[hdrs.SERVER]


class ProxyServer(web.Server):
    """aiohttp's low-level server with the connection limits and timeouts of the settings and
    our error answers for unparsable, oversized or slow requests."""

    header_timeout = 30.0
    max_head = 32 * 1024
    max_headers = 100
    max_target = 8 * 1024

    @classmethod
    def from_settings(cls, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
                      settings: Settings) -> ProxyServer:
        """The proxy listener's server: limits, timeouts, and aiohttp's own knobs set to match."""
        # auto_decompress=False: a gzip request body goes upstream as the client sent it.
        # keepalive_timeout: the low-level Server's RequestHandler defaults to 3630s (only
        # web.run_app passes 75s), which kept idle client connections for an hour.
        # The parser's own limits are backstops behind the byte counting of the handler; its
        # line limit applies to the request target only.
        server = cls(handler, access_log=None, handler_cancellation=True,
                     auto_decompress=False, keepalive_timeout=settings.keepalive_timeout,
                     max_line_size=settings.max_uri_size,
                     max_field_size=settings.max_header_size,
                     max_headers=settings.max_headers + 1)
        server.header_timeout = settings.header_timeout
        server.max_head = settings.max_header_size
        server.max_headers = settings.max_headers
        server.max_target = settings.max_uri_size
        return server

    def _make_request(self, message: RawRequestMessage, payload: StreamReader,
                      protocol: RequestHandler, writer: AbstractStreamWriter,
                      task: asyncio.Task[None]) -> web.BaseRequest:
        return _ProxyRequest(message, payload, protocol, writer, task, self._loop)

    def __call__(self) -> RequestHandler:
        handler = _ProxyRequestHandler(self, loop=self._loop, **self._kwargs)
        handler.header_timeout = self.header_timeout
        handler.max_head = self.max_head
        handler.max_headers = self.max_headers
        handler.max_target = self.max_target
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
    proxy: Proxy[web.StreamResponse] = Proxy(settings, lambda: table(), metrics=metrics,
                                             verifier=verifier, limiter=limiter,
                                             session=session)
    if control_path is None:
        proxy.set_table_source(table)  # the control plane's, from now on
    warned_auth: set[str] = set()

    def warn_unprotectable(new: RouteTable) -> None:
        problem = verifier.problem
        if problem is None or worker != 0:
            return
        for r in new.routes:
            auth = r.spec.auth
            if auth is not None and auth.kind == "jwt" and r.name not in warned_auth:
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
        proxy.set_table_source(feed_table)  # without the lambda's extra call per request
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

    handler = http1_handler(proxy, session, settings.ws_max_message)
    server = ProxyServer.from_settings(handler, settings)
    runner = web.ServerRunner(server, handle_signals=False,
                              shutdown_timeout=settings.drain_timeout)
    admin_runner: web.AppRunner | None = None
    if control is not None:
        admin_runner = web.AppRunner(make_admin_app(control.watcher, proxy,
                                                    discovery=control.discovery),
                                     access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    listeners: list[tuple[web.BaseRunner, Address, ssl.SSLContext | None]] = [
        (runner, settings.listen, None)]
    if store is not None and settings.tls_listen is not None:
        listeners.append((runner, settings.tls_listen, store.context()))
    if admin_runner is not None:
        await admin_runner.setup()
        listeners.append((admin_runner, settings.admin_listen, None))
    h2 = h2_front(proxy, settings)  # edgeproxy-h2
    try:
        if not stop.is_set():
            await _listen(listeners, settings, h2=(runner, h2))  # edgeproxy-h2
            if feed is not None:
                feed.listening = True
                feed.report_now()
            tune_gc()
            (log.info if worker == 0 else log.debug)(
                "listening", proxy=str(settings.listen), pid=os.getpid(),
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
        h2_drain = asyncio.ensure_future(h2.shutdown(settings.drain_timeout))  # edgeproxy-h2
        await runner.cleanup()
        await h2_drain  # edgeproxy-h2
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
    if control.store is not None:  # /explain decides as the workers do
        reports.edge = Edge(control.store.covers, settings.tls_redirect_port,
                            control.acme.challenge_response if control.acme else None)
    admin_runner = web.AppRunner(make_admin_app(control.watcher, reports, reports,
                                                discovery=control.discovery),
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
                  settings: Settings, reuse: bool = True,
                  h2: tuple[web.BaseRunner, H2Front] | None = None) -> None:
    for r, addr, context in listeners:
        reuse_port = (reuse and settings.workers > 1) or None
        try:
            # edgeproxy-h2: the proxy runner's TLS listener (ALPN h2) and, with EDGEPROXY_H2C,
            # its plain one serve HTTP/2 too.
            if h2 is not None and r is h2[0] and (context is not None or settings.h2c):
                await H2Site(r, addr.host, addr.port, h2[1], ssl_context=context, backlog=1024,
                             reuse_port=reuse_port).start()
                continue
            await web.TCPSite(r, addr.host, addr.port, backlog=1024, ssl_context=context,
                              reuse_port=reuse_port).start()
        except OSError as exc:
            raise ListenError(f"cannot listen on {addr}: {exc.strerror or exc}") from None


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await t
