"""Request heads the proxy answers itself, over raw sockets: a malformed Host, a foreign HTTP
version, an unsupported Transfer-Encoding, a repeated credential or a bad WebSocket key never
selects a route by accident and never reaches a replica."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
import requests
from helpers import ProxyProcess, run_backend, run_proxy, write_routes

SECRET = "s" * 40


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProxyProcess, str]]:
    tmp = tmp_path_factory.mktemp("validation")
    with run_backend("valid") as backend:
        routes = write_routes(tmp / "routes.toml", {
            "hosted": {"host": "hosted.test", "path": "/", "upstreams": [backend]},
            "public": {"path": "/public", "upstreams": [backend]},
            "secure": {"path": "/secure", "upstreams": [backend], "auth": "jwt"},
            "keyed": {"path": "/keyed", "upstreams": [backend], "ratelimit": "1000/s",
                      "ratelimit.key": "header:X-Api-Key"},
        })
        with run_proxy(tmp, docker="false", routes_file=str(routes), jwt_secret=SECRET) as p:
            yield p, backend


def exchange(port: int, data: bytes, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Send one request; return everything read until the answer is complete, and whether the
    proxy closed the connection right after it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                return buf, True
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        while len(body) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
        s.settimeout(1.0)
        try:
            closed = s.recv(1) == b""
        except TimeoutError:
            closed = False
        return head + b"\r\n\r\n" + body, closed


def status_and_code(answer: bytes) -> tuple[bytes, str | None]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0]
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = None
    return status_line, code


def seen(backend: str) -> list[str]:
    return list(requests.get(backend + "/__seen", timeout=5).json()["seen"])


def refused(p: ProxyProcess, backend: str, request: bytes, status: bytes, code: str,
            close: bool | None = None) -> None:
    """Send `request`; assert the proxy's own answer and that the replica saw nothing."""
    before = seen(backend)
    answer, closed = exchange(p.port, request)
    line, got = status_and_code(answer)
    # HTTP/1.0 requests (and llhttp's own refusals) are answered in HTTP/1.0.
    assert line[:7] == b"HTTP/1." and line[9:13] == status + b" ", (request[:80], answer[:300])
    assert got == code, (request[:80], answer[:300])
    if close is not None:
        assert closed is close, (request[:80], answer[:300])
    time.sleep(0)  # the backend records synchronously; its list is already final
    assert seen(backend) == before, request[:80]


@pytest.mark.parametrize("host", [
    b"hosted.test:1@evil.test", b"user@hosted.test", b"hosted.test/evil", b"hosted.test x",
    b"hosted.test:http", b"hosted.test:", b"hosted.test:65536", b"", b"hosted.test,evil.test",
    b"hosted..test", b"host\xc3\xa9.test", b"[::1", b"[fe80::1%25eth0]",
])
def test_invalid_host_is_400_and_reaches_no_replica(env: tuple[ProxyProcess, str],
                                                    host: bytes) -> None:
    p, backend = env
    refused(p, backend, b"GET /public/h HTTP/1.1\r\nHost: " + host + b"\r\n\r\n", b"400",
            "bad_host")


def test_invalid_host_on_http10_is_400_too(env: tuple[ProxyProcess, str]) -> None:
    p, backend = env
    refused(p, backend, b"GET /public/h HTTP/1.0\r\nHost: hosted.test:1@evil.test\r\n\r\n",
            b"400", "bad_host")


@pytest.mark.parametrize("request_bytes", [
    b"GET /public/h HTTP/1.1\r\n\r\n",                                    # no Host
    b"GET /public/h HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",    # two Hosts
])
def test_missing_or_repeated_host_is_400(env: tuple[ProxyProcess, str],
                                         request_bytes: bytes) -> None:
    p, backend = env
    refused(p, backend, request_bytes, b"400", "bad_request")


@pytest.mark.parametrize("target", [
    b"http://hosted..test/h", b"http://[:::]/h", b"http://hosted.test:/h",
    b"http://hosted.test:1@evil.test/h",
])
def test_invalid_absolute_form_authority_is_400(env: tuple[ProxyProcess, str],
                                                target: bytes) -> None:
    p, backend = env
    refused(p, backend, b"GET " + target + b" HTTP/1.1\r\nHost: hosted.test\r\n\r\n", b"400",
            "bad_target")


def test_absolute_form_with_a_valid_authority_but_a_bad_host_header_is_400(
        env: tuple[ProxyProcess, str]) -> None:
    # RFC 9112 3.2: an invalid Host field is a 400 whatever the request target says.
    p, backend = env
    refused(p, backend, b"GET http://hosted.test/h HTTP/1.1\r\nHost: a b\r\n\r\n", b"400",
            "bad_host")


