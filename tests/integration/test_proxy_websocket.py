"""WebSocket through the proxy: echo both frame types, subprotocols, close in both directions."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aiohttp
import pytest
import requests
from helpers import ProxyProcess, run_backend, run_proxy, wait_for, write_routes

WS_TIMEOUT = aiohttp.ClientWSTimeout(ws_receive=10, ws_close=5)


@pytest.fixture(scope="module")
def backend() -> Iterator[str]:
    with run_backend("wsb") as base:
        yield base


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, backend: str) -> Iterator[ProxyProcess]:
    tmp = tmp_path_factory.mktemp("proxy-ws")
    routes = write_routes(tmp / "routes.toml", {
        "sock": {"path": "/sock", "strip_prefix": True, "upstreams": [backend]},
    })
    with run_proxy(tmp, docker="false", routes_file=str(routes)) as p:
        yield p


def ws_url(proxy: ProxyProcess, query: str = "") -> str:
    return f"ws://127.0.0.1:{proxy.port}/sock/ws{query}"


async def _echo(url: str) -> tuple[str, bytes]:
    async with aiohttp.ClientSession() as session, session.ws_connect(url, timeout=WS_TIMEOUT) as ws:
        await ws.send_str("hello")
        text = await ws.receive_str(timeout=5)
        await ws.send_bytes(b"\x00\x01binary\xff")
        data = await ws.receive_bytes(timeout=5)
        return text, data


def test_text_and_binary_frames_echo(proxy: ProxyProcess) -> None:
    text, data = asyncio.run(_echo(ws_url(proxy)))
    assert text == "wsb:hello"
    assert data == b"\xffyranib\x01\x00"


async def _protocol(url: str, offered: tuple[str, ...]) -> str | None:
    async with aiohttp.ClientSession() as session, \
            session.ws_connect(url, protocols=offered, timeout=WS_TIMEOUT) as ws:
        await ws.send_str("p")
        assert await ws.receive_str(timeout=5) == "wsb:p"
        return ws.protocol


@pytest.mark.parametrize(("offered", "chosen"), [
    (("chat",), "chat"),
    (("nope", "other"), "other"),
    (("nope",), None),
    ((), None),
])
def test_subprotocol_is_negotiated_with_the_backend(
    proxy: ProxyProcess, offered: tuple[str, ...], chosen: str | None
) -> None:
    assert asyncio.run(_protocol(ws_url(proxy), offered)) == chosen


async def _backend_closes(url: str) -> tuple[aiohttp.WSMsgType, int | None, str]:
    async with aiohttp.ClientSession() as session, session.ws_connect(url, timeout=WS_TIMEOUT) as ws:
        await ws.send_str("close-me")
        msg = await ws.receive(timeout=5)
        return msg.type, msg.data, msg.extra or ""


def test_backend_close_reaches_the_client(proxy: ProxyProcess) -> None:
    kind, code, reason = asyncio.run(_backend_closes(ws_url(proxy)))
    assert kind == aiohttp.WSMsgType.CLOSE
    assert code == 4001
    assert reason == "bye"


async def _client_closes(url: str) -> int | None:
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(url, timeout=WS_TIMEOUT)
        await ws.send_str("before close")
        assert await ws.receive_str(timeout=5) == "wsb:before close"
        await ws.close(code=4002, message=b"done")
        return ws.close_code


def test_client_close_reaches_the_backend(proxy: ProxyProcess, backend: str) -> None:
    def closes() -> list[str]:
        return [s for s in requests.get(backend + "/__seen", timeout=5).json()["seen"]
                if s.startswith("ws-closed")]

    before = len(closes())
    asyncio.run(_client_closes(ws_url(proxy, "?c=1")))
    after = wait_for(lambda: closes()[before:], timeout=5, what="backend to see the close")
    assert after == ["ws-closed 4002"]


def test_upgrade_refused_by_the_backend_is_502(proxy: ProxyProcess) -> None:
    r = requests.get(proxy.url("/sock/not-a-socket"), timeout=5, headers={
        "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "upstream_websocket_refused"


def test_plain_request_on_the_socket_route_still_works(proxy: ProxyProcess) -> None:
    r = requests.get(proxy.url("/sock/plain"), timeout=5)
    assert r.status_code == 200
    assert r.json()["raw_path"] == "/plain"
