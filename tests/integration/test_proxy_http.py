"""The proxy over real sockets: routing, paths, framing, headers both ways, admin, upstream faults.

One proxy (routes file, no Docker) and four echo backends serve the whole module. Raw sockets
are used wherever a client library would normalise what we want to send or hide what we get.
"""

from __future__ import annotations

import gzip
import json
import re
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from helpers import ProxyProcess, free_port, run_backend, run_proxy, wait_for, write_routes
from multidict import CIMultiDict

# --- raw HTTP/1.1 over a socket ---------------------------------------------------------------


@dataclass
class RawResponse:
    """A response read off the socket: status, headers in wire order, body, framing state."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    complete: bool  # the body ended where its framing said it would
    closed: bool  # the server closed the connection after the response

    def get(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def getall(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)


def _read_body(f: Any, headers: list[tuple[str, str]]) -> tuple[bytes, bool]:
    names = {k.lower(): v for k, v in headers}
    try:
        if "chunked" in names.get("transfer-encoding", "").lower():
            body = b""
            while True:
                size_line = f.readline()
                if not size_line:
                    return body, False
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    f.readline()
                    return body, True
                chunk = f.read(size + 2)
                body += chunk[:size]
                if len(chunk) < size + 2:
                    return body, False
        if "content-length" in names:
            want = int(names["content-length"])
            body = f.read(want)
            return body, len(body) == want
        return f.read(), True
    except ConnectionResetError:
        return b"", False


def exchange(port: int, data: bytes, *, head: bool = False, timeout: float = 5.0) -> RawResponse:
    """Send raw bytes, read one response (skipping 1xx), and tell whether the server hung up."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        f = s.makefile("rb")
        while True:
            status_line = f.readline()
            if not status_line:
                raise ConnectionError(f"closed without a response to {data[:60]!r}")
            status = int(status_line.split()[1])
            headers: list[tuple[str, str]] = []
            while True:
                line = f.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                headers.append((name.strip(), value.strip()))
            if not 100 <= status < 200:
                break
        if head or status in (204, 304):
            body, complete = b"", True
        else:
            body, complete = _read_body(f, headers)
        try:
            closed = f.read(1) == b""
        except TimeoutError:
            closed = False
        except ConnectionResetError:
            closed = True
        return RawResponse(status, headers, body, complete, closed)


def request_bytes(target: str, *, method: str = "GET", host: str | None = "proxy.test",
                  headers: tuple[tuple[str, str], ...] = (), body: bytes = b"") -> bytes:
    """A well-formed request asking the server to close afterwards."""
    lines = [f"{method} {target} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [f"{k}: {v}" for k, v in headers]
    if body and not any(k.lower() in ("content-length", "transfer-encoding") for k, _ in headers):
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def seen_headers(resp: RawResponse | requests.Response) -> CIMultiDict[str]:
    """Headers the echo backend received, case-insensitive."""
    return CIMultiDict((k, v) for k, v in resp.json()["headers"])


def assert_error(resp: RawResponse | requests.Response, status: int, code: str) -> dict[str, Any]:
    """The proxy's own JSON error shape, with the request id mirrored in the header."""
    assert resp.status_code == status if isinstance(resp, requests.Response) else resp.status == status
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"status", "code", "message", "request_id"}
    assert err["status"] == status
    assert err["code"] == code
    assert isinstance(err["message"], str) and err["message"]
    header = resp.headers.get("X-Request-ID") if isinstance(resp, requests.Response) \
        else resp.get("X-Request-ID")
    assert err["request_id"] and header == err["request_id"]
    return dict(err)


# --- the proxy and its backends -----------------------------------------------------------------


@dataclass
class Stack:
    proxy: ProxyProcess
    backends: dict[str, str]  # backend name -> base URL
    down_port: int


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("proxy-http")
    with ExitStack() as stack:
        backends = {n: stack.enter_context(run_backend(n)) for n in ("api", "v2", "internal", "shop")}
        down_port = free_port()
        routes = write_routes(tmp / "routes.toml", {
            "api": {"path": "/api", "upstreams": [backends["api"]]},
            "v2": {"path": "/api/v2", "strip_prefix": True, "upstreams": [backends["v2"]]},
            "internal": {"path": "/internal", "upstreams": [backends["internal"]]},
            "shop": {"host": "shop.example", "upstreams": [backends["shop"]]},
            "wild": {"host": "*.apps.example", "path": "/w", "upstreams": [backends["shop"]]},
            "down": {"path": "/down", "upstreams": [f"http://127.0.0.1:{down_port}"]},
        })
        proxy = stack.enter_context(run_proxy(tmp, docker="false", routes_file=str(routes)))
        yield Stack(proxy, backends, down_port)


