"""edgeproxy.proxy.pipeline: the protocol-neutral steps, driven through a recording front and real
replicas on loopback (asyncio servers that answer with fixed bytes)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from edgeproxy.clients.upstream import UpstreamResponse
from edgeproxy.core.settings import Settings
from edgeproxy.policies.ratelimit import RateLimitSpec
from edgeproxy.proxy.exchange import Exchange, LocalAnswer, Refusal
from edgeproxy.proxy.pipeline import BodyTooLarge, CountedBody, Proxy, UpstreamFailed
from edgeproxy.routes.model import Route, RouteSpec, Upstream
from edgeproxy.routes.table import FileRoute, RouteTable, build_table


@dataclass
class View:
    """A request as any front would describe it."""

    method: str = "GET"
    target: str = "/app/x"
    headers: CIMultiDictProxy[str] = field(
        default_factory=lambda: CIMultiDictProxy(CIMultiDict({"Host": "example.test"})))
    peer: str | None = "127.0.0.1"
    secure: bool = False
    protocol: str = "HTTP/1.1"
    chunks: tuple[bytes, ...] = ()

    @property
    def raw_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        return tuple((k.encode(), v.encode()) for k, v in self.headers.items())

    @property
    def has_body(self) -> bool:
        return bool(self.chunks)

    @property
    def content_length(self) -> int | None:
        return sum(map(len, self.chunks)) if self.chunks else None

    async def body(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


@dataclass
class Answer:
    kind: str
    status: int
    code: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


class RecordingFront:
    """Writes nothing: records what the pipeline asked it to answer."""

    def __init__(self, view: View) -> None:
        self.view = view

    def refuse(self, refusal: Refusal, ex: Exchange) -> Answer:
        ex.status = refusal.status
        return Answer("refuse", refusal.status, refusal.code,
                      {**(refusal.headers or {}), **(ex.extra_headers or {})})

    def answer(self, answer: LocalAnswer, ex: Exchange) -> Answer:
        ex.status = answer.status
        return Answer("answer", answer.status, headers=dict(answer.headers))

    async def relay(self, resp: UpstreamResponse, spec: RouteSpec, ex: Exchange) -> Answer:
        ex.status = resp.status
        body = b"".join([c async for c in resp.iter_body()])
        headers = {k.decode(): v.decode() for k, v in resp.raw_headers}
        return Answer("relay", resp.status, headers={**headers, **(ex.extra_headers or {})},
                      body=body)

    async def websocket(self, *args: Any) -> Answer:
        raise AssertionError("no websocket here")


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def replica(answer: bytes, seen: list[bytes] | None = None) -> tuple[asyncio.Server, int]:
    """A replica that reads one request head and writes `answer`, then closes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if seen is not None:
            seen.append(head)
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def table_with(ports: list[int], **spec: Any) -> RouteTable:
    ups = tuple(Upstream("http", "127.0.0.1", p, f"r{i}") for i, p in enumerate(ports))
    return build_table([], [FileRoute("app", RouteSpec(paths=("/app",), **spec), ups)])


def proxy_for(table: RouteTable, **settings: Any) -> Proxy[Answer]:
    s = Settings(access_log=False, **settings)
    return Proxy(s, lambda: table)


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def run(proxy: Proxy[Answer], view: View) -> Answer:
    try:
        return await proxy.run(RecordingFront(view))
    finally:
        proxy.close()


def test_no_route_is_refused_with_404() -> None:
    answer = asyncio.run(run(proxy_for(table_with([])), View(target="/other")))
    assert (answer.kind, answer.status, answer.code) == ("refuse", 404, "no_route")


def test_empty_pool_is_503_with_retry_after() -> None:
    answer = asyncio.run(run(proxy_for(table_with([]), retry_after=7), View()))
    assert (answer.status, answer.code, answer.headers["Retry-After"]) == (503, "no_replica", "7")


