"""The HTTP/2 front: an asyncio protocol driving h2's sans-I/O `H2Connection`, one stream object
per request that is both the pipeline's `RequestView` and its `Front` (the answer writer).

Flow control is honoured both ways, so a slow peer never makes the proxy buffer without bound:
a request body is acknowledged (WINDOW_UPDATE) only as the pipeline forwards it to the replica,
and a response body is read from the replica only as fast as the client's window opens.

The known HTTP/2 attacks are bounded per connection (see `H2Limits`): rapid reset
(CVE-2023-44487), CONTINUATION floods (a header block is bounded before it is decoded), HPACK
bombs (max header list size), SETTINGS/PING floods and too many concurrent streams.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import quote

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.settings
import hpack
from aiohttp import web
from hyperframe.frame import GoAwayFrame
from multidict import CIMultiDict, CIMultiDictProxy

from edgeproxy.clients.upstream import UpstreamError
from edgeproxy.clients.upstream_h2 import (
    CONNECTION_SPECIFIC,
    NOT_INDEXED,
    GracefulH2Connection,
    UpstreamReset,
)
from edgeproxy.core import headers as h
from edgeproxy.core.logs import get_logger
from edgeproxy.core.settings import Settings
from edgeproxy.proxy.exchange import (
    Exchange,
    LocalAnswer,
    Refusal,
    ReplicaResponse,
    answer_headers,
    encoded_body,
)
from edgeproxy.proxy.pipeline import Proxy, UpstreamFailed
from edgeproxy.routes.model import Route, RouteSpec, Upstream

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_EMPTY_BODY = frozenset((204, 304))
_events = get_logger("http2")

# gRPC status codes (grpc/doc/statuscodes.md) for the proxy's own refusals, by HTTP status; the
# README's error table has the same column.
GRPC_BY_STATUS = {
    400: 3,  # INVALID_ARGUMENT: bad_path, bad_target, bad_request, bad_rewrite, bad_host, ...
    401: 16,  # UNAUTHENTICATED: invalid_token, invalid_credentials
    403: 7,  # PERMISSION_DENIED: insufficient_scope, ip_forbidden, host_not_allowed
    404: 12,  # UNIMPLEMENTED: no_route (as a gRPC server answers an unknown method)
    408: 4,  # DEADLINE_EXCEEDED: request_timeout, client_timeout
    413: 8,  # RESOURCE_EXHAUSTED: body_too_large
    414: 8,  # RESOURCE_EXHAUSTED: uri_too_long
    429: 8,  # RESOURCE_EXHAUSTED: rate_limited
    431: 8,  # RESOURCE_EXHAUSTED: header_too_large
    500: 13,  # INTERNAL: internal_error
    501: 12,  # UNIMPLEMENTED: unsupported_transfer_encoding (HTTP/1 only)
    502: 14,  # UNAVAILABLE: upstream_unreachable, upstream_error, upstream_tls_error
    503: 14,  # UNAVAILABLE: no_replica, auth_unavailable, auth_busy, ratelimit_unavailable
    504: 4,  # DEADLINE_EXCEEDED: upstream_timeout
}


def grpc_status_of(refusal: Refusal) -> int:
    """The gRPC status a gRPC client gets for one of the proxy's refusals."""
    return GRPC_BY_STATUS.get(refusal.status, 2)  # 2: UNKNOWN


def is_grpc(headers: h.Headers) -> bool:
    """A gRPC request (content-type application/grpc, +proto, +json, ...)."""
    return headers.get("content-type", "").startswith("application/grpc")


@dataclass(frozen=True, slots=True)
class H2Limits:
    """Per-connection bounds of the HTTP/2 front (the EDGEPROXY_H2_* settings)."""

    max_concurrent_streams: int = 128  # nginx http2_max_concurrent_streams
    max_header_list_size: int = 60 * 1024  # Envoy max_request_headers_kb (60)
    max_resets: int = 256  # client RST_STREAMs per second: 2x streams, as nginx's fix bounds
    max_control_frames: int = 1000  # PING + SETTINGS per second: Envoy's control frame cap
    idle_timeout: float = 75.0  # nginx keepalive_timeout: no stream open for this long
    header_timeout: float = 30.0  # the preface and first request must come within this long
    initial_window: int = 65535  # per stream, the RFC default (nginx preread is 64k)


class _HeaderBlockTooLarge(h2.exceptions.DenialOfServiceError):
    """A HEADERS + CONTINUATION block grew past the limit before it could be decoded."""