def seen_by(env: Stack, backend: str) -> list[str]:
    """'METHOD raw_target' of every request a backend has received so far."""
    return list(requests.get(env.backends[backend] + "/__seen", timeout=5).json()["seen"])


# --- routing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("host", "target", "backend", "raw_path"), [
    ("proxy.test", "/api", "api", "/api"),
    ("proxy.test", "/api/", "api", "/api/"),
    ("proxy.test", "/api/users/7", "api", "/api/users/7"),
    ("proxy.test", "/api/v20", "api", "/api/v20"),  # /api/v2 matches whole segments only
    ("proxy.test", "/api/v2x/y", "api", "/api/v2x/y"),
    ("proxy.test", "/api/v2", "v2", "/"),  # longest prefix wins, then is stripped
    ("proxy.test", "/api/v2/", "v2", "/"),
    ("proxy.test", "/api/v2/items/1", "v2", "/items/1"),
    ("proxy.test", "/internal/x", "internal", "/internal/x"),
    ("shop.example", "/anything", "shop", "/anything"),
    ("SHOP.Example:8080", "/api/x", "shop", "/api/x"),  # a host route beats a path-only one
    ("shop.example.", "/", "shop", "/"),
    ("a.apps.example", "/w/1", "shop", "/w/1"),  # via the '*.apps.example' route
])
def test_route_is_chosen_by_host_and_path_prefix(
    env: Stack, host: str, target: str, backend: str, raw_path: str
) -> None:
    r = requests.get(env.proxy.url(target), headers={"Host": host}, timeout=5)
    assert r.status_code == 200, r.text
    assert r.json()["name"] == backend
    assert r.json()["raw_path"] == raw_path


@pytest.mark.parametrize(("host", "target"), [
    ("proxy.test", "/"),
    ("proxy.test", "/apix"),  # not a segment boundary
    ("proxy.test", "/ap"),
    ("proxy.test", "/internalx/y"),
    ("apps.example", "/w/1"),  # '*.apps.example' does not match the bare domain
    ("a.apps.example", "/other"),
    ("shop.example.evil", "/x"),
])
def test_no_route_is_404_json(env: Stack, host: str, target: str) -> None:
    r = requests.get(env.proxy.url(target), headers={"Host": host}, timeout=5)
    err = assert_error(r, 404, "no_route")
    assert re.fullmatch(r"[0-9a-f]{32}", err["request_id"])


@pytest.mark.parametrize("query", [
    "b=%2F&a=1&a=2",
    "c=a+b&d=%7e&e=&f",
    "x=%zz&y=%00&z=..%2F..",  # not our business: the query is the backend's
    "a=1;b=2&path=/x/../y",
])
def test_query_string_is_forwarded_untouched(env: Stack, query: str) -> None:
    resp = exchange(env.proxy.port, request_bytes(f"/api/q?{query}"))
    assert resp.status == 200
    assert resp.json()["raw_path"] == f"/api/q?{query}"


@pytest.mark.parametrize(("target", "raw_path"), [
    ("/api/./x//y/../z", "/api/x/z"),
    ("/api/%7Euser/%41", "/api/~user/A"),  # unreserved characters decoded
    ("/api/caf%c3%a9", "/api/caf%C3%A9"),  # other escapes kept, upper-cased
    ("/api/a;b=c/d", "/api/a;b=c/d"),
    ("/api/v2/./deep/../x/", "/x/"),
])
def test_backend_receives_the_normalised_path(env: Stack, target: str, raw_path: str) -> None:
    resp = exchange(env.proxy.port, request_bytes(target))
    assert resp.status == 200
    assert resp.json()["raw_path"] == raw_path


# --- path attacks --------------------------------------------------------------------------

_ONLY_400 = None