def test_retry_goes_to_the_next_replica_when_the_first_refuses_connections() -> None:
    async def go() -> tuple[Answer, list[bytes]]:
        seen: list[bytes] = []
        server, port = await replica(OK, seen)
        async with server:
            proxy = proxy_for(table_with([closed_port(), port]))
            return await run(proxy, View()), seen

    answer, seen = asyncio.run(go())
    assert (answer.kind, answer.status, answer.body) == ("relay", 200, b"ok")
    assert len(seen) == 1 and seen[0].startswith(b"GET /app/x HTTP/1.1\r\n")


def test_a_post_that_reached_a_replica_is_not_sent_again() -> None:
    async def go() -> tuple[Answer, int]:
        hits = 0

        async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal hits
            await reader.readuntil(b"\r\n\r\n")
            hits += 1
            writer.close()  # read the request, answered nothing

        a = await asyncio.start_server(hang_up, "127.0.0.1", 0)
        b = await asyncio.start_server(hang_up, "127.0.0.1", 0)
        async with a, b:
            ports = [a.sockets[0].getsockname()[1], b.sockets[0].getsockname()[1]]
            answer = await run(proxy_for(table_with(ports)), View(method="POST"))
        return answer, hits

    answer, hits = asyncio.run(go())
    assert (answer.status, answer.code, hits) == (502, "upstream_error", 1)


def test_body_over_the_route_limit_is_refused_before_any_replica_is_tried() -> None:
    async def go() -> tuple[Answer, list[bytes]]:
        seen: list[bytes] = []
        server, port = await replica(OK, seen)
        async with server:
            view = View(method="POST", chunks=(b"x" * 10,))
            return await run(proxy_for(table_with([port], max_body=5)), view), seen

    answer, seen = asyncio.run(go())
    assert (answer.status, answer.code, seen) == (413, "body_too_large", [])


def test_counted_body_stops_at_the_limit() -> None:
    async def source() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"abc"

    async def drain(body: CountedBody) -> int:
        n = 0
        async for chunk in body.stream():
            n += len(chunk)
        return n

    body = CountedBody(source(), 7)
    with pytest.raises(BodyTooLarge):
        asyncio.run(drain(body))
    assert (body.seen, body.too_large) == (9, True)


@pytest.mark.parametrize(("code", "status"), [
    ("upstream_unreachable", 502), ("upstream_error", 502), ("upstream_timeout", 504),
    ("upstream_tls_error", 502), ("client_timeout", 408), ("body_too_large", 413)])
def test_failure_refusals(code: str, status: int) -> None:
    route = Route("app", "file", RouteSpec(), ())
    refusal = UpstreamFailed(code, False, "detail").refusal(route, None, 10)
    assert (refusal.status, refusal.code) == (status, code)


def test_ratelimit_headers_reach_the_relayed_answer_and_the_refusal() -> None:
    async def go() -> list[Answer]:
        server, port = await replica(OK)
        async with server:
            table = table_with([port], ratelimit=RateLimitSpec(limit=1, period=60.0, burst=1))
            proxy = proxy_for(table)
            return [await run(proxy, View()), await run(proxy, View())]

    first, second = asyncio.run(go())
    assert (first.kind, first.status) == ("relay", 200)
    assert first.headers["RateLimit-Policy"] == '"default";q=1;w=60'
    assert (second.kind, second.status, second.code) == ("refuse", 429, "rate_limited")
    assert int(second.headers["Retry-After"]) >= 1


def test_replica_endpoints_are_kept_per_address_and_bounded() -> None:
    from edgeproxy.proxy import pipeline
    proxy = proxy_for(table_with([]))
    spec = RouteSpec(paths=("/app",))
    for i in range(3 * pipeline._ENDPOINTS_MAX):
        host = f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"
        endpoint = proxy._endpoint(Upstream("http", host, 8000 + i % 7, f"r{i}"), spec)
        assert (endpoint.host, endpoint.port, endpoint.tls) == (host, 8000 + i % 7, None)
        assert len(proxy._plain_endpoints) <= pipeline._ENDPOINTS_MAX
    first = proxy._endpoint(Upstream("http", "10.9.9.9", 80, "a"), spec)
    assert proxy._endpoint(Upstream("http", "10.9.9.9", 80, "b"), spec) is first
    proxy.close()
