"""The HTTP/1.1 front on aiohttp's low-level server: a request view over aiohttp's request and
the response writer (one-write small answers, header rules, gzip, streaming, WebSockets)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from http import HTTPStatus
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict
from yarl import URL

from edgeproxy.clients.upstream import UpstreamError
from edgeproxy.core import headers as h
from edgeproxy.proxy.errors import error_response
from edgeproxy.proxy.exchange import (
    Exchange,
    LocalAnswer,
    Refusal,
    ReplicaResponse,
    answer_headers,
    encoded_body,
)
from edgeproxy.proxy.pipeline import Proxy, UpstreamFailed
from edgeproxy.proxy.requestcheck import check_http1
from edgeproxy.routes.model import Route, RouteSpec, Upstream

_WRITE_WAIT = 64 * 1024  # unsent bytes past which a small answer waits for the client
_EMPTY_BODY = frozenset((204, 304))
_BUFFER_SMALL = 64 * 1024  # an answer up to this size is read whole before its head is sent


def http1_handler(proxy: Proxy[web.StreamResponse], session: aiohttp.ClientSession,
                  ws_max_message: int) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
    """aiohttp's request handler: each request goes through the pipeline with this front."""
    run = proxy.run

    def handle(request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        # What llhttp lets through and HTTP/1.1 does not allow (HTTP/2.0 request lines,
        # Transfer-Encoding other than chunked, bad WebSocket handshakes) is refused up front.
        return run(Http1Request(request, session, ws_max_message),
                   check_http1(request.version, request.headers, request.method))

    return handle


class Http1Request:
    """One HTTP/1.x request: the pipeline's view of it and the writer of its answer."""

    __slots__ = (
        "_request",
        "_session",
        "_ws_max",
        "content_length",
        "has_body",
        "headers",
        "method",
        "peer",
        "protocol",
        "raw_headers",
        "secure",
        "target",
    )

    def __init__(self, request: web.BaseRequest, session: aiohttp.ClientSession,
                 ws_max_message: int) -> None:
        self._request = request
        self._session = session
        self._ws_max = ws_max_message
        self.method = request.method
        self.target = request.raw_path
        self.headers = request.headers
        self.raw_headers = request.raw_headers
        version = request.version
        self.protocol = "HTTP/1.1" if version == (1, 1) else f"HTTP/{version[0]}.{version[1]}"
        # Read here once: each is a property of aiohttp's, and the pipeline reads some twice.
        self.peer: str | None = request.remote
        self.secure: bool = request.secure
        self.has_body: bool = request.body_exists
        self.content_length: int | None = request.content_length

    # --- RequestView ---------------------------------------------------------------------------

    @property
    def view(self) -> Http1Request:
        return self

    async def body(self) -> AsyncIterator[bytes]:
        request = self._request
        if request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        async for chunk in request.content.iter_any():  # what arrived, no re-slicing
            yield chunk

    # --- Front ---------------------------------------------------------------------------------

    def refuse(self, refusal: Refusal, ex: Exchange) -> web.StreamResponse:
        ex.status = refusal.status
        request = self._request
        if request.version[0] != 1:
            return _refuse_in_http11(request, refusal, ex)
        resp = error_response(refusal.status, refusal.code, refusal.message, ex.rid,
                              dict(refusal.headers) if refusal.headers else None)
        ex.finish(resp.headers)
        if refusal.headers and refusal.headers.get("Connection") == "close":
            resp.force_close()  # nothing after this answer on the connection is read
        return resp

    def answer(self, answer: LocalAnswer, ex: Exchange) -> web.StreamResponse:
        ex.status = answer.status
        resp = web.Response(status=answer.status, reason=answer.reason,
                            body=answer.body or None, headers=answer.headers,
                            content_type=answer.content_type)
        resp.headers["X-Request-ID"] = ex.rid
        ex.finish(resp.headers)
        return resp

    async def relay(self, resp: ReplicaResponse, spec: RouteSpec,
                    ex: Exchange) -> web.StreamResponse:
        """Write the replica's answer to the client: one write when small and unchanged,
        else through aiohttp with header rules and compression, streaming the body."""
        request = self._request
        method = self.method
        status = resp.status
        ex.status = status
        whole = None if spec.compress else resp.complete_body()
        length = resp.content_length
        if (whole is None and not spec.compress and method != "HEAD" and length is not None
                and length <= _BUFFER_SMALL and status not in _EMPTY_BODY):
            # A small answer whose body is still on its way is read whole before anything is
            # sent: a replica that dies between its head and its body (a rolling update) then
            # costs a retry on another replica, not a broken answer to the client.
            whole = await _read_whole(resp)
        extra = ex.extra_headers
        if (whole is not None and not spec.response_headers and method != "HEAD"
                and status not in _EMPTY_BODY and not (extra and "Vary" in extra)
                and resp.content_length in (None, len(whole))):
            # The common case: a small answer is all here and nothing rewrites its headers.
            # Serialise head and body straight from the replica's bytes in one write.
            # Written here, not in a coroutine of its own; it waits only if the client does
            # not read.
            keep_alive = request.keep_alive
            transport = request.transport
            if transport is None or transport.is_closing():
                ex.error = "client_aborted"
                return _Written(status, False)
            transport.write(h.response_head(
                request.version, status, resp.reason, resp.raw_headers, ex.rid, extra,
                len(whole), keep_alive) + whole)
            if transport.get_write_buffer_size() > _WRITE_WAIT:
                try:
                    await request.writer.drain()
                except ConnectionError:
                    ex.error = "client_aborted"
                    return _Written(status, False)
            ex.bytes = len(whole)
            return _Written(status, keep_alive)
        headers, gzip = answer_headers(resp.raw_headers, ex, spec.compress, method, status,
                                       request.headers.get("Accept-Encoding", ""),
                                       resp.content_length)
        if whole is None and spec.compress and not gzip:
            whole = resp.complete_body()
        if whole is not None and method != "HEAD" and (
                resp.content_length is None or resp.content_length == len(whole)):
            # Small response already here, headers rewritten: one write for head and body.
            ex.bytes = len(whole)
            return web.Response(status=status, reason=resp.reason, body=whole, headers=headers)
        out = web.StreamResponse(status=status, reason=resp.reason, headers=headers)
        if whole is not None and method == "HEAD":
            if resp.content_length is not None:
                out.content_length = resp.content_length
            return await _send_head(out, request, ex)
        if not gzip and resp.content_length is not None:
            out.content_length = resp.content_length
        failed = resp.failure()
        if failed is not None:
            # The answer already broke off (e.g. shorter than its Content-Length) and no
            # byte of it has reached the client yet: a 502 beats a head we cannot honour.
            detail = failed.detail if isinstance(failed, UpstreamError) else str(failed)
            raise UpstreamFailed("upstream_error", False, detail)
        try:
            await out.prepare(request)
        except ConnectionError:
            ex.error = "client_aborted"
            return out
        sent = 0
        try:
            async for chunk in encoded_body(resp.iter_body(), gzip):
                await out.write(chunk)
                sent += len(chunk)
        except UpstreamError as exc:
            # Headers are out: the only honest signal left is to cut the connection
            # so the client does not take a truncated body for a whole one.
            ex.bytes = sent
            ex.error = "upstream_aborted: " + exc.code
            if request.transport is not None:
                request.transport.abort()
            return out
        except ConnectionError:
            ex.bytes = sent
            ex.error = "client_aborted"
            return out
        ex.bytes = sent
        await out.write_eof()
        return out

    async def websocket(self, route: Route, upstream: Upstream, target: str,
                        headers: CIMultiDict[str], ex: Exchange) -> web.StreamResponse:
        """Upgrade both sides and pump messages until either closes."""
        request = self._request
        protocols = [p.strip() for v in request.headers.getall("Sec-WebSocket-Protocol", ())
                     for p in v.split(",") if p.strip()]
        limit = self._ws_max
        # No permessage-deflate towards the client: a tiny compressed frame could inflate to
        # gigabytes before the size limit saw it.
        ws = web.WebSocketResponse(autoclose=False, autoping=False, max_msg_size=limit,
                                   compress=False)
        if not ws.can_prepare(request).ok:  # a malformed handshake: refuse before upstream
            return self.refuse(Refusal(400, "bad_websocket_handshake",
                                       "the WebSocket upgrade request is malformed"), ex)
        for name in list(headers):
            if name.lower().startswith("sec-websocket-"):
                del headers[name]
        path, _, query = target.partition("?")
        scheme = "wss" if upstream.scheme == "https" else "ws"
        url = URL.build(scheme=scheme, host=upstream.host, port=upstream.port, path=path,
                        query_string=query, encoded=True)
        try:
            up = await self._session.ws_connect(url, headers=headers, protocols=protocols,
                                                autoclose=False, autoping=False,
                                                max_msg_size=limit, compress=0)
        except aiohttp.WSServerHandshakeError as exc:
            return self.refuse(Refusal(502, "upstream_websocket_refused",
                                       f"replica of route {route.name!r} refused the WebSocket "
                                       f"upgrade with {exc.status}"), ex)
        except aiohttp.ClientError as exc:
            return self.refuse(Refusal(502, "upstream_unreachable",
                                       f"replica of route {route.name!r} unreachable: "
                                       f"{type(exc).__name__}"), ex)
        except TimeoutError:
            return self.refuse(Refusal(504, "upstream_timeout",
                                       f"replica of route {route.name!r} timed out"), ex)
        ws = web.WebSocketResponse(protocols=[up.protocol] if up.protocol else (),
                                   autoclose=False, autoping=False, max_msg_size=limit,
                                   compress=False)
        ws.headers["X-Request-ID"] = ex.rid
        if ex.extra_headers:
            ws.headers.update(ex.extra_headers)
        ex.status = 101
        try:
            await ws.prepare(request)
            await _pump_both(ws, up)
        finally:
            await up.close()
            if not ws.closed:
                await ws.close()
        return ws


async def _read_whole(resp: ReplicaResponse) -> bytes:
    """The rest of a small answer's body; UpstreamFailed (nothing sent yet) if it breaks off."""
    chunks: list[bytes] = []
    try:
        async for chunk in resp.iter_body():
            chunks.append(chunk)
    except UpstreamError as exc:
        raise UpstreamFailed("upstream_error", False, exc.detail) from None
    return b"".join(chunks)


class _Written(web.StreamResponse):
    """A response whose head and body are already on the wire (see `relay`).

    aiohttp's request loop still calls prepare() and write_eof() and then reads keep_alive;
    there is nothing left for them to do."""

    def __init__(self, status: int, keep_alive: bool) -> None:
        # StreamResponse.__init__'s fields without its keyword call and reason lookup (one
        # of these per small answer): nothing reads the reason of an answer already sent.
        self._state = {}
        self._headers = CIMultiDict()
        self._status = status
        self._reason = ""
        self._written_keep_alive = keep_alive

    @property
    def prepared(self) -> bool:
        return True

    @property
    def keep_alive(self) -> bool:
        return self._written_keep_alive

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


def _refuse_in_http11(request: web.BaseRequest, refusal: Refusal,
                      ex: Exchange) -> web.StreamResponse:
    """A refusal of a request in another version (HTTP/2.0), written in HTTP/1.1 and closed:
    aiohttp would answer in the request's version ("HTTP/2.0 505")."""
    body = json.dumps({"error": {"status": refusal.status, "code": refusal.code,
                                 "message": refusal.message, "request_id": ex.rid}}).encode()
    head = (f"HTTP/1.1 {refusal.status} {HTTPStatus(refusal.status).phrase}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"X-Request-ID: {ex.rid}\r\nCache-Control: no-store\r\nConnection: close\r\n"
            "\r\n").encode()
    transport = request.transport
    if transport is not None and not transport.is_closing():
        transport.write(head + body)
    return _Written(refusal.status, False)


async def _send_head(out: web.StreamResponse, request: web.BaseRequest,
                     ex: Exchange) -> web.StreamResponse:
    try:
        await out.prepare(request)
        await out.write_eof()
    except ConnectionError:
        ex.error = "client_aborted"
    return out


WS = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


async def _pump(src: WS, dst: WS) -> None:
    # receive(), not `async for`: iteration ends before yielding CLOSE, losing its code/reason.
    while True:
        msg = await src.receive()
        if msg.type == WSMsgType.TEXT:
            await dst.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await dst.send_bytes(msg.data)
        elif msg.type == WSMsgType.PING:
            await dst.ping(msg.data)
        elif msg.type == WSMsgType.PONG:
            await dst.pong(msg.data)
        elif msg.type == WSMsgType.CLOSE:
            await dst.close(code=msg.data or 1000, message=(msg.extra or "").encode())
            return
        else:  # CLOSING, CLOSED, ERROR: the other side is gone without a close frame
            if not dst.closed:
                await dst.close()
            return


async def _pump_both(client: web.WebSocketResponse, up: aiohttp.ClientWebSocketResponse) -> None:
    tasks: list[asyncio.Future[Any]] = [asyncio.ensure_future(_pump(client, up)),
                                        asyncio.ensure_future(_pump(up, client))]
    try:
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        # Give the other direction a moment to deliver the close handshake.
        if pending:
            await asyncio.wait(pending, timeout=2)
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