@pytest.mark.parametrize(("target", "acceptable"), [
    # (target, (backend, raw_path) the backend may see instead of a 400, or _ONLY_400)
    ("/api/../internal/x", ("internal", "/internal/x")),
    ("/api/%2e%2e/internal/x", ("internal", "/internal/x")),
    ("/api/%2E%2E/internal/x", ("internal", "/internal/x")),
    ("/api/.%2e/internal/x", ("internal", "/internal/x")),
    ("/internal/../api/x", ("api", "/api/x")),
    ("//internal/x", ("internal", "/internal/x")),
    ("/api//..//internal", ("internal", "/internal")),
    ("/api/../../internal", ("internal", "/internal")),
    ("/%2e%2e/api", ("api", "/api")),
    ("/api/x%2Fy", _ONLY_400),
    ("/api/x%2fy", _ONLY_400),
    ("/api/%2e%2e%2Finternal", _ONLY_400),
    ("/api/..%2finternal", _ONLY_400),
    ("/api/x%5Cy", _ONLY_400),
    ("/api/%2e%2e%5cinternal", _ONLY_400),
    ("/api/x\\y", _ONLY_400),
    ("/api/..\\internal", _ONLY_400),
    ("/api/x%00y", _ONLY_400),
    ("/api/x%3By", _ONLY_400),
    ("/api/x%25y", _ONLY_400),
    ("/api/%252e%252e/internal", _ONLY_400),
    ("/api/x%2", _ONLY_400),
    ("/api/x%g0", _ONLY_400),
])
def test_path_attack_is_refused_or_normalised(
    env: Stack, target: str, acceptable: tuple[str, str] | None
) -> None:
    resp = exchange(env.proxy.port, request_bytes(target))
    if resp.status == 400:
        assert_error(resp, 400, "bad_path")
        return
    assert acceptable is not None, f"{target!r} must be refused, got {resp.status} {resp.body[:200]!r}"
    assert resp.status == 200, resp.body
    backend, raw_path = acceptable
    seen = resp.json()
    assert (seen["name"], seen["raw_path"]) == (backend, raw_path)
    lowered = seen["raw_path"].lower()
    for bad in ("..", "%2f", "%5c", "%00", "%25", "\\", "#"):
        assert bad not in lowered


def test_encoded_slash_never_reaches_any_backend(env: Stack) -> None:
    marker = uuid.uuid4().hex
    for target in (f"/api/{marker}%2F..%2Finternal", f"/internal/{marker}%2fx"):
        assert exchange(env.proxy.port, request_bytes(target)).status == 400
    assert all(marker not in line for b in env.backends for line in seen_by(env, b))


@pytest.mark.parametrize(("target", "raw_path"), [
    ("/api/x#frag", "/api/x"),
    ("/api/x?y=1#frag", "/api/x?y=1"),
    ("/api/x#/../../internal", "/api/x"),
])
def test_fragment_is_never_forwarded(env: Stack, target: str, raw_path: str) -> None:
    resp = exchange(env.proxy.port, request_bytes(target))
    assert resp.status == 200
    assert (resp.json()["name"], resp.json()["raw_path"]) == ("api", raw_path)


# --- framing and smuggling -----------------------------------------------------------------

