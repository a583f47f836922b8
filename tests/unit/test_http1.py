"""edgeproxy.proxy.http1: the HTTP/1.1 front's response writer, in-process over loopback sockets
(aiohttp's low-level server with the pipeline in front of raw asyncio replicas)."""

from __future__ import annotations

import asyncio
import gzip
from typing import Any

from aiohttp import web

from edgeproxy.clients.session import make_session
from edgeproxy.core.settings import Settings
from edgeproxy.proxy.http1 import http1_handler
from edgeproxy.proxy.pipeline import Proxy
from edgeproxy.routes.model import RouteSpec, Upstream
from edgeproxy.routes.table import FileRoute, build_table
from edgeproxy.routes.transform import HeaderRules


async def _replica(answer: bytes) -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _exchange(answer: bytes, request: bytes, **spec: Any) -> bytes:
    """Send `request` through a proxy whose one route's replica answers `answer`."""
    replica, port = await _replica(answer)
    table = build_table([], [FileRoute("app", RouteSpec(**spec),
                                       (Upstream("http", "127.0.0.1", port, "r"),))])
    settings = Settings(access_log=False)
    proxy: Proxy[web.StreamResponse] = Proxy(settings, lambda: table)
    session = make_session(settings)
    server = web.Server(http1_handler(proxy, session, 1 << 20))
    loop = asyncio.get_running_loop()
    front = await loop.create_server(server, "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", front.sockets[0].getsockname()[1])
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)  # every request here says close
        writer.close()
        return data
    finally:
        front.close()
        replica.close()
        proxy.close()
        await session.close()


def run(answer: bytes, request: bytes = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        **spec: Any) -> tuple[bytes, dict[str, list[str]], bytes]:
    raw = asyncio.run(_exchange(answer, request, **spec))
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return lines[0].encode(), headers, body


def test_small_answer_keeps_the_replicas_headers_and_gets_a_request_id() -> None:
    status, headers, body = run(
        b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\nX-Thing: 1\r\nConnection: keep-alive\r\n"
        b"X-Request-ID: forged\r\n\r\nhello")
    assert status == b"HTTP/1.1 201 Created"
    assert (headers["x-thing"], headers["content-length"], body) == (["1"], ["5"], b"hello")
    assert headers["x-request-id"] != ["forged"] and len(headers["x-request-id"]) == 1
    assert headers["connection"] == ["close"]


def test_response_rules_are_applied_to_relayed_answers() -> None:
    rules = HeaderRules.build([("Server", ""), ("X-Frame-Options", "DENY")])
    _, headers, body = run(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nServer: leaky/1.0\r\n\r\nok",
                           response_headers=rules)
    assert headers.get("server", []) != ["leaky/1.0"]
    assert (headers["x-frame-options"], body) == (["DENY"], b"ok")


def test_gzip_compresses_and_marks_vary_and_weak_etag() -> None:
    text = b"a" * 4000
    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nETag: \"v1\"\r\n"
              b"Content-Length: %d\r\n\r\n%b" % (len(text), text))
    request = (b"GET / HTTP/1.1\r\nHost: a\r\nAccept-Encoding: gzip\r\n"
               b"Connection: close\r\n\r\n")
    _, headers, body = run(answer, request, compress=True)
    assert headers["content-encoding"] == ["gzip"]
    assert headers["vary"] == ["Accept-Encoding"] and headers["etag"] == ['W/"v1"']
    raw = body
    if "transfer-encoding" in headers:  # de-chunk
        out, rest = b"", raw
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        raw = out
    assert gzip.decompress(raw) == text


def test_head_answer_keeps_the_length_and_sends_no_body() -> None:
    request = b"HEAD / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    _, headers, body = run(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", request)
    assert (headers["content-length"], body) == (["1234"], b"")


def test_truncated_streamed_body_cuts_the_client_connection() -> None:
    # Headers go out before the body is complete; the replica then vanishes: the client
    # must see fewer bytes than announced (never a complete-looking answer).
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2000000\r\n\r\n" + b"x" * 700_000
    _, headers, body = run(answer)
    assert headers["content-length"] == ["2000000"] and len(body) < 2_000_000


def test_small_answer_cut_before_its_body_is_retried_on_another_replica() -> None:
    # A rolling update: the replica dies between its head and its body. Nothing has reached
    # the client yet, so the GET goes to the next replica instead of a broken answer.
    async def go() -> bytes:
        async def head_then_die(reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.transport.abort()

        dying = await asyncio.start_server(head_then_die, "127.0.0.1", 0)
        good, good_port = await _replica(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh")
        ups = (Upstream("http", "127.0.0.1", dying.sockets[0].getsockname()[1], "dying"),
               Upstream("http", "127.0.0.1", good_port, "good"))
        table = build_table([], [FileRoute("app", RouteSpec(), ups)])
        settings = Settings(access_log=False)
        proxy: Proxy[web.StreamResponse] = Proxy(settings, lambda: table)
        session = make_session(settings)
        front = await asyncio.get_running_loop().create_server(
            web.Server(http1_handler(proxy, session, 1 << 20)), "127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", front.sockets[0].getsockname()[1])
            writer.write(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            data = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            return data
        finally:
            front.close()
            dying.close()
            good.close()
            proxy.close()
            await session.close()

    raw = asyncio.run(go())
    assert raw.startswith(b"HTTP/1.1 200 OK") and raw.endswith(b"\r\n\r\nfresh"), raw
