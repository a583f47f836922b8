"""A lean HTTP/1.1 client for replicas: keep-alive pool on asyncio.Protocol, llhttp framing.

aiohttp's ClientSession costs more per request than the rest of the proxy together (timers per
read, header rebuilding, request objects). This pool does only what a proxy needs: write the
head we already built, stream the body with the client's framing, parse the response strictly
with llhttp (httptools), hand body chunks through with backpressure, and reuse connections.
WebSockets and health probes still use aiohttp.
"""

from __future__ import annotations

import asyncio
import collections
import re
import ssl
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import NamedTuple, cast

import httptools
from multidict import CIMultiDict

from edgeproxy.core.logs import get_logger

_HIGH_WATER = 512 * 1024  # pause reading the replica when this much body waits for the client
_LOW_WATER = 64 * 1024
_IDLE_PER_HOST = 256
# Defaults of EDGEPROXY_MAX_RESPONSE_HEADER_SIZE / EDGEPROXY_MAX_RESPONSE_HEADERS.
DEFAULT_MAX_HEAD = 64 * 1024
DEFAULT_MAX_HEADERS = 100


@dataclass(frozen=True, slots=True)
class ResponseLimits:
    """What a replica's answer may hold before it is refused (502 upstream_error).

    `head`: bytes of the whole response head, interim (1xx) heads included, and of trailers.
    `headers`: header lines in it (interim heads and trailers count too)."""

    head: int = DEFAULT_MAX_HEAD
    headers: int = DEFAULT_MAX_HEADERS


class _Refused(Exception):
    """Raised inside a parser callback: the answer breaks a rule llhttp does not check."""


class _Overrun(Exception):
    """Raised inside a parser callback: bytes after the end of the answer (not parsed on)."""


class UpstreamError(Exception):
    """A try against a replica failed. `before_send` says nothing reached the replica."""

    code = "upstream_error"

    def __init__(self, detail: str, before_send: bool) -> None:
        super().__init__(detail)
        self.detail = detail
        self.before_send = before_send


class ConnectError(UpstreamError):
    """The replica refused the connection or could not be reached."""

    code = "upstream_unreachable"


class TlsError(UpstreamError):
    """The TLS handshake with the replica failed."""

    code = "upstream_tls_error"


class UpstreamTimeout(UpstreamError):
    """Connect timeout (before_send) or no byte from the replica for the read timeout."""

    code = "upstream_timeout"


class ClientBodyTimeout(UpstreamError):
    """The replica waited for a request body the client stopped sending: not its fault."""

    code = "client_timeout"


class Endpoint(NamedTuple):
    """Where to connect: pooled connections are shared per endpoint.

    A NamedTuple, not a frozen dataclass: one is made per try and used as the pool's dict
    key, and a tuple is built and hashed in C (the frozen dataclass's __init__ made a
    setattr call per field and its __hash__ a Python call per lookup)."""

    host: str
    port: int
    tls: ssl.SSLContext | None = None
    server_name: str | None = None