_SMUGGLE = "GET /api/{m}-inner HTTP/1.1\r\nHost: proxy.test\r\n\r\n"
_FRAMING = {
    "cl_and_te": "POST /api/{m} HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: 4\r\n"
                 "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + _SMUGGLE,
    "te_and_cl": "POST /api/{m} HTTP/1.1\r\nHost: proxy.test\r\nTransfer-Encoding: chunked\r\n"
                 "Content-Length: 60\r\n\r\n0\r\n\r\n" + _SMUGGLE,
    "two_content_lengths": "POST /api/{m} HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: 0\r\n"
                           "Content-Length: 48\r\n\r\n" + _SMUGGLE,
    "content_length_list": "POST /api/{m} HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: 5, 5\r\n"
                           "\r\nabcde",
    "obs_fold": "GET /api/{m} HTTP/1.1\r\nHost: proxy.test\r\nX-A: a\r\n folded\r\n\r\n",
    "obs_fold_te": "POST /api/{m} HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: 48\r\n"
                   "Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n" + _SMUGGLE,
    "space_before_colon": "POST /api/{m} HTTP/1.1\r\nHost: proxy.test\r\n"
                          "Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n" + _SMUGGLE,
    "te_not_chunked_last": "POST /api/{m} HTTP/1.1\r\nHost: proxy.test\r\n"
                           "Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n" + _SMUGGLE,
    "bare_lf_everywhere": "GET /api/{m} HTTP/1.1\nHost: proxy.test\n\n",
    "bare_lf_in_headers": "GET /api/{m} HTTP/1.1\r\nHost: proxy.test\nX-B: 1\r\n\r\n",
    "two_hosts": "GET /api/{m} HTTP/1.1\r\nHost: proxy.test\r\nHost: shop.example\r\n\r\n",
    "no_host_http11": "GET /api/{m} HTTP/1.1\r\nX-A: 1\r\n\r\n",
    "negative_length": "POST /api/{m} HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: -1\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(_FRAMING))
def test_ambiguous_framing_is_400_and_never_reaches_the_backend(env: Stack, case: str) -> None:
    marker = uuid.uuid4().hex
    resp = exchange(env.proxy.port, _FRAMING[case].format(m=marker).encode())
    assert resp.status == 400
    assert resp.closed, "the connection must be closed after a framing error"
    # A later, well-formed request goes through; nothing of the bad one arrived before it.
    sentinel = exchange(env.proxy.port, request_bytes(f"/api/sentinel-{marker}"))
    assert sentinel.status == 200
    assert [line for line in seen_by(env, "api") if marker in line] == [
        f"GET /api/sentinel-{marker}"]


def test_oversized_header_is_431(env: Stack) -> None:
    marker = uuid.uuid4().hex
    resp = exchange(env.proxy.port, request_bytes(
        f"/api/{marker}", headers=(("X-Big", "a" * 40000),)))
    assert resp.status == 431
    assert resp.closed
    assert not [line for line in seen_by(env, "api") if marker in line]


def _framing_of(headers: CIMultiDict[str] | RawResponse) -> tuple[bool, bool]:
    if isinstance(headers, RawResponse):
        return headers.get("Content-Length") is not None, headers.get("Transfer-Encoding") is not None
    return "Content-Length" in headers, "Transfer-Encoding" in headers


def test_upstream_gets_content_length_for_a_sized_body(env: Stack) -> None:
    resp = exchange(env.proxy.port, request_bytes("/api/v2/echo", method="POST", body=b"x" * 1000))
    assert resp.status == 200
    seen = seen_headers(resp)
    assert _framing_of(seen) == (True, False)
    assert seen["Content-Length"] == "1000"
    assert resp.json()["body_len"] == 1000


def test_upstream_gets_chunked_for_a_chunked_body(env: Stack) -> None:
    body = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    resp = exchange(env.proxy.port, request_bytes(
        "/api/v2/echo", method="POST", headers=(("Transfer-Encoding", "chunked"),), body=body))
    assert resp.status == 200
    seen = seen_headers(resp)
    assert _framing_of(seen) == (False, True)
    assert seen["Transfer-Encoding"].lower() == "chunked"
    assert resp.json()["body_len"] == 11


@pytest.mark.parametrize(("target", "framing"), [
    ("/api/v2/stream?bytes=200000", (True, False)),
    ("/api/v2/stream?bytes=200000&chunked=1", (False, True)),
])
def test_client_never_gets_both_length_and_chunked(
    env: Stack, target: str, framing: tuple[bool, bool]
) -> None:
    resp = exchange(env.proxy.port, request_bytes(target))
    assert resp.status == 200
    assert _framing_of(resp) == framing
    assert resp.complete and len(resp.body) == 200000


def test_head_response_keeps_length_and_has_no_body(env: Stack) -> None:
    resp = exchange(env.proxy.port, request_bytes("/api/v2/stream?bytes=1000", method="HEAD"),
                    head=True)
    assert resp.status == 200
    assert resp.get("Content-Length") == "1000"
    assert resp.get("Transfer-Encoding") is None
    assert resp.closed  # and no stray body bytes were sent before the close


# --- headers, client to backend ---------------------------------------------------------------

_CLIENT_HEADERS = (
    ("Connection", "close, X-Secret-Hop"),
    ("X-Secret-Hop", "must-go"),
    ("Keep-Alive", "timeout=5"),
    ("TE", "trailers"),
    ("Trailer", "X-T"),
    ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
    ("Proxy-Connection", "keep-alive"),
    ("Upgrade", "h2c"),
    ("X-Auth-Subject", "admin"),
    ("X-Auth-Scopes", "root"),
    ("X_Auth_User", "admin"),
    ("X-Forwarded-For", "6.6.6.6"),
    ("X-Real-IP", "6.6.6.6"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "evil.example"),
    ("Forwarded", "for=6.6.6.6;proto=https"),
    ("X-End-To-End", "kept"),
    ("Authorization", "Bearer abc"),
    ("Cookie", "a=1"),
)


@pytest.fixture(scope="module")
def echoed(env: Stack) -> CIMultiDict[str]:
    """What the backend saw of one raw request full of hop-by-hop and spoofed headers."""
    data = b"GET /api/h HTTP/1.1\r\nHost: Proxy.Test:8080\r\n" + b"".join(
        f"{k}: {v}\r\n".encode() for k, v in _CLIENT_HEADERS) + b"\r\n"
    resp = exchange(env.proxy.port, data)
    assert resp.status == 200
    return seen_headers(resp)


@pytest.mark.parametrize("name", [
    "Connection", "X-Secret-Hop", "Keep-Alive", "TE", "Trailer", "Proxy-Authorization",
    "Proxy-Connection", "Upgrade",
])
def test_hop_by_hop_request_header_is_stripped(echoed: CIMultiDict[str], name: str) -> None:
    assert name not in echoed


def test_end_to_end_request_headers_pass(echoed: CIMultiDict[str]) -> None:
    assert echoed["X-End-To-End"] == "kept"
    assert echoed["Authorization"] == "Bearer abc"
    assert echoed["Cookie"] == "a=1"


def test_client_host_is_passed_through(echoed: CIMultiDict[str]) -> None:
    assert echoed.getall("Host") == ["Proxy.Test:8080"]


def test_forwarded_headers_replaced_for_an_untrusted_peer(echoed: CIMultiDict[str]) -> None:
    assert echoed.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert echoed.getall("X-Real-IP") == ["127.0.0.1"]
    assert echoed.getall("X-Forwarded-Proto") == ["http"]
    assert echoed.getall("X-Forwarded-Host") == ["Proxy.Test:8080"]
    assert "Forwarded" not in echoed


def test_spoofed_identity_headers_are_removed(echoed: CIMultiDict[str]) -> None:
    assert "X-Auth-Subject" not in echoed
    assert "X-Auth-Scopes" not in echoed
    assert not [k for k in echoed if "_" in k]


def test_connection_cannot_remove_what_the_proxy_sets_or_relies_on(env: Stack) -> None:
    # Naming a header in Connection strips the client's copy; it must not strip the proxy's
    # own forwarded headers (Traefik CVE-2024-45410) nor make the backend see another Host.
    resp = exchange(env.proxy.port, request_bytes("/api/conn", host="Proxy.Test", headers=(
        ("Connection", "close, Host, X-Forwarded-For, X-Real-IP, X-Request-ID, "
                       "X-Forwarded-Host, X-Forwarded-Proto"),
        ("X-Request-ID", "conn-1"),
    )))
    assert resp.status == 200
    seen = seen_headers(resp)
    assert seen.getall("Host") == ["Proxy.Test"]
    assert seen.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert seen.getall("X-Real-IP") == ["127.0.0.1"]
    assert seen.getall("X-Forwarded-Proto") == ["http"]
    assert seen.getall("X-Forwarded-Host") == ["Proxy.Test"]
    assert seen.getall("X-Request-ID") == [resp.get("X-Request-ID")]


_PROXY_ADDS = {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-real-ip",
               "x-request-id"}


@pytest.mark.parametrize(("data", "expected"), [
    (b"GET /api/bare HTTP/1.1\r\nHost: proxy.test\r\nConnection: close\r\n\r\n", {"host"}),
    (b"POST /api/bare HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: 3\r\n"
     b"Connection: close\r\n\r\nabc", {"host", "content-length"}),
    (b"GET /api/bare HTTP/1.0\r\nHost: proxy.test\r\n\r\n", {"host"}),
])
def test_no_headers_are_invented(env: Stack, data: bytes, expected: set[str]) -> None:
    # No User-Agent, Accept, Accept-Encoding or Content-Type the client did not send.
    resp = exchange(env.proxy.port, data)
    assert resp.status == 200
    assert {k.lower() for k in seen_headers(resp)} == expected | _PROXY_ADDS


def test_request_id_is_generated_and_returned(env: Stack) -> None:
    resp = exchange(env.proxy.port, request_bytes("/api/rid"))
    rid = resp.get("X-Request-ID")
    assert rid is not None and re.fullmatch(r"[0-9a-f]{32}", rid)
    assert seen_headers(resp).getall("X-Request-ID") == [rid]
    other = exchange(env.proxy.port, request_bytes("/api/rid")).get("X-Request-ID")
    assert other != rid


def test_sane_client_request_id_is_kept(env: Stack) -> None:
    resp = exchange(env.proxy.port, request_bytes("/api/rid", headers=(("X-Request-ID", "abc-1.2:3"),)))
    assert resp.get("X-Request-ID") == "abc-1.2:3"
    assert seen_headers(resp).getall("X-Request-ID") == ["abc-1.2:3"]


@pytest.mark.parametrize("bad", ["has space", "x" * 129, "semi;colon", "quote\"d"])
def test_odd_client_request_id_is_replaced(env: Stack, bad: str) -> None:
    resp = exchange(env.proxy.port, request_bytes("/api/rid", headers=(("X-Request-ID", bad),)))
    rid = resp.get("X-Request-ID")
    assert rid is not None and re.fullmatch(r"[0-9a-f]{32}", rid)
    assert seen_headers(resp).getall("X-Request-ID") == [rid]


def test_error_responses_carry_the_client_request_id(env: Stack) -> None:
    resp = exchange(env.proxy.port, request_bytes("/nowhere", headers=(("X-Request-ID", "trace-42"),)))
    assert assert_error(resp, 404, "no_route")["request_id"] == "trace-42"


# --- absolute-form request targets (RFC 9112 3.2.2) ---------------------------------------------


def test_absolute_form_target_routes_by_its_authority_not_the_host_header(env: Stack) -> None:
    resp = exchange(env.proxy.port, b"GET http://SHOP.example:8080/anything?q=1 HTTP/1.1\r\n"
                    b"Host: proxy.test\r\nConnection: close\r\n\r\n")
    assert resp.status == 200
    body = resp.json()
    assert body["name"] == "shop"  # proxy.test would have gone to a path route or 404
    assert body["raw_path"] == "/anything?q=1"  # origin-form towards the replica
    seen = seen_headers(resp)
    assert seen.getall("Host") == ["SHOP.example:8080"]  # the authority replaced Host
    assert seen.getall("X-Forwarded-Host") == ["SHOP.example:8080"]


def test_absolute_form_target_path_is_normalised_like_any_other(env: Stack) -> None:
    resp = exchange(env.proxy.port, b"GET http://proxy.test/internal/../api/v2/x HTTP/1.1\r\n"
                    b"Host: proxy.test\r\nConnection: close\r\n\r\n")
    assert resp.status == 200
    assert resp.json()["name"] == "v2"
    assert resp.json()["raw_path"] == "/x"


@pytest.mark.parametrize(("target", "code"), [
    (b"http://user@shop.example/x", "bad_target"),  # ours: userinfo is never routed
    (b"http://shop.example%2f.evil/x", "bad_target"),
    (b"http://shop.example:po/x", "bad_request"),  # aiohttp's parser refuses these first
    (b"http:///x", "bad_request"),
])
def test_absolute_form_target_with_a_bad_authority_is_400(env: Stack, target: bytes,
                                                          code: str) -> None:
    resp = exchange(env.proxy.port, b"GET " + target + b" HTTP/1.1\r\nHost: shop.example\r\n"
                    b"Connection: close\r\n\r\n")
    assert_error(resp, 400, code)


# --- client connections: keep-alive, pipelining, HTTP/1.0 ---------------------------------------


def read_response(f: Any) -> RawResponse:
    """One response off an open connection (which stays open: `closed` is not probed)."""
    status_line = f.readline()
    if not status_line:
        raise ConnectionError("closed before a response")
    return read_response_rest(f, status_line)


def read_response_rest(f: Any, status_line: bytes) -> RawResponse:
    """Headers and body of a response whose status line was read already."""
    headers: list[tuple[str, str]] = []
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    body, complete = _read_body(f, headers)
    return RawResponse(int(status_line.split()[1]), headers, body, complete, False)


def test_keep_alive_connection_serves_requests_one_after_another(env: Stack) -> None:
    with socket.create_connection(("127.0.0.1", env.proxy.port), timeout=5) as s:
        f = s.makefile("rb")
        for i in range(5):
            s.sendall(f"GET /api/v2/respond?body=n{i} HTTP/1.1\r\nHost: proxy.test\r\n\r\n".encode())
            resp = read_response(f)
            assert (resp.status, resp.body, resp.complete) == (200, f"n{i}".encode(), True)
            assert resp.getall("Connection") == []


def test_pipelined_requests_are_answered_in_order(env: Stack) -> None:
    data = b"".join(f"GET /api/v2/respond?body=p{i} HTTP/1.1\r\nHost: proxy.test\r\n\r\n".encode()
                    for i in range(4))
    with socket.create_connection(("127.0.0.1", env.proxy.port), timeout=5) as s:
        s.sendall(data)
        f = s.makefile("rb")
        assert [read_response(f).body for _ in range(4)] == [b"p0", b"p1", b"p2", b"p3"]


@pytest.mark.parametrize(("version", "connection", "answer", "stays_open"), [
    ("1.1", None, [], True),
    ("1.1", "close", ["close"], False),
    ("1.0", None, [], False),
    ("1.0", "keep-alive", ["keep-alive"], True),
])
def test_client_connection_is_kept_or_closed_as_the_client_asked(
        env: Stack, version: str, connection: str | None, answer: list[str],
        stays_open: bool) -> None:
    lines = [f"GET /api/v2/respond?body=v HTTP/{version}", "Host: proxy.test"]
    if connection:
        lines.append(f"Connection: {connection}")
    with socket.create_connection(("127.0.0.1", env.proxy.port), timeout=2) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        f = s.makefile("rb")
        status_line = f.readline()
        assert status_line.startswith(f"HTTP/{version} 200 ".encode())
        resp = read_response_rest(f, status_line)
        assert resp.body == b"v"
        assert resp.getall("Connection") == answer
        s.settimeout(0.5)
        try:
            closed = f.read(1) == b""
        except TimeoutError:
            closed = False
        assert closed is not stays_open


def test_replica_cannot_set_the_request_id_or_framing_of_the_answer(env: Stack) -> None:
    resp = exchange(env.proxy.port, request_bytes(
        "/api/v2/respond?body=abc&h=X-Request-ID:forged&h=Connection:x-a&h=X-A:1&h=X-B:2",
        headers=(("X-Request-ID", "mine-1"),)))
    assert (resp.status, resp.body, resp.complete) == (200, b"abc", True)
    assert resp.getall("X-Request-ID") == ["mine-1"]
    assert resp.getall("Content-Length") == ["3"]
    assert resp.get("X-A") is None
    assert resp.getall("X-B") == ["2"]


def test_client_that_hangs_up_mid_request_is_logged_499_not_500(env: Stack) -> None:
    with socket.create_connection(("127.0.0.1", env.proxy.port), timeout=5) as s:
        s.sendall(b"GET /api/v2/slow?s=2 HTTP/1.1\r\nHost: proxy.test\r\n"
                  b"X-Request-ID: hangup-1\r\n\r\n")
        time.sleep(0.3)  # the request is with the backend now
    line = wait_for(lambda: next((e for e in env.proxy.events("access")
                                  if e.get("request_id") == "hangup-1"), None), timeout=10)
    assert line["status"] == 499
    assert line["error"] == "client_closed"


# --- headers and bodies, backend to client ------------------------------------------------------


def test_hop_by_hop_response_headers_are_stripped(env: Stack) -> None:
    resp = exchange(env.proxy.port, request_bytes("/api/v2/hop"))
    assert resp.status == 200
    assert resp.body == b"hop"
    for name in ("Keep-Alive", "Proxy-Authenticate", "Trailer", "Upgrade", "X-Hop-Secret"):
        assert resp.get(name) is None, name
    assert [v.lower() for v in resp.getall("Connection")] in ([], ["close"])
    assert resp.get("X-End") == "e"
    assert resp.getall("Set-Cookie") == ["a=1", "b=2"]
    assert resp.get("X-Request-ID")


def test_gzip_response_passes_through_undecoded(env: Stack) -> None:
    resp = exchange(env.proxy.port, request_bytes(
        "/api/v2/gzip", headers=(("Accept-Encoding", "gzip"),)))
    assert resp.status == 200
    assert resp.get("Content-Encoding") == "gzip"
    assert resp.body[:2] == b"\x1f\x8b"
    assert resp.get("Content-Length") == str(len(resp.body))
    assert json.loads(gzip.decompress(resp.body)) == {"name": "v2", "compressed": True}


def test_gzip_request_body_passes_through_undecoded(env: Stack) -> None:
    original = json.dumps({"items": ["x" * 50] * 200}).encode()
    compressed = gzip.compress(original)
    r = requests.post(env.proxy.url("/api/v2/upload"), data=compressed,
                      headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
                      timeout=10)
    # The backend decodes the body itself: it must get the client's gzip bytes, as sent.
    assert r.status_code == 200, r.text[:300]
    assert r.json()["received"] == len(original)


# --- upstream faults -------------------------------------------------------------------------


def test_upstream_refusing_connections_is_502_json(env: Stack) -> None:
    r = requests.get(env.proxy.url("/down/x"), timeout=10)
    err = assert_error(r, 502, "upstream_unreachable")
    assert "down" in err["message"]


def test_upstream_cut_mid_body_is_never_a_complete_response(env: Stack) -> None:
    # The backend promises 1000 bytes, sends 100 and aborts: the client must see the damage.
    try:
        resp = exchange(env.proxy.port, request_bytes("/api/v2/cut"))
    except ConnectionError:
        pass  # cut before the status line: not a complete response either
    else:
        assert resp.status == 200
        assert not resp.complete
        assert len(resp.body) < 1000
    with pytest.raises(requests.exceptions.RequestException):
        requests.get(env.proxy.url("/api/v2/cut"), timeout=10).content  # noqa: B018


def test_proxy_keeps_serving_after_upstream_faults(env: Stack) -> None:
    for target in ("/down/x", "/api/v2/cut"):
        try:
            requests.get(env.proxy.url(target), timeout=10)
        except requests.exceptions.RequestException:
            pass
    assert requests.get(env.proxy.url("/api/ok"), timeout=5).json()["name"] == "api"


def test_retried_request_without_host_names_the_replica_it_reaches(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    # An HTTP/1.0 client may send no Host; the proxy supplies the replica's address, and a
    # retry on another replica must name that one, not the one that refused the connection.
    tmp = tmp_path_factory.mktemp("retry-host")
    dead = free_port()
    with run_backend("live") as live:
        routes = write_routes(tmp / "routes.toml", {
            "r": {"path": "/", "upstreams": [f"http://127.0.0.1:{dead}", live]}})
        with run_proxy(tmp, docker="false", routes_file=str(routes)) as proxy:
            hosts = []
            for _ in range(4):  # round robin: at least one of them tries the dead one first
                resp = exchange(proxy.port, b"GET /x HTTP/1.0\r\n\r\n")
                assert resp.status == 200
                hosts += seen_headers(resp).getall("Host")
            retried = [e for e in wait_for(lambda: proxy.events("access")[-4:] if len(
                proxy.events("access")) >= 4 else None, 10) if e["retries"]]
    assert hosts == [live.removeprefix("http://")] * 4
    assert retried  # the case under test did happen


# --- admin -----------------------------------------------------------------------------------


def test_healthz(env: Stack) -> None:
    health = env.proxy.admin("/healthz")
    assert health["status"] == "ok"
    assert health["docker"] == "disabled"
    assert health["routes"] == 6


def test_routes_listing(env: Stack) -> None:
    routes = env.proxy.routes()
    assert set(routes) == {"api", "v2", "internal", "shop", "wild", "down"}
    v2 = routes["v2"]
    assert v2["paths"] == ["/api/v2"]
    assert v2["strip_prefix"] is True
    assert v2["source"] == "file"
    port = env.backends["v2"].rsplit(":", 1)[1]
    assert [r["address"] for r in v2["replicas"]] == [f"127.0.0.1:{port}"]
    assert v2["healthy"] == 1
    assert routes["shop"]["hosts"] == ["shop.example"]
    assert routes["wild"]["hosts"] == ["*.apps.example"]
    assert [r["address"] for r in routes["down"]["replicas"]] == [f"127.0.0.1:{env.down_port}"]