class _BoundedFrameBuffer(h2.frame_buffer.FrameBuffer):
    """h2's frame buffer, refusing a header block over `limit` bytes while it accumulates.

    h2 itself caps a block at 64 CONTINUATION frames of up to 16 KiB each (1 MiB held, then
    decoded); this stops a CONTINUATION flood at the header-list limit instead."""

    def __init__(self, limit: int) -> None:
        super().__init__(server=True)
        self._limit = limit
        self._block = 0

    def _update_header_buffer(self, f: Any) -> Any:
        out = super()._update_header_buffer(f)
        pending = self._headers_buffer
        if pending:
            self._block = sum(len(x.data) for x in pending)
            if self._block > self._limit:
                raise _HeaderBlockTooLarge(
                    f"header block over {self._limit} bytes before END_HEADERS")
        return out


class _AnnouncedSettings(h2.settings.Settings):
    """Our SETTINGS as h2 sends them, except that h2 does not enforce MAX_CONCURRENT_STREAMS.

    h2 answers a stream over the limit with a connection error (TooManyStreamsError: GOAWAY
    PROTOCOL_ERROR), failing every other stream in flight on that connection. H2Connection
    refuses just the excess stream with REFUSED_STREAM instead (RFC 9113 5.1.2, as nginx and
    Envoy do), which a client may retry safely: no work was done."""

    @property
    def max_concurrent_streams(self) -> int:
        return 2**31 - 1  # the largest stream count h2 could ever see: no check of its own

    @max_concurrent_streams.setter
    def max_concurrent_streams(self, value: int) -> None:
        self[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = value


# The client hop: h2 validates every request head it decodes (RFC 9113 8.2 and 8.3: field
# names and values, pseudo-headers, connection-specific fields, TE, Host vs :authority), as an
# edge must. Its other passes are ours instead: cookies are joined in `H2Stream`, and the answer
# heads the proxy writes are normalised and checked in `_pairs` (h2 would walk every byte of
# every field in Python, twice, for heads built from already-parsed data).
_CLIENT_HOP = h2.config.H2Configuration(
    client_side=False, header_encoding=None, validate_inbound_headers=True,
    normalize_inbound_headers=False, validate_outbound_headers=False,
    normalize_outbound_headers=False)


class H2Connection(asyncio.Protocol):
    """One client connection speaking HTTP/2; every request stream runs through the pipeline."""

    def __init__(self, run: Callable[[H2Stream], Coroutine[Any, Any, None]], secure: bool,
                 limits: H2Limits, registry: set[H2Connection] | None = None) -> None:
        self._run = run
        self.secure = secure
        self.limits = limits
        self._registry = registry
        self.transport: asyncio.Transport | None = None
        self.peer: str | None = None
        self.h2 = GracefulH2Connection(config=_CLIENT_HOP)
        self.streams: dict[int, H2Stream] = {}
        self.closed = False
        self.draining = False
        self._paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        # Times of recent client resets and control frames, for the per-second limits.
        self._resets: collections.deque[float] = collections.deque()
        self._controls: collections.deque[float] = collections.deque()
        self._idle: asyncio.TimerHandle | None = None
        self._seen_request = False
        self._flush_pending = False

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else None
        limits = self.limits
        conn = self.h2
        conn.local_settings = _AnnouncedSettings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: limits.initial_window,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        })
        # Until the client acknowledges our SETTINGS, h2 would decode with its own 64 KiB.
        conn.decoder.max_header_list_size = limits.max_header_list_size
        conn.incoming_buffer = _BoundedFrameBuffer(limits.max_header_list_size)
        conn.initiate_connection()
        # The connection window is shared by every stream: open it to streams x stream window
        # so one stream whose replica reads slowly does not stall the others.
        extra = limits.max_concurrent_streams * limits.initial_window - 65535
        if extra > 0:
            conn.increment_flow_control_window(extra)
        self.flush()
        if self._registry is not None:
            self._registry.add(self)
        self._arm_idle(limits.header_timeout)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            # h2 queued a GOAWAY with the error's code (ENHANCE_YOUR_CALM for floods).
            _events.info("h2_connection_error", peer=self.peer, error=str(exc),
                         code=getattr(exc, "error_code", None))
            self.flush()
            self._close()
            return
        for event in events:
            self._dispatch(event)
            if self.closed:
                return
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._close()
        for stream in list(self.streams.values()):
            stream.lost()
        self.streams.clear()
        self._wake_drain(error=True)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_drain()

    # --- events ---------------------------------------------------------------------------------

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._request(event)
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is None:  # a stream we already answered or reset: give the window back
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            else:
                stream.feed(event.data or b"", event.flow_controlled_length)
        elif isinstance(event, (h2.events.StreamEnded, h2.events.TrailersReceived)):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.feed_end()
        elif isinstance(event, h2.events.StreamReset):
            self._reset(event)
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.pump()
            else:  # the connection's window: only streams with something waiting for it
                for stream in [s for s in self.streams.values() if s.unsent]:
                    stream.pump()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._control()
            if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                for stream in [s for s in self.streams.values() if s.unsent]:
                    stream.pump()
        elif isinstance(event, h2.events.PingReceived):
            self._control()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.draining = True  # the client's GOAWAY: streams it has sent still get answers
            if not self.streams:
                self.flush()
                self._close()

    def _request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        if self.draining:
            self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        if self._over_stream_limit(stream_id):
            self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            # A stream opened only to be refused costs what a reset one does: a client that
            # keeps doing it spends the same per-second budget as rapid reset.
            self._count_reset("refused_streams")
            return
        self._seen_request = True
        self._disarm_idle()
        stream = H2Stream(self, stream_id, event.headers or [],
                          ended=event.stream_ended is not None)
        self.streams[stream_id] = stream
        stream.task = asyncio.ensure_future(self._serve(stream))

    def _over_stream_limit(self, stream_id: int) -> bool:
        """The client already has the most concurrent streams open without this one: open and
        half-closed ones count (RFC 9113 5.1.2), as h2 tracks them, but only those before it,
        since h2 has already opened the later streams of the same read."""
        limit = self.limits.max_concurrent_streams
        streams = self.h2.streams  # closed ones are purged as each HEADERS frame arrives
        if len(streams) <= limit:
            return False
        return sum(1 for sid, st in streams.items()
                   if sid < stream_id and sid % 2 and st.open) >= limit

    async def _serve(self, stream: H2Stream) -> None:
        try:
            await self._run(stream)
        except asyncio.CancelledError:
            pass
        finally:
            self._finished(stream)

    def _reset(self, event: h2.events.StreamReset) -> None:
        stream = self.streams.pop(event.stream_id, None)
        if stream is not None:
            stream.cancel()
        if event.remote_reset:
            self._count_reset("rapid_reset")
        if not self.streams:
            self._became_idle()

    def _count_reset(self, kind: str) -> None:
        """One more stream reset by the client, or refused over the concurrent-stream limit;
        past `max_resets` in one second the connection ends (h2_abuse `kind`)."""
        now = time.monotonic()
        resets = self._resets
        resets.append(now)
        while resets and resets[0] < now - 1.0:
            resets.popleft()
        if len(resets) > self.limits.max_resets:
            self._abuse(kind, f"more than {self.limits.max_resets} streams reset by the client "
                        "or refused over the concurrent-stream limit in one second")

    def _control(self) -> None:
        now = time.monotonic()
        controls = self._controls
        controls.append(now)
        while controls and controls[0] < now - 1.0:
            controls.popleft()
        if len(controls) > self.limits.max_control_frames:
            self._abuse("control_flood", f"more than {self.limits.max_control_frames} PING or "
                        "SETTINGS frames in one second")

    def _abuse(self, kind: str, detail: str) -> None:
        """GOAWAY ENHANCE_YOUR_CALM and close: the client is attacking the proxy."""
        _events.warning("h2_abuse", kind=kind, peer=self.peer, detail=detail)
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.close_connection(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        self.flush()
        self._close()

    def _finished(self, stream: H2Stream) -> None:
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
            if not stream.sent_end and not self.closed:
                # The pipeline returned without ending the stream (client went away, a bug).
                with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
                    self.h2.reset_stream(stream.stream_id, h2.errors.ErrorCodes.CANCEL)
                self.flush()
        if not self.streams:
            self._became_idle()

    def _became_idle(self) -> None:
        if self.draining and not self.closed:
            self.flush()
            self._close()
        elif not self.closed:
            self._arm_idle(self.limits.idle_timeout)

    # --- idle and shutdown ----------------------------------------------------------------------

    def _arm_idle(self, seconds: float) -> None:
        self._disarm_idle()
        if seconds > 0:
            self._idle = asyncio.get_running_loop().call_later(seconds, self._idle_expired)

    def _disarm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _idle_expired(self) -> None:
        self._idle = None
        if not self.streams and not self.closed:
            self.goaway()

    def goaway(self) -> None:
        """Tell the client no new streams are taken; close once the open ones are answered."""
        if self.closed:
            return
        self.draining = True
        # Written by hand: h2's close_connection() would also close its state machine, and
        # the streams still open could not be answered (RFC 9113 6.8 says they may be).
        frame = GoAwayFrame(0, last_stream_id=self.h2.highest_inbound_stream_id,
                            error_code=h2.errors.ErrorCodes.NO_ERROR)
        self.flush_now()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame.serialize())
        if not self.streams:
            self._close()

    def abort(self) -> None:
        """Cut the connection (the drain timeout passed)."""
        if self.transport is not None:
            self.transport.abort()
        self._close()

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._disarm_idle()
        if self._registry is not None:
            self._registry.discard(self)
        self.flush_now()  # what h2 queued last (a GOAWAY with its code) goes out first
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # --- writing --------------------------------------------------------------------------------

    def flush(self) -> None:
        """Write what h2 has queued, once at the end of this pass of the event loop: every
        stream answered in the same pass (and the window updates of one read) share one TLS
        record and one send instead of one each."""
        if not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self.flush_now)

    def flush_now(self) -> None:
        """Write what h2 has queued, now (before a close or a frame written by hand)."""
        self._flush_pending = False
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the client's socket buffer is full (it reads slower than we write)."""
        if not self._paused or self.closed:
            return
        fut = asyncio.get_running_loop().create_future()
        self._drain_waiters.append(fut)
        await fut

    def _wake_drain(self, error: bool = False) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                if error:
                    w.set_exception(ConnectionResetError("client connection lost"))
                    w.exception()
                else:
                    w.set_result(None)