class _Connection(asyncio.Protocol):
    """One connection to a replica, carrying one request at a time.

    An answer ends where its own framing says. Any byte after that end (in the same read, or
    later while the connection sits idle) is never parsed into the answer: the connection is
    discarded instead, so a replica's extra bytes cannot become the next client's answer."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 limits: ResponseLimits = ResponseLimits()) -> None:
        self.loop = loop
        self.limits = limits
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._exc: BaseException | None = None
        self._drain: asyncio.Future[None] | None = None
        self._paused_writing = False
        self._timeout = 0.0
        self._sweeper: _Sweeper | None = None  # the loop's, once this connection is watched
        self.parser: httptools.HttpResponseParser | None = None
        self._parser_spent = False
        self.last_activity = loop.time()  # and again when a request is sent (arm, write)
        self._reset_response()
        # No request yet: a byte now is nobody's answer.
        self.expecting = False
        # False once anything makes the connection unfit for another request.
        self.reusable = True

    # --- per-response state --------------------------------------------------------------

    def _reset_response(self, head: bool = False) -> None:
        # llhttp is ready for the next message after a complete one; only a HEAD answer (whose
        # body length the parser would still expect) needs a fresh parser next time.
        if head or self._parser_spent or self.parser is None:
            self.parser = httptools.HttpResponseParser(self)
        self._parser_spent = head
        self.head_request = head
        self.expecting = True  # an answer is due: bytes are parsed until its end
        self.status = 0
        self.reason = ""
        self.content_length: int | None = None
        self._reason = b""  # the status line's reason phrase, as parsed so far
        self._header_list: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0  # of heads so far (interim ones too), counted as parsed
        self._fed_in_head = 0  # bytes fed while no final head was complete (1xx heads too)
        self._read = b""  # the last read fed while no final head was complete
        self._header_count = 0
        self._trailers = 0
        self._silent_bytes = 0  # bytes fed since the last body byte (trailers, extensions)
        self._body_seen = 0
        self.headers_done: asyncio.Future[None] = self.loop.create_future()
        self.body: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.complete = False
        self.received_any = False
        self.keep_alive = False
        self._body_waiter: asyncio.Future[None] | None = None
        self._paused_reading = False

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.expecting:
            # The answer is over (or no request was sent): whatever this is, it is no one's
            # answer, and the next request must not read it as its own.
            self.discard("bytes from the replica after the end of its answer")
            return
        self.received_any = True
        self.last_activity = self.loop.time()
        body_before = self._body_seen
        if self.status == 0:
            self._fed_in_head += len(data)  # what the head is in: a bound on its size
            self._read = data
        try:
            self.parser.feed_data(data)  # type: ignore[union-attr]
        except httptools.HttpParserError as exc:
            if self.complete:  # _Overrun, or llhttp refusing what follows a whole answer
                # The answer was whole before these bytes; deliver it as framed.
                self.discard("bytes from the replica after the end of its answer")
                return
            cause = exc.__context__
            detail = str(cause) if isinstance(cause, _Refused) else str(exc)
            self._fail(UpstreamError(f"malformed response from the replica: {detail}", False))
            self.discard(detail)
            return
        if self.status == 0:  # llhttp holds an unfinished header line for us
            if self._fed_in_head > self.limits.head:
                self._refuse(f"response head over {self.limits.head} bytes")
            elif self._header_count + len(self._header_list) > self.limits.headers:
                # Lines of a head still arriving: no more than one read's worth held.
                self._refuse(f"more than {self.limits.headers} header lines")
        elif not self.complete:
            # Chunk extensions and trailers arrive with no body byte; cap them like a head.
            if self._body_seen == body_before:
                self._silent_bytes += len(data)
                if self._silent_bytes > self.limits.head:
                    self._refuse(f"chunk framing or trailers over {self.limits.head} bytes")
            else:
                self._silent_bytes = 0

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        self.expecting = False
        self.disarm()
        if self.headers_done.done() and not self.complete and self._read_until_close():
            self.complete = True  # a body delimited by the end of the connection
            self._wake_body()
        elif not self.complete:
            # The replica may have acted on the request before it went away: not before_send.
            self._fail(UpstreamError("the replica closed the connection"
                                     + (f": {exc}" if exc else ""), False))
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("connection lost"))

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # --- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:  # a second message after our answer's end: never parsed
            raise _Overrun()

    def on_header(self, name: bytes, value: bytes) -> None:
        # Called for each line: only collected here; the limits are checked when a head is
        # complete, and in data_received for a head still arriving.
        if self.status == 0:
            self._header_list.append((name, value))
        else:  # a trailer is not forwarded, and never a header of the answer
            self._count_trailer(name, value)

    def on_status(self, status: bytes) -> None:
        # llhttp hands the reason over in pieces when it spans two reads.
        self._reason += status

    def _count_lines(self, lines: int, size: int) -> None:
        """Count header lines and their bytes (1xx heads, the final head, trailers)."""
        self._header_count += lines
        if self._header_count > self.limits.headers:
            raise _Refused(f"more than {self.limits.headers} header lines")
        self._head_bytes += size
        if self._head_bytes > self.limits.head:
            raise _Refused(f"response head over {self.limits.head} bytes")

    def _count_trailer(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value) + 4
        if not self._trailers and self._fed_in_head <= self.limits.head:
            # The final head was not counted byte by byte (see on_headers_complete): it is
            # now, trailers count with it.
            size += _head_size(self.reason.encode("latin-1"), self._header_list)
        self._trailers += 1
        self._count_lines(1, size)

    def on_headers_complete(self) -> None:
        parser = self.parser
        assert parser is not None  # noqa: S101 - set before any byte can arrive
        headers = self._header_list
        reason = self._reason
        self._reason = b""
        status = parser.get_status_code()
        if status < 200 or self._fed_in_head > self.limits.head:
            # The head's exact size: always for an interim head (a flood of empty 1xx
            # counts), for the final one only when the bytes fed since the answer began,
            # which bound it, pass the limit.
            self._count_lines(len(headers), _head_size(reason, headers))
        else:
            self._count_lines(len(headers), 0)
        if status == 101:
            # The pool never asks for an upgrade (WebSockets go through aiohttp): a switch
            # would hand the rest of the connection to a protocol we would parse as HTTP.
            raise _Refused("101 Switching Protocols to a request that asked for no upgrade")
        if 100 <= status < 200:  # 103 Early Hints and friends: not forwarded, keep reading
            self._header_list = []
            return
        read = self._read
        if (self._head_bytes == 0 and self._fed_in_head == len(read)
                and read.startswith(b"HTTP/1.1 ")):
            # This read began the answer and no interim head came first: llhttp parsed this
            # status line. (get_http_version() formats a string: 1 % of a request.)
            version = "1.1"
        else:
            version = parser.get_http_version()
        self.content_length = _check_final_head(status, version, reason, headers)
        self.reason = reason.decode("latin-1")
        self.status = status
        self.keep_alive = parser.should_keep_alive()
        if not self.headers_done.done():
            self.headers_done.set_result(None)
        if self.head_request:
            # llhttp cannot be told this answer has no body: anything after the head is extra.
            self.complete = True
            self.expecting = False

    def on_body(self, body: bytes) -> None:
        if self.complete:  # body bytes after a HEAD answer's head
            raise _Overrun()
        if self.status == 0:
            return
        self._body_seen += len(body)
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self._paused_reading and self.transport:
            self._paused_reading = True
            self.transport.pause_reading()
        w = self._body_waiter  # _wake_body() inline: once per piece of every answer
        if w is not None and not w.done():
            w.set_result(None)

    def on_message_complete(self) -> None:
        if self.status == 0:  # the end of a 1xx
            return
        self.complete = True
        self.expecting = False
        w = self._body_waiter  # _wake_body() inline
        if w is not None and not w.done():
            w.set_result(None)

    # --- inactivity watchdog: a set membership per request; one sweeper per loop checks ------

    def arm(self, timeout: float) -> None:
        """Fail the request if neither side moves a byte for `timeout` seconds."""
        self._timeout = timeout
        self.last_activity = self.loop.time()
        sweeper = self._sweeper
        if sweeper is None:  # looked up once per connection, not per request
            sweeper = self._sweeper = _Sweeper.of(self.loop)
        sweeper.watch(self)

    def disarm(self) -> None:
        """The request is over (or the connection gone)."""
        sweeper = self._sweeper
        if sweeper is not None:
            sweeper.active.discard(self)

    def check_silence(self, now: float) -> bool:
        """Called by the sweeper: True when the request timed out (and was failed)."""
        if self.complete or self.last_activity + self._timeout > now:
            return False
        self._fail(UpstreamTimeout(f"no byte from the replica for {self._timeout:g}s", False))
        if self.transport is not None:
            self.transport.abort()
        return True

    # --- helpers --------------------------------------------------------------------------

    def _read_until_close(self) -> bool:
        names = {n.lower() for n, _ in self._header_list}
        return b"content-length" not in names and b"transfer-encoding" not in names

    def discard(self, reason: str) -> None:
        """Never reuse this connection; close it now (what was parsed stays deliverable)."""
        self.reusable = False
        self.expecting = False
        transport = self.transport
        if transport is not None and not transport.is_closing():
            # debug: replicas that send 408 on an idle keep-alive connection are common.
            _events.debug("upstream_connection_discarded", reason=reason,
                          replica=transport.get_extra_info("peername"))
            transport.abort()

    def _refuse(self, detail: str) -> None:
        self._fail(UpstreamError(f"malformed response from the replica: {detail}", False))
        self.discard(detail)

    def failure(self) -> BaseException | None:
        """Why the answer cannot be finished (None while it can, or is)."""
        return None if self.complete else self._exc

    def _wake_body(self) -> None:
        w = self._body_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self._exc = exc
        if not self.headers_done.done():
            self.headers_done.set_exception(exc)
            self.headers_done.exception()  # retrieved: no "never retrieved" warning
        self._wake_body()

    def response_headers(self) -> CIMultiDict[str]:
        """The response headers, decoded as aiohttp does (UTF-8, bytes kept as surrogates)."""
        out: CIMultiDict[str] = CIMultiDict()
        for name, value in self._header_list:
            out.add(name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))
        return out

    async def write(self, data: bytes) -> None:
        """Write and wait while the replica's socket buffer is full."""
        if self.transport is None or self.closed or self.transport.is_closing():
            raise ConnectionResetError("connection to the replica is closed")
        self.last_activity = self.loop.time()
        self.transport.write(data)
        if self._paused_writing:
            self._drain = self.loop.create_future()
            await self._drain

    async def next_chunk(self) -> bytes:
        """The next piece of the body; b'' at its end. Raises UpstreamError on failure."""
        while True:
            if self.body:
                chunk = self.body.popleft()
                self.buffered -= len(chunk)
                self.last_activity = self.loop.time()  # a slow client is not a silent replica
                if self._paused_reading and self.buffered < _LOW_WATER and self.transport:
                    self._paused_reading = False
                    self.transport.resume_reading()
                return chunk
            if self.complete:
                self.disarm()
                return b""
            if self._exc is not None:
                raise self._exc
            self._body_waiter = self.loop.create_future()
            await self._body_waiter
            self._body_waiter = None


