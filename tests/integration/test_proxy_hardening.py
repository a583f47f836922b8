"""Hostile inputs found in review: each costs the attacker one request, never the proxy."""

from __future__ import annotations

import asyncio
import http.client
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import requests
from helpers import ProxyProcess, run_backend, run_proxy, write_routes

from edgeproxy.routes.labels import LabelsInvalid, parse_labels


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProxyProcess, str]]:
    tmp = tmp_path_factory.mktemp("hardening")
    with run_backend("hard") as backend:
        routes = write_routes(tmp / "routes.toml", {
            "public": {"path": "/public", "upstreams": [backend]},
            "secure": {"path": "/secure", "upstreams": [backend], "auth": "jwt"},
            "ws": {"path": "/ws", "upstreams": [backend]},
            "upload": {"path": "/upload", "upstreams": [backend]},
        })
        with run_proxy(tmp, docker="false", routes_file=str(routes), read_timeout="1s",
                       header_timeout="1s", ws_max_message="64k", jwt_secret="x" * 40) as p:
            yield p, backend


def raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        return s.recv(65536)


def test_dot_segment_with_parameters_is_refused(env: tuple[ProxyProcess, str]) -> None:
    p, _ = env
    for path in ("/public/..;/admin", "/public/%2e%2e;x/admin", "/public/.;/x"):
        answer = raw(p.port, f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 400"), (path, answer[:80])


def test_semicolon_on_a_protected_route_is_refused(env: tuple[ProxyProcess, str]) -> None:
    p, _ = env
    r = requests.get(p.url("/secure;jsessionid=1/x"), timeout=5)
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_path"


def test_malformed_websocket_handshake_is_400_and_opens_nothing_upstream(
        env: tuple[ProxyProcess, str]) -> None:
    p, backend = env
    before = requests.get(backend + "/__seen", timeout=5).json()
    answer = raw(p.port, b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400")
    after = requests.get(backend + "/__seen", timeout=5).json()
    assert len(after) == len(before)
    assert "proxy_error" not in p.log_text()


def test_websocket_message_over_the_limit_closes_with_1009(env: tuple[ProxyProcess, str]) -> None:
    p, _ = env

    async def main() -> int | None:
        async with aiohttp.ClientSession() as s, s.ws_connect(p.url("/ws")) as ws:
            await ws.send_bytes(b"x" * (256 * 1024))
            msg = await ws.receive(timeout=10)
            if msg.type == aiohttp.WSMsgType.CLOSE:
                return int(msg.data)
            await ws.receive(timeout=10)
            return ws.close_code

    assert asyncio.run(main()) == 1009


def test_stalled_client_body_is_408_and_does_not_eject(env: tuple[ProxyProcess, str]) -> None:
    p, _ = env
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nx")
        started = time.monotonic()
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    assert time.monotonic() - started < 10
    replica = p.routes()["upload"]["replicas"][0]
    assert replica["state"] != "ejected"
    assert requests.get(p.url("/upload"), timeout=5).status_code == 200


@pytest.mark.parametrize("value", ["a{4294967296} => /x", "(" * 1000 + "a" + ")" * 1000 + " => /x"])
def test_hostile_rewrite_is_a_label_error(value: str) -> None:
    with pytest.raises(LabelsInvalid) as info:
        parse_labels({"gateway.path": "/x", "gateway.rewrite": value})
    assert info.value.errors[0].label == "gateway.rewrite"


def test_hostile_labels_on_one_container_leave_the_table_building(tmp_path: Path) -> None:
    from edgeproxy.routes.model import Container
    from edgeproxy.routes.table import build_table

    bad = Container("b", "bad", {"gateway.path": "/b", "gateway.tls": "true",
                                 "gateway.tls.hsts": "9" * 400}, "running", None,
                    (("bridge", "172.17.0.9"),), (80,), 1.0)
    good = Container("g", "good", {"gateway.path": "/g"}, "running", None,
                     (("bridge", "172.17.0.8"),), (80,), 2.0)
    table = build_table([bad, good])
    assert [r.name for r in table.routes] == ["good"]
    assert next(d for d in table.decisions if d.container == "bad").routed is False


def read_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


@pytest.mark.parametrize("head", [b"", b"GET /public/x HTTP/1.1\r\nHost: t\r\n"])
def test_slow_request_head_gets_408_and_is_closed(env: tuple[ProxyProcess, str],
                                                  head: bytes) -> None:
    p, backend = env
    before = len(requests.get(backend + "/__seen", timeout=5).json())
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        if head:
            s.sendall(head)  # and never the blank line that ends the head
        answer = read_all(s)  # returns once the proxy closes the connection
    assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
    assert b'"code": "request_timeout"' in answer
    assert len(requests.get(backend + "/__seen", timeout=5).json()) == before


def test_idle_keep_alive_between_requests_is_not_a_slow_head(
        env: tuple[ProxyProcess, str]) -> None:
    p, _ = env
    conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=5)  # never reconnects
    try:
        for path in ("/public/a", "/public/b"):
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
            time.sleep(1.5)  # idle longer than the header timeout, no request in progress
    finally:
        conn.close()
