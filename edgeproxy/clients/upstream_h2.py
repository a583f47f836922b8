"""HTTP/2 to the replicas (gateway.scheme=h2c or h2): pooled multiplexed connections on h2.

Each connection carries up to `max_streams` requests at once (fewer when the replica's
SETTINGS_MAX_CONCURRENT_STREAMS says so). Response bodies are acknowledged to the replica only
as the client takes them, so a slow client pauses the replica's stream, not the proxy's memory.
Trailers (gRPC's status) are kept for the front. A client's reset becomes an RST_STREAM to the
replica; the replica's RST_STREAM reaches the client; after a GOAWAY the streams in flight
finish and new requests open a new connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any, cast

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack
from multidict import CIMultiDict

from edgeproxy.clients.upstream import (
    ConnectError,
    Endpoint,
    TlsError,
    UpstreamError,
    UpstreamTimeout,
)
from edgeproxy.core.headers import RawHeaders, UpstreamHead
from edgeproxy.core.logs import get_logger

H2_SCHEMES = frozenset(("h2c", "h2"))
_WINDOW = 256 * 1024  # per stream: what a replica may send ahead of the client
_IDLE = 30.0  # an unused connection to a replica is closed after this long
_events = get_logger("upstream_h2")
# Connection-specific fields: never in an HTTP/2 head (RFC 9113 8.2.2), on either hop.
CONNECTION_SPECIFIC = frozenset((b"connection", b"keep-alive", b"proxy-connection",
                                 b"transfer-encoding", b"upgrade", b"te"))
# Left out of a request to a replica (Host becomes :authority); the pipeline already removed
# the other hop-by-hop ones.
_DROP = CONNECTION_SPECIFIC | {b"host"}
# Fields kept out of the HPACK dynamic table, on both hops (h2's outbound normalisation, which
# would mark the secrets, is off). Secrets: many clients' requests share one connection's
# compression context, so a secret indexed there could be guessed by another client from the
# sizes of its own requests (CRIME); h2 and nghttp2 never index them either. The rest change
# with every request or resource (our request ids and trace context; nghttp2's list without
# :path and content-length, which repeat in API and gRPC traffic): indexed, each would evict
# a field that repeats, and the encoder's table search (a linear scan in hpack) would walk a
# table full of dead ids for every field of every head (measured: 52 -> 38 us to encode a
# request and an answer head with a unique x-request-id each).
NOT_INDEXED = frozenset((
    b"authorization", b"proxy-authorization", b"cookie", b"set-cookie",
    b"etag", b"last-modified", b"location", b"age", b"if-modified-since", b"if-none-match",
    b"x-request-id", b"traceparent", b"tracestate"))
# A response field as RFC 9113 8.2.1 allows it: a lower-case token name (":" only in
# pseudo-headers, dealt with apart), a value without NUL, CR or LF.
_FIELD_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
_FORBIDDEN_IN_VALUE = re.compile(rb"[\0\r\n]")
# The replica hop: our request heads are built by `request_headers` (lower-case names,
# connection-specific fields dropped, values trimmed, secrets never indexed), so h2's
# outbound passes would only walk them again. Response heads are checked once, by
# `_response_fields`, per stream: a replica's malformed field fails that request with a 502
# (as nginx's "upstream sent invalid header"), not every stream on the connection, which is
# what h2's inbound validation would do (a connection error).
_REPLICA_HOP = h2.config.H2Configuration(
    client_side=True, header_encoding=None, validate_inbound_headers=False,
    normalize_inbound_headers=False, validate_outbound_headers=False,
    normalize_outbound_headers=False)


class GracefulH2Connection(h2.connection.H2Connection):
    """h2's connection, except that a GOAWAY with NO_ERROR does not close it at once.

    h2 moves its state machine to CLOSED on any GOAWAY and then refuses every later frame, so
    the streams the peer promised to finish (those up to last_stream_id, RFC 9113 6.8) would
    break. Here a graceful GOAWAY only reports `ConnectionTerminated`; the owner stops opening
    streams and closes once the open ones are done."""

    def _receive_goaway_frame(self, frame: Any) -> tuple[list[Any], list[h2.events.Event]]:
        if frame.error_code:  # an error: the connection is over, as h2 has it
            return super()._receive_goaway_frame(frame)
        event = h2.events.ConnectionTerminated()
        event.error_code = h2.errors.ErrorCodes.NO_ERROR
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


class UpstreamReset(UpstreamError):
    """The replica reset the stream (RST_STREAM) or refused it in a GOAWAY."""

    def __init__(self, detail: str, before_send: bool,
                 error_code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        super().__init__(detail, before_send)
        self.error_code = error_code


@dataclass(frozen=True, slots=True)
class H2Settings:
    """The replica-side HTTP/2 settings."""

    max_streams: int = 100  # EDGEPROXY_H2_UPSTREAM_STREAMS
    connect_timeout: float = 5.0
    read_timeout: float = 60.0


class _Stream:
    """One request on a replica connection, as the pipeline's response reads it."""

    def __init__(self, conn: _Conn, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        loop = conn.loop
        self.headers_done: asyncio.Future[None] = loop.create_future()
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.body: list[tuple[bytes, int]] = []
        self.buffered = 0
        self.ended = False
        self.error: UpstreamError | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.send_waiter: asyncio.Future[None] | None = None
        self.closed = False

    def wake(self) -> None:
        for w in (self.waiter, self.send_waiter):
            if w is not None and not w.done():
                w.set_result(None)

    def body_sent(self, sender: asyncio.Future[None]) -> None:
        """The request body's sender finished: its failure before the response head is the
        request's failure (the exception is always retrieved: after the head nobody waits)."""
        if sender.cancelled():
            return
        exc = sender.exception()
        if exc is not None and not self.headers_done.done():
            self.headers_done.set_exception(exc)

    def fail(self, exc: UpstreamError) -> None:
        if self.ended or self.error is not None:
            return
        self.error = exc
        if not self.headers_done.done():
            self.headers_done.set_exception(exc)
            self.headers_done.exception()
        self.wake()


class _Conn(asyncio.Protocol):
    """One HTTP/2 connection to a replica."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_streams: int) -> None:
        self.loop = loop
        self.max_streams = max_streams
        self.transport: asyncio.Transport | None = None
        self.h2 = GracefulH2Connection(config=_REPLICA_HOP)
        self.streams: dict[int, _Stream] = {}
        self.closed = False
        self.goaway = False
        self._paused = False
        self._drain: list[asyncio.Future[None]] = []
        self._idle: asyncio.TimerHandle | None = None
        self.reserved = 0  # streams promised to requests still writing their headers
        self._flush_pending = False

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.h2.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _WINDOW,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 256 * 1024,
        })
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(self.max_streams * _WINDOW)
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.flush_now()
            self._lost(UpstreamError(f"HTTP/2 protocol error from the replica: {exc}", False))
            if self.transport is not None:
                self.transport.close()
            return
        for event in events:
            self._dispatch(event)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(UpstreamError("the replica closed the connection"
                                 + (f": {exc}" if exc else ""), False))

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        waiters, self._drain = self._drain, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    # --- events ---------------------------------------------------------------------------------

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                try:
                    status, stream.raw_headers = _response_fields(event.headers or (), False)
                except UpstreamError as exc:
                    stream.fail(exc)
                    self.finish(stream)
                    return
                stream.status = status
                if not stream.headers_done.done():
                    stream.headers_done.set_result(None)
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is None:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            else:
                stream.body.append((event.data or b"", event.flow_controlled_length))
                stream.buffered += len(event.data or b"")
                stream.wake()
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                try:
                    stream.trailers = _response_fields(event.headers or (), True)[1]
                except UpstreamError as exc:
                    stream.fail(exc)
                    self.finish(stream)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.ended = True
                if not stream.headers_done.done():  # ended without a final head
                    stream.fail(UpstreamError("the replica ended the stream without a "
                                              "response head", False))
                stream.wake()
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                code = event.error_code
                refused = code == h2.errors.ErrorCodes.REFUSED_STREAM
                stream.fail(UpstreamReset(
                    f"the replica reset the stream ({_code_name(code)})",
                    refused and not stream.headers_done.done(), int(code or 0)))
                self._forget(stream)
        elif isinstance(event, h2.events.WindowUpdated):
            targets = (self.streams.values() if not event.stream_id
                       else [s for s in (self.streams.get(event.stream_id),) if s])
            for s in list(targets):
                w = s.send_waiter
                if w is not None and not w.done():
                    w.set_result(None)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            for s in list(self.streams.values()):
                w = s.send_waiter
                if w is not None and not w.done():
                    w.set_result(None)
        elif isinstance(event, h2.events.ConnectionTerminated):
            # In-flight streams up to last_stream_id finish; later ones were never processed.
            self.goaway = True
            last = event.last_stream_id if event.last_stream_id is not None else 0
            for s in list(self.streams.values()):
                if s.stream_id > last:
                    s.fail(UpstreamReset("the replica went away (GOAWAY) before the request",
                                         True, int(h2.errors.ErrorCodes.REFUSED_STREAM)))
                    self._forget(s)
            if event.error_code:
                for s in list(self.streams.values()):
                    s.fail(UpstreamReset(f"the replica went away ({_code_name(event.error_code)})",
                                         False, int(event.error_code)))
            self._maybe_close()

    # --- streams --------------------------------------------------------------------------------

    def usable(self) -> bool:
        if self.closed or self.goaway or self.transport is None or self.transport.is_closing():
            return False
        limit = min(self.max_streams, self.h2.remote_settings.max_concurrent_streams)
        return len(self.streams) + self.reserved < limit

    def open(self, headers: list[tuple[bytes, bytes]], end: bool) -> _Stream:
        """Send a request head on a new stream."""
        stream_id = self.h2.get_next_available_stream_id()
        stream = _Stream(self, stream_id)
        self.h2.send_headers(stream_id, headers, end_stream=end)
        self.streams[stream_id] = stream
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self.flush()
        return stream

    async def send_body(self, stream: _Stream, body: AsyncIterator[bytes]) -> None:
        """Stream a request body within the replica's window, then end the stream."""
        async for chunk in body:
            view = memoryview(chunk)
            while view:
                if stream.error is not None or stream.closed:
                    return  # the replica answered or reset: the rest is not wanted
                window = self.h2.local_flow_control_window(stream.stream_id)
                if window <= 0:
                    stream.send_waiter = self.loop.create_future()
                    await stream.send_waiter
                    stream.send_waiter = None
                    continue
                n = min(window, self.h2.max_outbound_frame_size, len(view))
                self.h2.send_data(stream.stream_id, view[:n].tobytes())
                view = view[n:]
                self.flush()
                await self.drain()
        if stream.error is None and not stream.closed:
            with contextlib.suppress(h2.exceptions.StreamClosedError):
                self.h2.end_stream(stream.stream_id)
            self.flush()

    def consumed(self, stream: _Stream, flow: int) -> None:
        """The client took `flow` bytes of this stream: let the replica send more."""
        if flow and not self.closed and not stream.closed:
            with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
                self.h2.acknowledge_received_data(flow, stream.stream_id)
                self.flush()

    def finish(self, stream: _Stream) -> None:
        """The pipeline is done with the stream: reset it if it is still open."""
        if not stream.closed and not self.closed and (not stream.ended
                                                      or stream.error is not None):
            with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
                self.h2.reset_stream(stream.stream_id, h2.errors.ErrorCodes.CANCEL)
            self.flush()
        unread = sum(flow for _, flow in stream.body)
        stream.body.clear()
        if unread and not self.closed:
            # Never read by the client: still the connection's window to give back, or a
            # few aborted downloads would stall every later stream on this connection.
            with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
                self.h2.acknowledge_received_data(unread, stream.stream_id)
            self.flush()
        self._forget(stream)

    def _forget(self, stream: _Stream) -> None:
        stream.closed = True
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self.streams or self.closed:
            return
        if self.goaway:
            if self.transport is not None:
                self.flush_now()  # the last streams' resets or window updates first
                self.transport.close()
            return
        if self._idle is None:
            self._idle = self.loop.call_later(_IDLE, self._idle_expired)

    def _idle_expired(self) -> None:
        self._idle = None
        if not self.streams and not self.reserved and self.transport is not None:
            self.goaway = True
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.close_connection()
            self.flush_now()
            self.transport.close()

    def _lost(self, exc: UpstreamError) -> None:
        self.closed = True
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        for s in list(self.streams.values()):
            s.fail(exc)
        self.streams.clear()
        self.resume_writing()

    def flush(self) -> None:
        """Write what h2 has queued at the end of this pass of the event loop: the requests
        (and window updates) of every stream served in the same pass share one send."""
        if not self._flush_pending:
            self._flush_pending = True
            self.loop.call_soon(self.flush_now)

    def flush_now(self) -> None:
        """Write what h2 has queued, now (before a close)."""
        self._flush_pending = False
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def drain(self) -> None:
        if self._paused and not self.closed:
            fut = self.loop.create_future()
            self._drain.append(fut)
            await fut


def _response_fields(fields: Iterable[tuple[bytes, bytes]],
                     trailers: bool) -> tuple[int, list[tuple[bytes, bytes]]]:
    """A replica's response head (or its trailers) checked in one pass, as h2's inbound
    validation would (RFC 9113 8.2, 8.3.2): `:status` first and only in a head, no other
    pseudo-header, regular names lower-case tokens and not connection-specific, values without
    NUL, CR or LF (trimmed of surrounding blanks). Returns the status and the regular fields;
    raises UpstreamError naming the first bad field."""
    status = 0
    out: list[tuple[bytes, bytes]] = []
    for name, value in fields:
        if name[:1] == b":":
            if (name == b":status" and not trailers and not status and not out
                    and len(value) == 3 and value.isdigit() and value[:1] != b"0"):
                status = int(value)
                continue
            raise UpstreamError(f"the replica sent {name!r} {value!r} in its response "
                                f"{'trailers' if trailers else 'head'}; expected one 3-digit "
                                ":status before the other fields of a head", False)
        if _FIELD_NAME.fullmatch(name) is None or name in CONNECTION_SPECIFIC:
            raise UpstreamError(f"the replica sent an invalid response field name {name!r}; "
                                "expected a lower-case token, not connection-specific", False)
        if _FORBIDDEN_IN_VALUE.search(value) is not None:
            raise UpstreamError(f"the replica sent response field {name!r} with a NUL, CR or "
                                f"LF in its value {value!r}", False)
        out.append((name, value.strip(b" \t")))
    if not status and not trailers:
        raise UpstreamError("the replica sent a response head without :status", False)
    return status, out


def _code_name(code: int | None) -> str:
    try:
        return h2.errors.ErrorCodes(code or 0).name
    except ValueError:
        return str(code)


class H2Response:
    """A replica's answer over HTTP/2: the same reading surface as the HTTP/1.1 pool's
    `UpstreamResponse`, plus `trailers` (set once the body has been read to its end)."""

    reason = ""

    def __init__(self, stream: _Stream) -> None:
        self._stream = stream
        self.status = stream.status
        self.raw_headers: RawHeaders = stream.raw_headers
        self.content_length: int | None = None
        for name, value in stream.raw_headers:
            if name == b"content-length" and value.isdigit():
                self.content_length = int(value)

    @property
    def trailers(self) -> list[tuple[bytes, bytes]] | None:
        return self._stream.trailers

    @property
    def headers(self) -> CIMultiDict[str]:
        return CIMultiDict((n.decode("latin-1"), v.decode("utf-8", "surrogateescape"))
                           for n, v in self.raw_headers)

    def failure(self) -> BaseException | None:
        s = self._stream
        return None if s.ended else s.error

    def complete_body(self) -> bytes | None:
        """The whole body once the stream has ended, else None (trailers, if any, stay in
        `trailers`: a unary gRPC answer is relayed in one pass too)."""
        s = self._stream
        if not s.ended:
            return None
        data = b"".join(d for d, _ in s.body)
        s.conn.consumed(s, sum(flow for _, flow in s.body))  # one acknowledgement for all
        s.body.clear()
        s.buffered = 0
        return data

    async def iter_body(self) -> AsyncIterator[bytes]:
        s = self._stream
        conn = s.conn
        while True:
            if s.body:
                data, flow = s.body.pop(0)
                s.buffered -= len(data)
                if data:
                    yield data
                conn.consumed(s, flow)  # after the client took it
                continue
            if s.ended:
                return
            if s.error is not None:
                raise s.error
            s.waiter = conn.loop.create_future()
            try:
                await s.waiter
            finally:
                s.waiter = None

    def release(self) -> None:
        s = self._stream
        s.conn.finish(s)


class H2Pool:
    """Multiplexed HTTP/2 connections per replica endpoint."""

    def __init__(self, settings: H2Settings) -> None:
        self.settings = settings
        self._conns: dict[Endpoint, list[_Conn]] = {}
        self._connecting: dict[Endpoint, asyncio.Future[_Conn]] = {}
        self._contexts: dict[tuple[bool, str | None], ssl.SSLContext] = {}

    def tls_context(self, verify: bool, ca: str | None) -> ssl.SSLContext:
        """A client context offering ALPN h2, built once per (verify, CA) pair."""
        key = (verify, ca)
        ctx = self._contexts.get(key)
        if ctx is None:
            try:
                ctx = ssl.create_default_context(cafile=ca)
            except (OSError, ssl.SSLError) as exc:
                raise TlsError(f"cannot load gateway.tls.ca={ca!r}: {exc}", True) from None
            ctx.set_alpn_protocols(["h2"])
            if not verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self._contexts[key] = ctx
        return ctx

    async def _connection(self, endpoint: Endpoint, connect_timeout: float) -> _Conn:
        conns = self._conns.setdefault(endpoint, [])
        conns[:] = [c for c in conns if not c.closed and not (c.goaway and not c.streams)]
        for c in conns:
            if c.usable():
                return c
        pending = self._connecting.get(endpoint)
        if pending is not None:  # share the connection being made: it has room for many
            with contextlib.suppress(UpstreamError):
                conn = await asyncio.shield(pending)
                if conn.usable():
                    return conn
        fut: asyncio.Future[_Conn] = asyncio.get_running_loop().create_future()
        self._connecting[endpoint] = fut
        try:
            conn = await self._connect(endpoint, connect_timeout)
        except UpstreamError as exc:
            fut.set_exception(exc)
            fut.exception()
            raise
        finally:
            if self._connecting.get(endpoint) is fut:
                del self._connecting[endpoint]
        fut.set_result(conn)
        self._conns.setdefault(endpoint, []).append(conn)
        return conn

    async def _connect(self, endpoint: Endpoint, limit_s: float) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(limit_s):
                transport, conn = await loop.create_connection(
                    lambda: _Conn(loop, self.settings.max_streams), endpoint.host, endpoint.port,
                    ssl=endpoint.tls,
                    server_hostname=(endpoint.server_name or endpoint.host) if endpoint.tls
                    else None)
        except TimeoutError:
            raise UpstreamTimeout(f"connect timeout after {limit_s:g}s", True) from None
        except ssl.SSLError as exc:
            raise TlsError(f"TLS handshake failed: {exc.reason or exc}", True) from None
        except OSError as exc:
            raise ConnectError(exc.strerror or str(exc), True) from None
        if endpoint.tls is not None:
            sslobj = transport.get_extra_info("ssl_object")
            alpn = sslobj.selected_alpn_protocol() if sslobj is not None else None
            if alpn != "h2":
                transport.close()
                raise TlsError(f"the replica did not choose ALPN h2 (chose {alpn!r}); "
                               "expected an HTTP/2 server for gateway.scheme=h2", True)
        return conn

    async def request(self, endpoint: Endpoint, method: str, target: str, default_host: str,
                      head: UpstreamHead, body: AsyncIterator[bytes] | None, *,
                      connect_timeout: float | None = None,
                      read_timeout: float | None = None, extra: bytes = b"") -> H2Response:
        """Send one request on a pooled connection and wait for the response head. `extra`
        are this try's own header lines (its traceparent/tracestate), as in `UpstreamHead.parts`."""
        ct = connect_timeout or self.settings.connect_timeout
        rt = read_timeout or self.settings.read_timeout
        conn = await self._connection(endpoint, ct)
        headers = request_headers(method, target, "https" if endpoint.tls else "http",
                                  default_host, head, extra)
        try:
            stream = conn.open(headers, end=body is None)
        except h2.exceptions.ProtocolError as exc:
            raise UpstreamError(f"cannot open a stream to the replica: {exc}", True) from None
        sender: asyncio.Future[None] | None = None
        if body is not None:
            sender = asyncio.ensure_future(conn.send_body(stream, body))
            sender.add_done_callback(stream.body_sent)
        try:
            async with asyncio.timeout(rt):
                # A body that fails first (too large, client gone) fails this wait with its
                # own exception (`_Stream.body_sent`).
                await stream.headers_done
        except TimeoutError:
            conn.finish(stream)
            if sender is not None:
                sender.cancel()
            raise UpstreamTimeout(f"no response head from the replica for {rt:g}s",
                                  False) from None
        except BaseException:
            conn.finish(stream)  # RST_STREAM: the client reset, or the body failed
            if sender is not None and not sender.done():
                sender.cancel()
            raise
        return H2Response(stream)

    def close(self) -> None:
        """Close every connection."""
        for conns in self._conns.values():
            for c in conns:
                if c.transport is not None:
                    c.transport.close()
        self._conns.clear()


def _split_lines(lines: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    for line in lines.split(b"\r\n"):
        if line:
            name, _, value = line.partition(b":")
            out.append((name.strip(), value))
    return out


def request_headers(method: str, target: str, scheme: str, default_host: str,
                    head: UpstreamHead, extra: bytes = b"") -> list[tuple[bytes, bytes]]:
    """HTTP/2 request headers from the head the pipeline built (its pairs, else one
    `Name: value` line each) and `extra` lines of this try (its traceparent): pseudo-headers
    first, Host as :authority, names lower-cased, values trimmed, connection-specific ones
    dropped, secrets and per-request values never indexed (`NOT_INDEXED`), and `te: trailers`
    for gRPC (its servers require it). h2's own outbound checks are off (`_REPLICA_HOP`):
    the client's fields were checked by the front that took them (h2 or llhttp)."""
    authority = default_host.encode()
    pairs: list[tuple[bytes, bytes]] = []
    grpc = False
    given = head.pairs
    if given is None:
        given = _split_lines(b"".join(head.pieces))
    if extra:
        given = [*given, *_split_lines(extra)]
    for name, value in given:
        low = name.lower()
        value = value.strip(b" \t")
        if low == b"host":
            authority = value
            continue
        if low in _DROP:
            continue
        if low == b"content-type" and value.startswith(b"application/grpc"):
            grpc = True
        pairs.append(hpack.NeverIndexedHeaderTuple(low, value) if low in NOT_INDEXED
                     else (low, value))
    out = [(b":method", method.encode()), (b":scheme", scheme.encode()),
           (b":authority", authority), (b":path", target.encode("utf-8", "surrogateescape"))]
    out.extend(pairs)
    if grpc:
        out.append((b"te", b"trailers"))
    return out