_events = get_logger("upstream")
_REASON_OK = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")  # RFC 9112 reason-phrase


def _head_size(reason: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    """A head's bytes as sent: each line's name, value, ": " and CRLF; the status line and
    the blank line (17) with the reason."""
    size = 17 + len(reason)
    for name, value in headers:
        size += len(name) + len(value) + 4
    return size


def _check_final_head(status: int, version: str, reason: bytes,
                      headers: list[tuple[bytes, bytes]]) -> int | None:
    """Refuse what llhttp lets through but a client must never be handed (raises _Refused);
    else the answer's Content-Length (the last well-formed one), found in the same pass."""
    if status < 100:
        raise _Refused(f"status {status:03d}; expected 100-999")
    if version not in ("1.1", "1.0"):
        raise _Refused(f"HTTP/{version} in the status line; expected HTTP/1.1 or HTTP/1.0")
    if reason != b"OK" and not _REASON_OK.fullmatch(reason):
        raise _Refused("control characters in the reason phrase")
    codings: list[bytes] = []
    length: int | None = None
    for name, value in headers:  # one pass: these two are the only names looked for here
        size = len(name)
        if size == 14:
            if name.lower() == b"content-length" and value.isdigit():
                length = int(value)
        elif size == 17 and name.lower() == b"transfer-encoding":
            codings.append(value)
    # As nginx: one Transfer-Encoding, exactly chunked. Any other coding would be read to the
    # connection's end and handed on without its coding; a list hides what the replica meant.
    if codings and (len(codings) > 1 or codings[0].strip().lower() != b"chunked"):
        raise _Refused("Transfer-Encoding " + repr(b", ".join(codings).decode("latin-1"))
                       + "; expected exactly chunked")
    return length


_SWEEP_INTERVAL = 0.1


class _Sweeper:
    """Checks requests in flight for silence every 100 ms.

    A timer per request (call_later + cancel) cost more than the timeouts are worth on the hot
    path; a set add/discard per request and one periodic pass over the set is cheap, and a
    timeout fires at most 100 ms late."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.active: set[_Connection] = set()
        self._handle: asyncio.TimerHandle | None = None

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _Sweeper:
        sweeper = _sweepers.get(loop)
        if sweeper is None:
            sweeper = _sweepers[loop] = cls(loop)
        return sweeper

    def watch(self, conn: _Connection) -> None:
        self.active.add(conn)
        if self._handle is None:
            self._handle = self.loop.call_later(_SWEEP_INTERVAL, self._sweep)

    def _sweep(self) -> None:
        self._handle = None
        now = self.loop.time()
        for conn in [c for c in self.active if c.check_silence(now) or c.complete or c.closed]:
            self.active.discard(conn)
        if self.active:
            self._handle = self.loop.call_later(_SWEEP_INTERVAL, self._sweep)


_sweepers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Sweeper] = (
    weakref.WeakKeyDictionary())


class UpstreamResponse:
    """Status, headers and a body stream; `release()` returns the connection to the pool."""

    def __init__(self, pool: UpstreamPool, endpoint: Endpoint, conn: _Connection,
                 reusable: bool) -> None:
        self._pool = pool
        self._endpoint = endpoint
        self._conn = conn
        self._reusable = reusable
        self.status = conn.status
        self.reason = conn.reason
        self.raw_headers = conn._header_list
        self.content_length = conn.content_length  # found while the head was checked
        self._released = False

    @property
    def headers(self) -> CIMultiDict[str]:
        """The response headers as a multidict (built on demand)."""
        return self._conn.response_headers()

    @property
    def trailers(self) -> None:
        """HTTP/1.1 trailers are not forwarded (see `_Connection.on_header`)."""
        return None

    def failure(self) -> BaseException | None:
        """The error that already ended this answer early (a truncated body), else None."""
        return self._conn.failure()

    def complete_body(self) -> bytes | None:
        """The whole body when it has already arrived (small responses), else None."""
        conn = self._conn
        if not conn.complete or conn.buffered > _LOW_WATER:
            return None
        data = b"".join(conn.body)
        conn.body.clear()
        conn.buffered = 0
        return data  # (no disarm: a complete answer never times out, and release() disarms)

    async def iter_body(self) -> AsyncIterator[bytes]:
        """Body chunks as they arrive; raises UpstreamError (UpstreamTimeout after silence)."""
        conn = self._conn
        while True:
            chunk = await conn.next_chunk()
            if not chunk:
                return
            yield chunk

    def release(self) -> None:
        """Done with the response: pool the connection if it is clean, else close it."""
        if self._released:
            return
        self._released = True
        conn = self._conn
        conn.disarm()
        if (self._reusable and conn.reusable and conn.complete and conn.keep_alive
                and not conn.closed):
            self._pool.put(self._endpoint, conn)
        else:
            conn.reusable = False
            conn.expecting = False
            if conn.transport is not None:
                conn.transport.close()


class UpstreamPool:
    """Keep-alive connections per replica endpoint."""

    # 4 s: below the shortest common server keep-alive (Node.js closes idle sockets after 5 s),
    # so a pooled connection is never reused just as the replica closes it.
    def __init__(self, connect_timeout: float, read_timeout: float,
                 idle_timeout: float = 4.0, limits: ResponseLimits = ResponseLimits()) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.idle_timeout = idle_timeout
        self.limits = limits
        self._idle: dict[Endpoint, list[_Connection]] = {}

    def put(self, endpoint: Endpoint, conn: _Connection) -> None:
        """Return a clean connection for reuse."""
        idle = self._idle.get(endpoint)
        if idle is None:
            idle = self._idle[endpoint] = []
        now = time.monotonic()
        while idle and (now - idle[0].idle_since > self.idle_timeout or idle[0].closed
                        or not idle[0].reusable):
            old = idle.pop(0)  # the oldest sit at the bottom: close them instead of keeping
            if old.transport is not None:
                old.transport.close()
        if len(idle) >= _IDLE_PER_HOST or not conn.reusable:
            if conn.transport is not None:
                conn.transport.close()
            return
        conn.idle_since = now
        idle.append(conn)

    def _take(self, endpoint: Endpoint) -> _Connection | None:
        idle = self._idle.get(endpoint)
        now = time.monotonic()
        if idle is not None and not idle:
            del self._idle[endpoint]  # replicas come and go: don't keep their endpoints
            return None
        while idle:
            conn = idle.pop()
            transport = conn.transport
            if conn.closed or not conn.reusable or transport is None or transport.is_closing():
                continue
            if now - conn.idle_since > self.idle_timeout:
                transport.close()
                continue
            return conn
        return None

    async def _connect(self, endpoint: Endpoint, limit_s: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(limit_s):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop, self.limits), endpoint.host, endpoint.port,
                    ssl=endpoint.tls,
                    server_hostname=(endpoint.server_name or endpoint.host) if endpoint.tls
                    else None)
        except TimeoutError:
            raise UpstreamTimeout(f"connect timeout after {limit_s:g}s", True) from None
        except ssl.SSLError as exc:
            raise TlsError(f"TLS handshake failed: {exc.reason or exc}", True) from None
        except OSError as exc:
            raise ConnectError(exc.strerror or str(exc), True) from None
        return conn

    async def request(
        self,
        endpoint: Endpoint,
        head: bytes | list[bytes],
        method: str,
        body: AsyncIterator[bytes] | None,
        chunked: bool,
        *,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
        idempotent: bool = False,
    ) -> UpstreamResponse:
        """Send one request (its head serialised, or in pieces joined only to be written) and
        wait for the response head."""
        ct = connect_timeout or self.connect_timeout
        rt = read_timeout or self.read_timeout
        conn = self._take(endpoint)
        if conn is not None and body is None and idempotent:
            try:
                return await self._send(endpoint, conn, head, method, None, False, rt)
            except UpstreamError as exc:
                # A pooled connection the replica closed while it sat idle: not a byte came
                # back, so the idempotent request goes once more on a fresh connection.
                if exc.before_send or (not conn.received_any
                                       and not isinstance(exc, UpstreamTimeout)):
                    conn = None
                else:
                    raise
        if conn is None:
            conn = await self._connect(endpoint, ct)
        return await self._send(endpoint, conn, head, method, body, chunked, rt)

    async def _send(self, endpoint: Endpoint, conn: _Connection, head: bytes | list[bytes],
                    method: str,
                    body: AsyncIterator[bytes] | None, chunked: bool,
                    read_timeout: float) -> UpstreamResponse:
        conn._reset_response(head=method == "HEAD")
        try:
            # Joined here and dropped once written: a slow request body (the replica waits
            # for it) must not keep a second copy of a large head alive.
            await conn.write(head if isinstance(head, bytes) else b"".join(head))
        except ConnectionError as exc:
            if conn.transport is not None:
                conn.transport.abort()
            raise UpstreamError(f"the replica closed the connection: {exc}", True) from None
        conn.arm(read_timeout)
        sender: asyncio.Task[None] | None = None
        if body is not None:
            sender = asyncio.ensure_future(_send_body(conn, body, chunked))
            # Its failure is raised through _headers_or_body_failure, unless the request was
            # cancelled first (the client left): then nobody else would ever look at it.
            sender.add_done_callback(_observe)
        try:
            if sender is None:
                await conn.headers_done
            else:
                await _headers_or_body_failure(conn, sender)
        except UpstreamTimeout:
            if sender is not None and not sender.done():
                sender.cancel()
                if conn.transport is not None:
                    conn.transport.abort()
                raise ClientBodyTimeout("the client stopped sending its body", False) from None
            if conn.transport is not None:
                conn.transport.abort()
            raise
        except BaseException:
            if sender is not None and not sender.done():
                sender.cancel()
            if conn.transport is not None:
                conn.transport.abort()
            raise
        reusable = True
        if sender is not None and not sender.done():
            # The replica answered before taking the whole body (e.g. 413): don't reuse.
            reusable = False
            sender.cancel()
        return UpstreamResponse(self, endpoint, conn, reusable)

    def close(self) -> None:
        """Close every idle connection."""
        for conns in self._idle.values():
            for c in conns:
                if c.transport is not None:
                    c.transport.close()
        self._idle.clear()


def _observe(task: asyncio.Task[None]) -> None:
    """Mark a finished body sender's exception as seen (asyncio logs unseen ones)."""
    if not task.cancelled():
        task.exception()


async def _send_body(conn: _Connection, body: AsyncIterator[bytes], chunked: bool) -> None:
    async for chunk in body:
        if not chunk:
            continue
        if chunked:
            await conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            await conn.write(chunk)
    if chunked:
        await conn.write(b"0\r\n\r\n")


async def _headers_or_body_failure(conn: _Connection, sender: asyncio.Task[None]) -> None:
    """Wait for the response head; a failing body (too large, client gone) ends the wait."""
    done, _ = await asyncio.wait((conn.headers_done, sender),
                                 return_when=asyncio.FIRST_COMPLETED)
    if conn.headers_done in done:
        conn.headers_done.result()
        return
    exc = sender.exception()
    if exc is not None:
        raise exc
    await conn.headers_done
