"""An outside attacker's findings against the real proxy process, as raw-socket regressions:
each sends the exact bytes that misbehaved and checks what a client (and the log) sees."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
import requests
from helpers import ProxyProcess, run_backend, run_proxy, wait_for, write_routes

READ_TIMEOUT = 20.0  # long: a request that waits for it instead of failing fast is caught


class PathRuleAuth(BaseHTTPRequestHandler):
    """A forward-auth service with a path rule, as Authelia's `resources` regexes are: only
    X-Forwarded-Uri under /fwd/public/ passes. Records every URI it was asked about."""

    asked: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        uri = self.headers.get("X-Forwarded-Uri", "")
        self.asked.append(uri)
        self.send_response(200 if uri.startswith("/fwd/public/") else 401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def auth_service() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), PathRuleAuth)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/auth"
    server.shutdown()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory,
        auth_service: str) -> Iterator[tuple[ProxyProcess, str]]:
    tmp = tmp_path_factory.mktemp("hostile")
    with run_backend("hostile") as backend:
        routes = write_routes(tmp / "routes.toml", {
            "plain": {"path": "/plain", "upstreams": [backend]},
            "ws": {"path": "/ws", "upstreams": [backend]},
            "fwd": {"path": "/fwd", "upstreams": [backend], "auth": "forward",
                    "auth.url": auth_service},
            "secure": {"path": "/secure", "upstreams": [backend], "auth": "jwt"},
        })
        with run_proxy(tmp, docker="false", routes_file=str(routes), jwt_secret="k" * 32,
                       read_timeout=f"{READ_TIMEOUT:g}s") as p:
            yield p, backend


def exchange(port: int, data: bytes, timeout: float = 10.0) -> tuple[bytes, float]:
    """Send `data`, read until the proxy closes (or `timeout`); the bytes and the seconds."""
    start = time.monotonic()
    out = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return out, time.monotonic() - start


def error_code(answer: bytes) -> str:
    body = answer.partition(b"\r\n\r\n")[2]
    return str(json.loads(body)["error"]["code"])


def seen(backend: str) -> list[str]:
    return list(requests.get(backend + "/__seen", timeout=5).json()["seen"])


CHUNKED_POST = (b"POST /plain/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
NEXT = b"GET /plain/next HTTP/1.1\r\nHost: t\r\n\r\n"


@pytest.mark.parametrize("body", [
    b"zz\r\nabc\r\n0\r\n\r\n",               # not hex
    b"0x3\r\nabc\r\n0\r\n\r\n",              # a prefix llhttp refuses
    b"3\nabc\n0\n\n",                        # bare LF after the size
    b"3;a\x00\r\nabc\r\n0\r\n\r\n",          # NUL in a chunk extension
    b"FFFFFFFFFFFFFFFFF1\r\nabc\r\n0\r\n\r\n",  # a size past 64 bits
    b"3\r\nabc\r\nzz\r\n",                   # a good chunk, then a bad one
], ids=["not-hex", "0x", "bare-lf", "nul-ext", "overflow", "late"])
def test_malformed_chunked_body_is_400_at_once_and_closes(env: tuple[ProxyProcess, str],
                                                          body: bytes) -> None:
    # Found: llhttp drops a body whose chunk framing breaks without telling its reader, so the
    # request hung until the replica's read timeout and got 408 client_timeout (or, if the
    # client gave up first, a traceback in the log). A framing error is the client's 400.
    p, _ = env
    answer, took = exchange(p.port, CHUNKED_POST + body + NEXT, timeout=READ_TIMEOUT + 5)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert error_code(answer) == "bad_request"
    assert b"connection: close" in answer.lower()
    assert took < READ_TIMEOUT / 2
    assert answer.count(b"HTTP/1.1 ") == 1  # the pipelined request behind it is not served
    log = p.log_text()
    assert "Traceback" not in log and "proxy_error" not in log


def test_malformed_body_of_a_request_refused_unread_closes_without_traceback(
        env: tuple[ProxyProcess, str]) -> None:
    # Found by the fuzzer once bodies failed loudly: a request answered without reading its
    # body (401 here) leaves aiohttp discarding the rest, which raised the framing error as
    # "Unhandled exception". Both orders: the bad chunk with the head, and after the answer.
    p, _ = env
    head = b"POST /secure/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    answer, took = exchange(p.port, head + b"5\r\nhelloXX\r\n0\r\n\r\n" + NEXT)
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    # The body's error may be parsed before the 401 is written or after (then a 400 follows):
    # either way the connection closes at once and the pipelined request is never served.
    assert answer.count(b"HTTP/1.") == 1 or b"\r\n\r\nHTTP/1.0 400 " in answer, answer
    assert b" 200 OK" not in answer and took < 5
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        s.sendall(head + b"5\r\nhello\r\n")
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 401 "), first[:200]
        s.sendall(b"XX\r\n" + NEXT)
        rest = b""
        while chunk := s.recv(65536):
            rest += chunk
    assert b"/plain/next" not in rest and b"200 OK" not in rest
    assert rest == b"" or rest.startswith((b"HTTP/1.1 400 ", b"HTTP/1.0 400 ")), rest[:200]
    log = p.log_text()
    assert "Traceback" not in log and "Unhandled exception" not in log


def test_empty_lines_before_a_request_line_do_not_turn_414_into_431(
        env: tuple[ProxyProcess, str]) -> None:
    # Found by the fuzzer: a leading empty line (which llhttp skips) made the request line
    # look empty, so an overlong target was answered 431 instead of 414.
    p, _ = env
    for lead in (b"\n", b"\r\n", b"\r\n\r\n"):
        answer, _ = exchange(p.port, lead + b"GET /plain/" + b"p" * 40_000 + b" HTTP/1.1\r\n"
                             b"Host: t\r\n\r\n")
        assert answer.startswith((b"HTTP/1.0 414 ", b"HTTP/1.1 414 ")), (lead, answer[:100])
    answer, _ = exchange(p.port, b"\r\n" * 300 + b"GET /plain/x HTTP/1.1\r\nHost: t\r\n"
                         b"Connection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:100]


def test_client_leaving_mid_body_leaves_no_traceback(env: tuple[ProxyProcess, str]) -> None:
    # Found: the task streaming the body upstream failed with ConnectionResetError after the
    # request was cancelled, and asyncio logged "Task exception was never retrieved" with a
    # traceback for what is only a client going away (499).
    p, backend = env
    before = sum(1 for e in p.events("access") if e.get("status") == 499)
    heads = [b"POST /plain/upload HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nabc",
             CHUNKED_POST + b"3\r\nabc\r\n"]
    for _ in range(3):
        for head in heads:
            with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
                count = len(seen(backend))
                s.sendall(head)
                # Leave once the replica has the head and waits for the rest of the body.
                wait_for(lambda n=count: len(seen(backend)) > n, 5, what="the replica's request")
    wait_for(lambda: sum(1 for e in p.events("access") if e.get("status") == 499) >= before + 6,
             10, what="six 499s in the access log")
    time.sleep(0.3)  # asyncio reports unseen task exceptions when the task is collected
    log = p.log_text()
    assert "exception was never retrieved" not in log
    assert "Traceback" not in log


@pytest.mark.parametrize("request_head", [
    b"POST /ws HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n",
    b"GET /ws HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n",
    b"PUT /ws HTTP/1.1\r\nHost: t\r\n",
], ids=["post-with-body", "get-with-body", "put"])
def test_websocket_upgrade_must_be_a_get_without_body(env: tuple[ProxyProcess, str],
                                                      request_head: bytes) -> None:
    # Found: a POST upgrade had its Content-Length copied onto the GET handshake towards the
    # replica, which then waited for a body that never came: a 502 upstream_unreachable after
    # the read timeout, a client's error blamed on the replica.
    p, backend = env
    before = seen(backend)
    answer, took = exchange(p.port, request_head + b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                            b"Sec-WebSocket-Version: 13\r\n"
                            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\nhello",
                            timeout=READ_TIMEOUT + 5)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert error_code(answer) == "bad_websocket_handshake"
    assert took < READ_TIMEOUT / 2
    assert seen(backend) == before  # the replica was never asked


def test_websocket_get_upgrade_still_works(env: tuple[ProxyProcess, str]) -> None:
    p, backend = env
    closed = seen(backend).count("ws-closed 1000")
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Version: 13\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 101 ")
    # The replica records the close once the proxy has passed it on: wait for it, so that a
    # later test comparing the replica's record does not see it arrive late.
    wait_for(lambda: seen(backend).count("ws-closed 1000") > closed, 10,
             what="the replica's record of the WebSocket close")


@pytest.mark.parametrize("target", [
    "/fwd/public/../secret", "/fwd/public/%2e%2e/secret", "/fwd/public/.%2E/secret?x=1",
    "/fwd/public/./../secret",
])
def test_forward_auth_judges_the_path_the_replica_gets(env: tuple[ProxyProcess, str],
                                                       target: str) -> None:
    # Found: the auth service was told the raw target (/fwd/public/../secret), matched its
    # /fwd/public/ rule and said yes, while the replica was sent the normalised /fwd/secret.
    p, backend = env
    before = seen(backend)
    answer, _ = exchange(p.port, f"GET {target} HTTP/1.1\r\nHost: t\r\n"
                         "Connection: close\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    assert PathRuleAuth.asked[-1].split("?")[0] == "/fwd/secret"
    assert seen(backend) == before


def test_forward_auth_still_passes_the_public_path_with_its_query(
        env: tuple[ProxyProcess, str]) -> None:
    p, backend = env
    answer, _ = exchange(p.port, b"GET /fwd/public/%61?q=%2e%2e HTTP/1.1\r\nHost: t\r\n"
                         b"Connection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert PathRuleAuth.asked[-1] == "/fwd/public/a?q=%2e%2e"
    assert seen(backend)[-1] == "GET /fwd/public/a?q=%2e%2e"


SPOOFED = {
    "X-Forwarded-Ssl": "on", "X-Forwarded-Scheme": "https", "Front-End-Https": "on",
    "X-Forwarded-Server": "evil", "X-Forwarded-Prefix": "//evil.example", "X-Forwarded-Uri":
    "/admin", "X-Forwarded-Method": "DELETE", "X-Original-URL": "/admin",
    "X-Original-URI": "/admin", "X-Rewrite-URL": "/admin", "X-Forwarded-Port": "443",
    "Forwarded": "for=10.0.0.1;proto=https",
}


def test_untrusted_client_cannot_claim_how_it_reached_us(env: tuple[ProxyProcess, str]) -> None:
    # Found: only X-Forwarded-For/-Proto/-Host/-Port, X-Real-IP and Forwarded were replaced.
    # Rack takes X-Forwarded-Ssl over X-Forwarded-Proto (plain HTTP passes for HTTPS),
    # Spring builds links on X-Forwarded-Prefix, and IIS/Zend route on X-Original-URL: a
    # client on the unprotected /plain route could name /admin to such a replica.
    p, _ = env
    head = "".join(f"{k}: {v}\r\n" for k, v in SPOOFED.items())
    answer, _ = exchange(p.port, f"GET /plain/echo HTTP/1.1\r\nHost: t\r\n{head}"
                         "Connection: close\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    got = {k.lower(): v for k, v in json.loads(answer.partition(b"\r\n\r\n")[2])["headers"]}
    assert not {k.lower() for k in SPOOFED} & got.keys()
    assert got["x-forwarded-proto"] == "http"
    assert got["x-real-ip"] == "127.0.0.1"