def echo_headers(answer: bytes) -> dict[str, list[str]]:
    body = json.loads(answer.partition(b"\r\n\r\n")[2])
    out: dict[str, list[str]] = {}
    for name, value in body["headers"]:
        out.setdefault(name.lower(), []).append(value)
    return out


def test_valid_hosts_route_case_and_dot_insensitively(env: tuple[ProxyProcess, str]) -> None:
    p, _ = env
    for host in (b"hosted.test", b"HOSTED.Test.", b"hosted.test:8080"):
        answer, _ = exchange(p.port, b"GET /h HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200"), (host, answer[:200])
        assert echo_headers(answer)["host"] == [host.decode()]


def test_replica_sees_only_the_authority_and_never_a_client_forwarded_host(
        env: tuple[ProxyProcess, str]) -> None:
    p, _ = env
    answer, _ = exchange(p.port, b"GET http://hosted.test/h HTTP/1.1\r\nHost: other.test\r\n"
                                 b"X-Forwarded-Host: evil.test\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    headers = echo_headers(answer)
    assert headers["host"] == ["hosted.test"]
    assert headers["x-forwarded-host"] == ["hosted.test"]


def test_http2_request_line_is_505_in_http11_and_closes(env: tuple[ProxyProcess, str]) -> None:
    p, backend = env
    refused(p, backend, b"GET /public/v HTTP/2.0\r\nHost: a.test\r\n\r\n", b"505",
            "http_version_not_supported", close=True)
    answer, _ = exchange(p.port, b"GET /public/v HTTP/2.0\r\nHost: a.test\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 505 HTTP Version Not Supported\r\n"), answer[:100]


@pytest.mark.parametrize("coding", [b"gzip, chunked", b"gzip", b"identity", b"chunked, gzip"])
def test_transfer_coding_other_than_chunked_is_501(env: tuple[ProxyProcess, str],
                                                   coding: bytes) -> None:
    p, backend = env
    body = b"3\r\nabc\r\n0\r\n\r\n" if coding.endswith(b"chunked") else b""
    request = (b"POST /public/te HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: " + coding
               + b"\r\n\r\n" + body)
    before = seen(backend)
    answer, closed = exchange(p.port, request)
    line, code = status_and_code(answer)
    if line.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400")):
        # llhttp itself refuses some shapes (a final coding other than chunked): also never sent.
        assert code == "bad_request"
    else:
        assert line.startswith(b"HTTP/1.1 501"), answer[:300]
        assert code == "unsupported_transfer_encoding"
    assert closed
    assert seen(backend) == before


def test_gzip_chunked_is_501_not_forwarded_without_its_coding(
        env: tuple[ProxyProcess, str]) -> None:
    p, backend = env
    refused(p, backend, b"POST /public/te HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: gzip, "
            b"chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", b"501", "unsupported_transfer_encoding",
            close=True)


def test_transfer_encoding_on_http10_is_400(env: tuple[ProxyProcess, str]) -> None:
    p, backend = env
    refused(p, backend, b"POST /public/te HTTP/1.0\r\nHost: a.test\r\nTransfer-Encoding: "
            b"chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", b"400", "bad_request", close=True)


def token(**extra: Any) -> str:
    return jwt.encode({"sub": "alice", "exp": int(time.time()) + 600, **extra}, SECRET,
                      algorithm="HS256")


@pytest.mark.parametrize("path", [b"/secure/a", b"/public/a"])
def test_two_authorization_headers_are_400(env: tuple[ProxyProcess, str], path: bytes) -> None:
    p, backend = env
    good = token().encode()
    for second in (b"Bearer forged", b"Bearer " + good):
        refused(p, backend, b"GET " + path + b" HTTP/1.1\r\nHost: a.test\r\nAuthorization: "
                b"Bearer " + good + b"\r\nauthorization: " + second + b"\r\n\r\n", b"400",
                "duplicate_credentials")


def test_one_authorization_header_still_passes(env: tuple[ProxyProcess, str]) -> None:
    p, _ = env
    r = requests.get(p.url("/secure/one"), headers={"Authorization": "Bearer " + token()},
                     timeout=5)
    assert r.status_code == 200


def test_rate_limit_key_header_twice_is_400_on_its_route_only(
        env: tuple[ProxyProcess, str]) -> None:
    p, backend = env
    twice = b"Host: a.test\r\nX-Api-Key: a\r\nx-api-key: b\r\n\r\n"
    refused(p, backend, b"GET /keyed/k HTTP/1.1\r\n" + twice, b"400", "duplicate_credentials")
    answer, _ = exchange(p.port, b"GET /keyed/k HTTP/1.1\r\nHost: a.test\r\nX-Api-Key: a\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    # On a route that does not read it, the header is no credential of ours.
    answer, _ = exchange(p.port, b"GET /public/k HTTP/1.1\r\n" + twice)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


@pytest.mark.parametrize("key", [b"\xc3\xa9" * 12, b"not-base64-at-all", b"AAAA"])
def test_bad_websocket_key_is_400_without_a_traceback(env: tuple[ProxyProcess, str],
                                                      key: bytes) -> None:
    p, backend = env
    refused(p, backend, b"GET /public/ws HTTP/1.1\r\nHost: a.test\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key
            + b"\r\n\r\n", b"400", "bad_websocket_handshake")
    log = p.log_text()
    assert "Traceback" not in log and "proxy_error" not in log


def test_proxy_keeps_serving_after_every_refusal(env: tuple[ProxyProcess, str]) -> None:
    p, _ = env
    assert requests.get(p.url("/public/after"), timeout=5).status_code == 200
    assert "Traceback" not in p.log_text()


def test_jwt_with_a_string_exp_is_401(env: tuple[ProxyProcess, str]) -> None:
    p, backend = env
    tok = jwt.encode({"sub": "alice", "exp": "9999999999"}, SECRET, algorithm="HS256")
    before = seen(backend)
    r = requests.get(p.url("/secure/str-exp"), headers={"Authorization": "Bearer " + tok},
                     timeout=5)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_token"
    assert "exp must be a number" in r.headers["WWW-Authenticate"]
    assert seen(backend) == before


@pytest.fixture(scope="module")
def admin_env(tmp_path_factory: pytest.TempPathFactory,
              env: tuple[ProxyProcess, str]) -> Iterator[ProxyProcess]:
    """A second proxy: admin names listed, and the test client as a trusted proxy."""
    tmp = tmp_path_factory.mktemp("admin-hosts")
    routes = write_routes(tmp / "routes.toml", {"public": {"path": "/public",
                                                           "upstreams": [env[1]]}})
    with run_proxy(tmp, docker="false", routes_file=str(routes), admin_hosts="ops.example",
                   trusted_proxies="127.0.0.1/32") as p:
        yield p


def test_trusted_peer_forwarded_host_must_be_valid(admin_env: ProxyProcess,
                                                   env: tuple[ProxyProcess, str]) -> None:
    p, backend = admin_env, env[1]
    refused(p, backend, b"GET /public/xfh HTTP/1.1\r\nHost: a.test\r\nX-Forwarded-Host: "
            b"front.test, a.test:1@evil.test\r\n\r\n", b"400", "bad_host")
    answer, _ = exchange(p.port, b"GET /public/xfh HTTP/1.1\r\nHost: a.test\r\n"
                                 b"X-Forwarded-Host: front.test\r\n\r\n")
    assert echo_headers(answer)["x-forwarded-host"] == ["front.test"]


def admin_get(p: ProxyProcess, path: str, host: str) -> requests.Response:
    # stream=True: an /events answered 200 (a broken guard) must fail the test, not hang it.
    r = requests.get(p.admin_base + path, headers={"Host": host}, timeout=5, stream=True)
    if r.status_code == 200 and path == "/events":
        r.close()
    return r


@pytest.mark.parametrize("path", ["/routes", "/healthz", "/", "/events", "/metrics",
                                  "/explain?url=http://a/"])
def test_admin_refuses_a_rebound_host(admin_env: ProxyProcess, path: str) -> None:
    p = admin_env
    r = admin_get(p, path, f"evil.test:{p.admin_port}")
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "host_not_allowed"
    assert "EDGEPROXY_ADMIN_HOSTS" in r.json()["error"]["message"]
    assert set(r.json()) == {"error"}  # nothing of the topology


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}",
                                  "ops.example", "ops.example:{port}"])
def test_admin_answers_its_own_addresses_and_listed_names(admin_env: ProxyProcess,
                                                          host: str) -> None:
    p = admin_env
    r = admin_get(p, "/routes", host.format(port=p.admin_port))
    assert r.status_code == 200 and "routes" in r.json()


def test_admin_dashboard_and_its_event_stream_work_from_their_origin(
        admin_env: ProxyProcess) -> None:
    p = admin_env
    page = requests.get(p.admin_base + "/", timeout=5)
    assert page.status_code == 200 and "EventSource" in page.text
    with requests.get(p.admin_base + "/events", stream=True, timeout=5) as r:
        assert r.status_code == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