def _decode(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


class H2Stream:
    """One request stream: the pipeline's `RequestView` of it and the `Front` writing its answer."""

    protocol = "HTTP/2"

    def __init__(self, conn: H2Connection, stream_id: int,
                 header_list: list[tuple[bytes, bytes]], ended: bool) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.task: asyncio.Future[None] | None = None
        method = target = authority = b""
        raw: list[tuple[bytes, bytes]] = []
        cookies: list[bytes] = []
        for name, value in header_list:
            if name.startswith(b":"):
                if name == b":method":
                    method = value
                elif name == b":path":
                    target = value
                elif name == b":authority":
                    authority = value
            elif name == b"cookie":
                cookies.append(value)  # HTTP/2 splits cookies; an HTTP/1 replica wants one
            elif name == b"host":
                if not authority:
                    authority = value
            else:
                raw.append((name, value))
        if authority:
            raw.insert(0, (b"host", authority))  # :authority is the Host (RFC 9113 8.3.1)
        if cookies:
            raw.append((b"cookie", b"; ".join(cookies)))
        self.method = method.decode("latin-1")
        self.target = _decode(target)
        self.raw_headers: list[tuple[bytes, bytes]] = raw
        self.headers = CIMultiDictProxy(CIMultiDict(
            [(n.decode("latin-1"), _decode(v)) for n, v in raw]))
        self.has_body = not ended
        length = self.headers.get("content-length")
        self.content_length = int(length) if length is not None and length.isdigit() else None
        self.grpc = is_grpc(self.headers)
        # Request body: chunks with their flow-controlled sizes, acknowledged as consumed.
        self._body: list[tuple[bytes, int]] = []
        self._body_ended = ended
        self._body_waiter: asyncio.Future[None] | None = None
        self._reset = False
        # Response: what waits for the client's window.
        self._out = bytearray()
        self._out_end = False
        self._out_trailers: list[tuple[bytes, bytes]] | None = None
        self._out_waiter: asyncio.Future[None] | None = None
        self.sent_headers = False
        self.sent_end = False

    # --- RequestView ----------------------------------------------------------------------------

    @property
    def view(self) -> H2Stream:
        return self

    @property
    def peer(self) -> str | None:
        return self.conn.peer

    @property
    def secure(self) -> bool:
        return self.conn.secure

    async def body(self) -> AsyncIterator[bytes]:
        while True:
            if self._body:
                data, flow = self._body.pop(0)
                if data:
                    yield data
                # The replica took it (the pipeline asks for the next chunk only after
                # writing this one): only now may the client send more.
                self._ack(flow)
                continue
            if self._body_ended:
                return
            if self._reset:
                raise ConnectionResetError("the client reset the stream")
            self._body_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._body_waiter
            finally:
                self._body_waiter = None

    def _ack(self, flow: int) -> None:
        conn = self.conn
        if flow and not conn.closed and not self._reset:
            with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
                conn.h2.acknowledge_received_data(flow, self.stream_id)
                conn.flush()

    # --- fed by the connection ------------------------------------------------------------------

    def feed(self, data: bytes, flow: int) -> None:
        self._body.append((data, flow))
        self._wake_body()

    def feed_end(self) -> None:
        self._body_ended = True
        self._wake_body()

    def _wake_body(self) -> None:
        w = self._body_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def cancel(self) -> None:
        """The client reset the stream: stop the pipeline (and the replica's stream with it)."""
        self._reset = True
        self._wake_body()
        self._wake_out(error=True)
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def lost(self) -> None:
        """The connection is gone."""
        self.cancel()

    # --- writing --------------------------------------------------------------------------------

    def _send_headers(self, status: int, pairs: list[tuple[bytes, bytes]], end: bool) -> None:
        conn = self.conn
        if self._reset or conn.closed:
            raise ConnectionResetError("the stream is closed")
        out = [(b":status", b"%d" % status), *pairs]
        conn.h2.send_headers(self.stream_id, out, end_stream=end)
        self.sent_headers = True
        if end:
            self.sent_end = True
        conn.flush()

    def _queue(self, data: bytes, end: bool = False,
               trailers: list[tuple[bytes, bytes]] | None = None) -> None:
        self._out += data
        if end:
            self._out_end = True
            self._out_trailers = trailers
        self.pump()

    @property
    def unsent(self) -> bool:
        """Part of the answer (or its end) still waits for the client's window."""
        return bool(self._out) or (self._out_end and not self.sent_end)

    def pump(self) -> None:
        """Send what the client's window allows; end the stream once all is sent."""
        conn = self.conn
        if self._reset or conn.closed or self.sent_end:
            self._wake_out()
            return
        out = self._out
        try:
            while out:
                window = conn.h2.local_flow_control_window(self.stream_id)
                if window <= 0:
                    break
                n = min(window, conn.h2.max_outbound_frame_size, len(out))
                # The last piece carries END_STREAM itself: one frame less per answer.
                last = n == len(out) and self._out_end and not self._out_trailers
                conn.h2.send_data(self.stream_id, bytes(out[:n]), end_stream=last)
                del out[:n]
                if last:
                    self.sent_end = True
            if not out and self._out_end and not self.sent_end:
                if self._out_trailers:
                    conn.h2.send_headers(self.stream_id, self._out_trailers, end_stream=True)
                else:
                    conn.h2.end_stream(self.stream_id)
                self.sent_end = True
        except (h2.exceptions.ProtocolError, KeyError):  # the stream closed under us
            self._reset = True
        conn.flush()
        if not out:
            self._wake_out()

    def _wake_out(self, error: bool = False) -> None:
        w = self._out_waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _write(self, data: bytes, end: bool = False,
                     trailers: list[tuple[bytes, bytes]] | None = None) -> None:
        """Queue a body chunk (with `end`, the last one, then `trailers`) and wait until the
        client's window took it all: the pipeline must not finish the stream (which resets
        one not ended) while part of its answer still waits for the client's window."""
        self._queue(data, end, trailers)
        while self.unsent and not self._reset and not self.conn.closed:
            self._out_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._out_waiter
            finally:
                self._out_waiter = None
        if self._reset or self.conn.closed:
            raise ConnectionResetError("the client reset the stream")
        await self.conn.drain()

    def _small_answer(self, status: int, headers: CIMultiDict[str], body: bytes) -> None:
        pairs = _pairs(headers)
        if body and self.method != "HEAD" and status not in _EMPTY_BODY:
            pairs.append((b"content-length", b"%d" % len(body)))
            self._send_headers(status, pairs, end=False)
            self._queue(body, end=True)
        else:
            self._send_headers(status, pairs, end=True)

    # --- Front ----------------------------------------------------------------------------------

    def refuse(self, refusal: Refusal, ex: Exchange) -> None:
        ex.status = refusal.status
        hdrs: CIMultiDict[str] = CIMultiDict(refusal.headers or {})
        hdrs.popall("Connection", None)  # a connection-specific header: not in HTTP/2
        hdrs["X-Request-ID"] = ex.rid
        ex.finish(hdrs)
        try:
            if self.grpc:
                # gRPC clients read errors from trailers: HTTP 200, trailers-only.
                status = grpc_status_of(refusal)
                ex.grpc_status = status
                hdrs["content-type"] = "application/grpc"
                hdrs["grpc-status"] = str(status)
                hdrs["grpc-message"] = quote(refusal.message, safe=" !\"#$&'()*+,-./:;<=>?@[]^_`{|}~")
                self._send_headers(200, _pairs(hdrs), end=True)
                return
            body = json.dumps({"error": {"status": refusal.status, "code": refusal.code,
                                         "message": refusal.message,
                                         "request_id": ex.rid}}).encode()
            hdrs["Content-Type"] = "application/json"
            hdrs["Cache-Control"] = "no-store"
            self._small_answer(refusal.status, hdrs, body)
        except (ConnectionResetError, h2.exceptions.ProtocolError):
            ex.error = ex.error or "client_aborted"

    def answer(self, answer: LocalAnswer, ex: Exchange) -> None:
        ex.status = answer.status
        hdrs: CIMultiDict[str] = CIMultiDict(answer.headers)
        if answer.content_type is not None:
            hdrs["Content-Type"] = answer.content_type
        hdrs["X-Request-ID"] = ex.rid
        ex.finish(hdrs)
        try:
            self._small_answer(answer.status, hdrs, answer.body)
            ex.bytes = len(answer.body)
        except (ConnectionResetError, h2.exceptions.ProtocolError):
            ex.error = "client_aborted"

    async def relay(self, resp: ReplicaResponse, spec: RouteSpec, ex: Exchange) -> None:
        """Stream the replica's answer to the client within its flow-control window, with the
        replica's trailers (gRPC's status lives there) at the end."""
        status = resp.status
        ex.status = status
        failed = resp.failure()
        if failed is not None:
            detail = failed.detail if isinstance(failed, UpstreamError) else str(failed)
            raise UpstreamFailed("upstream_error", False, detail)
        extra = ex.extra_headers
        gzip = False
        if not spec.compress and not spec.response_headers and not (extra and "Vary" in extra):
            # The common case: nothing rewrites the replica's head, so it goes from its bytes
            # to the client's without a multidict in between (as HTTP/1.1's response_head).
            pairs = _replica_pairs(resp.raw_headers, ex.rid, extra)
        else:
            headers, gzip = answer_headers(resp.raw_headers, ex, spec.compress, self.method,
                                           status, self.headers.get("Accept-Encoding", ""),
                                           resp.content_length)
            try:
                pairs = _pairs(headers)
            except BadHeader as exc:  # nginx: "upstream sent invalid header", 502
                raise UpstreamFailed("upstream_error", False, str(exc)) from None
        if not gzip and resp.content_length is not None:
            pairs.append((b"content-length", b"%d" % resp.content_length))
        bodiless = self.method == "HEAD" or status in _EMPTY_BODY
        if self.grpc:  # trailers-only answers carry grpc-status in the head
            ex.grpc_status = _grpc_status(resp.raw_headers)
        whole = None if gzip or bodiless else resp.complete_body()
        trailers = resp.trailers
        try:
            if bodiless:
                self._send_headers(status, pairs, end=True)
                return
            if whole is not None:
                # All of it is here (a small answer, a unary gRPC call): head, body and
                # trailers go out in this pass, waiting only if the client's window is short.
                end = not whole and not trailers
                self._send_headers(status, pairs, end=end)
                if self.grpc:
                    ex.grpc_status = _grpc_status(trailers or resp.raw_headers)
                if not end:
                    await self._write(whole, end=True, trailers=_lower(trailers))
                ex.bytes = len(whole)
                return
            self._send_headers(status, pairs, end=False)
        except (ConnectionResetError, h2.exceptions.ProtocolError):
            ex.error = "client_aborted"
            return
        sent = 0
        try:
            async for chunk in encoded_body(resp.iter_body(), gzip):
                await self._write(chunk)
                sent += len(chunk)
            trailers = resp.trailers
            if self.grpc:
                ex.grpc_status = _grpc_status(trailers or resp.raw_headers)
            self._queue(b"", end=True, trailers=_lower(trailers))
        except UpstreamError as exc:
            # Headers are out: reset the stream so the client never takes a truncated body
            # (or a gRPC call without its status) for a whole one.
            ex.error = "upstream_aborted: " + exc.code
            # The replica's own RST_STREAM code reaches the client (CANCEL stays CANCEL).
            self.reset(_error_code(exc.error_code) if isinstance(exc, UpstreamReset)
                       else h2.errors.ErrorCodes.INTERNAL_ERROR)
        except ConnectionResetError:
            ex.error = "client_aborted"
        ex.bytes = sent

    def reset(self, code: h2.errors.ErrorCodes) -> None:
        """RST_STREAM towards the client."""
        conn = self.conn
        if self._reset or conn.closed or self.sent_end:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
            conn.h2.reset_stream(self.stream_id, code)
        self.sent_end = True
        conn.flush()

    async def websocket(self, route: Route, upstream: Upstream, target: str,
                        headers: CIMultiDict[str], ex: Exchange) -> None:
        """WebSockets over HTTP/2 (RFC 8441) are not offered: SETTINGS_ENABLE_CONNECT_PROTOCOL
        stays off, so a client never gets here; refuse if one tries anyway."""
        self.refuse(Refusal(400, "bad_websocket_handshake",
                            "WebSockets are served over HTTP/1.1 only"), ex)


def _error_code(code: int) -> h2.errors.ErrorCodes:
    try:
        return h2.errors.ErrorCodes(code)
    except ValueError:  # a code h2 does not know: still an error, not NO_ERROR
        return h2.errors.ErrorCodes.INTERNAL_ERROR


def _lower(trailers: h.RawHeaders | None) -> list[tuple[bytes, bytes]] | None:
    return [(n.lower(), v) for n, v in trailers] if trailers else None


def _grpc_status(pairs: h.RawHeaders) -> int | None:
    for name, value in pairs:
        if name.lower() == b"grpc-status" and value.isdigit():
            return int(value)
    return None


# Not copied into an answer's head: connection-specific, and our own framing.
_CONNECTION_SPECIFIC_B = CONNECTION_SPECIFIC | {b"content-length"}
_FORBIDDEN_IN_VALUE = re.compile("[\0\r\n]")


class BadHeader(ValueError):
    """A header value HTTP/2 cannot carry (NUL, CR or LF, RFC 9113 8.2.1)."""


def _pairs(headers: CIMultiDict[str]) -> list[tuple[bytes, bytes]]:
    """The answer's header pairs as h2 sends them without its own outbound normalisation and
    validation (both off, see `_CLIENT_HOP`): names lower-cased, connection-specific fields
    dropped, values without surrounding whitespace (an HTTP/1.1 replica's may end in some),
    secrets and per-request values never indexed (`NOT_INDEXED`). A value with NUL, CR or LF
    raises `BadHeader`."""
    out: list[tuple[bytes, bytes]] = []
    for n, v in headers.items():
        low = n.lower().encode("latin-1")
        if low in _CONNECTION_SPECIFIC_B:
            continue
        if _FORBIDDEN_IN_VALUE.search(v) is not None:
            raise BadHeader(f"header {n!r} has a NUL, CR or LF in its value {v!r}; "
                            "expected none (RFC 9113 8.2.1)")
        value = v.strip(" \t").encode("utf-8", "surrogateescape")
        out.append(hpack.NeverIndexedHeaderTuple(low, value) if low in NOT_INDEXED
                   else (low, value))
    return out


_REPLACED = frozenset((b"x-request-id",))  # the replica's is replaced by ours


def _replica_pairs(raw: h.RawHeaders, rid: str,
                   extra: dict[str, str] | None) -> list[tuple[bytes, bytes]]:
    """The client's head for a replica's answer that no rule rewrites, from its bytes: the
    fields `downstream_pairs` keeps (hop-by-hop and Content-Length dropped), names
    lower-cased and values trimmed (an HTTP/1.1 replica's may be neither), then X-Request-ID
    and `extra` (ours, replacing the replica's of the same names). No value holds NUL, CR or
    LF: llhttp refuses them from an HTTP/1.1 replica, `_response_fields` from an HTTP/2 one."""
    ours = [(k.lower().encode("latin-1"), v.encode("utf-8", "surrogateescape"))
            for k, v in extra.items()] if extra else []
    drop = _REPLACED.union(n for n, _ in ours) if ours else _REPLACED
    out: list[tuple[bytes, bytes]] = []
    for name, value in h.downstream_pairs(raw, drop)[0]:
        low = name.lower()
        if low in _CONNECTION_SPECIFIC_B:
            continue
        value = value.strip(b" \t")
        out.append(hpack.NeverIndexedHeaderTuple(low, value) if low in NOT_INDEXED
                   else (low, value))
    out.append(hpack.NeverIndexedHeaderTuple(b"x-request-id", rid.encode()))
    for low, value in ours:
        out.append(hpack.NeverIndexedHeaderTuple(low, value) if low in NOT_INDEXED
                   else (low, value))
    return out


# --- listeners: one port, two protocols ------------------------------------------------------


class _Chooser(asyncio.Protocol):
    """The first protocol of every connection on a listener that serves HTTP/1.1 and HTTP/2:
    after the TLS handshake ALPN decides; on a plain listener with h2c on, the first bytes do
    (the HTTP/2 connection preface, else HTTP/1.1). The chosen protocol then owns the transport."""

    def __init__(self, http1: Callable[[], asyncio.Protocol],
                 http2: Callable[[], H2Connection], tls: bool, first_byte_timeout: float) -> None:
        self._http1 = http1
        self._http2 = http2
        self._tls = tls
        self._timeout = first_byte_timeout
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        self._first = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        if self._tls:
            ssl_object = transport.get_extra_info("ssl_object")
            alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
            self._hand_over(self._http2() if alpn == "h2" else self._http1())
        elif self._timeout > 0:
            # Until the first bytes say which protocol, neither one's own timers run: a
            # connection that sends nothing is cut here (slowloris), as aiohttp's would be.
            self._timer = asyncio.get_running_loop().call_later(self._timeout, transport.close)

    def data_received(self, data: bytes) -> None:
        first = self._first + data
        n = min(len(first), len(PREFACE))
        if first[:n] != PREFACE[:n]:
            self._hand_over(self._http1(), first)
        elif len(first) >= len(PREFACE):
            self._hand_over(self._http2(), first)
        else:
            self._first = first  # a preface split across reads: wait for the rest

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._timer is not None:
            self._timer.cancel()

    def _hand_over(self, protocol: asyncio.Protocol, first: bytes = b"") -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        transport = self._transport
        assert transport is not None  # noqa: S101 - only called while connected
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if first:
            protocol.data_received(first)


class H2Front:
    """What the listeners need to serve HTTP/2: the connection factory and the open
    connections (for a graceful GOAWAY on shutdown)."""

    def __init__(self, run: Callable[[H2Stream], Coroutine[Any, Any, None]],
                 limits: H2Limits) -> None:
        self._run = run
        self.limits = limits
        self.connections = _Connections()

    def protocol(self, secure: bool) -> H2Connection:
        """A new HTTP/2 connection protocol."""
        return H2Connection(self._run, secure, self.limits, self.connections)

    def chooser(self, http1: Callable[[], asyncio.Protocol], tls: bool) -> _Chooser:
        """The protocol that picks HTTP/1.1 or HTTP/2 for a new connection."""
        return _Chooser(http1, lambda: self.protocol(tls), tls, self.limits.header_timeout)

    async def shutdown(self, grace: float) -> None:
        """GOAWAY to every connection; wait up to `grace` seconds for open streams, then cut."""
        for conn in list(self.connections):
            conn.goaway()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self.connections.emptied()
        for conn in list(self.connections):
            conn.abort()


class _Connections(set[H2Connection]):
    """The open HTTP/2 connections; `emptied()` waits until none is left."""

    _waiter: asyncio.Future[None] | None = None

    def discard(self, conn: object) -> None:
        super().discard(conn)
        w = self._waiter
        if not self and w is not None and not w.done():
            w.set_result(None)

    async def emptied(self) -> None:
        if self:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter


class H2Site(web.TCPSite):
    """aiohttp's TCP site whose connections start with `_Chooser`: HTTP/1.1 connections still
    go to aiohttp's handler (and its graceful shutdown), HTTP/2 ones to `H2Connection`."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, front: H2Front, *,
                 ssl_context: ssl.SSLContext | None = None, backlog: int = 128,
                 reuse_port: bool | None = None) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context, backlog=backlog,
                         reuse_port=reuse_port)
        self._front = front

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with the runner
        loop = asyncio.get_running_loop()
        http1 = self._runner.server
        assert http1 is not None  # noqa: S101 - the runner is set up first
        front, tls = self._front, self._ssl_context is not None
        self._server = await loop.create_server(
            lambda: front.chooser(http1, tls), self._host, self._port, ssl=self._ssl_context,
            backlog=self._backlog, reuse_address=self._reuse_address,
            reuse_port=self._reuse_port)


def h2_front(proxy: Proxy[Any], settings: Settings) -> H2Front:
    """The HTTP/2 front of a proxy, with the EDGEPROXY_H2_* limits."""
    # The pipeline is generic in what a front returns; HTTP/2 streams write and return None.
    run = cast("Proxy[None]", proxy).run
    return H2Front(run, H2Limits(
        max_concurrent_streams=settings.h2_max_concurrent_streams,
        max_header_list_size=settings.h2_max_header_list_size,
        max_resets=settings.h2_max_resets,
        max_control_frames=settings.h2_max_control_frames,
        idle_timeout=settings.h2_idle_timeout,
        header_timeout=settings.header_timeout or settings.h2_idle_timeout,
    ))
