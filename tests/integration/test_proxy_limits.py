"""Settings that change what the proxy lets through: trusted proxies, body limits, timeouts,
and large bodies streamed both ways."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
import requests
from helpers import ProxyProcess, run_backend, run_proxy, write_routes
from multidict import CIMultiDict

MB = 1024 * 1024


@pytest.fixture(scope="module")
def backend() -> Iterator[str]:
    with run_backend("limits") as base:
        yield base


def _proxy(tmp_path_factory: pytest.TempPathFactory, backend: str, **env: str
           ) -> Iterator[ProxyProcess]:
    tmp = tmp_path_factory.mktemp("proxy-limits")
    routes = write_routes(tmp / "routes.toml", {"all": {"path": "/", "upstreams": [backend]}})
    with run_proxy(tmp, docker="false", routes_file=str(routes), **env) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def trusting(tmp_path_factory: pytest.TempPathFactory, backend: str) -> Iterator[ProxyProcess]:
    yield from _proxy(tmp_path_factory, backend, trusted_proxies="127.0.0.1/32")


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory, backend: str) -> Iterator[ProxyProcess]:
    yield from _proxy(tmp_path_factory, backend, max_body_size="1m", read_timeout="500ms")


@pytest.fixture(scope="module")
def roomy(tmp_path_factory: pytest.TempPathFactory, backend: str) -> Iterator[ProxyProcess]:
    yield from _proxy(tmp_path_factory, backend, max_body_size="0")


def seen(backend: str) -> list[str]:
    return list(requests.get(backend + "/__seen", timeout=5).json()["seen"])


def backend_headers(r: requests.Response) -> CIMultiDict[str]:
    assert r.status_code == 200, r.text[:300]
    return CIMultiDict((k, v) for k, v in r.json()["headers"])


def read_response_head(s: socket.socket) -> tuple[int, bytes]:
    """Status and everything received up to the end of the headers (plus what followed)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1]), data


def read_until_closed_or_length(s: socket.socket, data: bytes) -> bytes:
    """The body after the head, read to its Content-Length."""
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return body


# --- trusted proxies ---------------------------------------------------------------------------


def test_trusted_peer_forwarded_for_is_appended(trusting: ProxyProcess) -> None:
    r = requests.get(trusting.url("/xff"), timeout=5, headers={
        "X-Forwarded-For": "203.0.113.7, 10.1.2.3", "X-Real-IP": "198.51.100.1",
        "X-Forwarded-Proto": "https", "X-Forwarded-Host": "public.example"})
    seen_hdrs = backend_headers(r)
    assert seen_hdrs.getall("X-Forwarded-For") == ["203.0.113.7, 10.1.2.3, 127.0.0.1"]
    # The client is the last hop we do not trust, not what the client said about itself.
    assert seen_hdrs.getall("X-Real-IP") == ["10.1.2.3"]
    assert seen_hdrs.getall("X-Forwarded-Proto") == ["https"]
    assert seen_hdrs.getall("X-Forwarded-Host") == ["public.example"]


def test_trusted_peer_without_forwarded_headers_gets_them_set(trusting: ProxyProcess) -> None:
    seen_hdrs = backend_headers(requests.get(trusting.url("/xff"), timeout=5,
                                             headers={"Host": "site.example"}))
    assert seen_hdrs.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert seen_hdrs.getall("X-Real-IP") == ["127.0.0.1"]
    assert seen_hdrs.getall("X-Forwarded-Proto") == ["http"]
    assert seen_hdrs.getall("X-Forwarded-Host") == ["site.example"]


def test_trusted_peer_still_cannot_claim_an_identity(trusting: ProxyProcess) -> None:
    seen_hdrs = backend_headers(requests.get(trusting.url("/xff"), timeout=5,
                                             headers={"X-Auth-Subject": "admin"}))
    assert "X-Auth-Subject" not in seen_hdrs


def test_untrusted_peer_forwarded_for_is_replaced(strict: ProxyProcess) -> None:
    seen_hdrs = backend_headers(requests.get(strict.url("/xff"), timeout=5, headers={
        "X-Forwarded-For": "203.0.113.7", "X-Real-IP": "203.0.113.7"}))
    assert seen_hdrs.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert seen_hdrs.getall("X-Real-IP") == ["127.0.0.1"]


# --- body size limit -------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "status"), [(MB - 1000, 200), (MB, 200), (MB + 1, 413)])
def test_sized_body_limit_boundary(strict: ProxyProcess, size: int, status: int) -> None:
    r = requests.post(strict.url("/upload"), data=b"a" * size, timeout=10)
    assert r.status_code == status
    if status == 200:
        assert r.json()["received"] == size
    else:
        assert r.json()["error"]["code"] == "body_too_large"


def test_chunked_body_within_the_limit_passes(strict: ProxyProcess) -> None:
    r = requests.post(strict.url("/upload"), data=iter([b"b" * 65536] * 15), timeout=10)
    assert r.status_code == 200
    assert r.json()["received"] == 15 * 65536


def test_declared_length_over_the_limit_is_413_before_the_backend(
    strict: ProxyProcess, backend: str
) -> None:
    with socket.create_connection(("127.0.0.1", strict.port), timeout=5) as s:
        s.sendall(b"POST /upload?over-declared HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n"
                  b"Content-Type: application/octet-stream\r\n\r\n" + b"z" * 65536)
        status, data = read_response_head(s)
        body = read_until_closed_or_length(s, data)
    assert status == 413
    assert b'"code": "body_too_large"' in body
    assert b"Connection: close" in data
    assert not [line for line in seen(backend) if "over-declared" in line]


def test_chunked_body_over_the_limit_is_413(strict: ProxyProcess) -> None:
    with socket.create_connection(("127.0.0.1", strict.port), timeout=5) as s:
        s.sendall(b"POST /upload?over-chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            for _ in range(20):  # 1.25 MB, in 64 KB chunks
                s.sendall(b"10000\r\n" + b"q" * 65536 + b"\r\n")
            s.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the proxy may stop reading once it has answered
        status, data = read_response_head(s)
        body = read_until_closed_or_length(s, data)
    assert status == 413
    assert b'"code": "body_too_large"' in body


def test_expect_continue_over_the_limit_gets_413_not_100(
    strict: ProxyProcess, backend: str
) -> None:
    with socket.create_connection(("127.0.0.1", strict.port), timeout=5) as s:
        s.sendall(b"POST /upload?over-expect HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        status, _ = read_response_head(s)
    assert status == 413
    assert not [line for line in seen(backend) if "over-expect" in line]


def test_expect_continue_like_curl(strict: ProxyProcess) -> None:
    body = b"c" * 300_000
    with socket.create_connection(("127.0.0.1", strict.port), timeout=5) as s:
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nUser-Agent: curl/8.5.0\r\n"
                  b"Content-Length: %d\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n" % len(body))
        # curl waits for the interim response before sending the body
        status, interim = read_response_head(s)
        assert status == 100
        assert interim.endswith(b"\r\n\r\n") and interim.count(b"\r\n\r\n") == 1
        s.sendall(body)
        status, data = read_response_head(s)
        payload = read_until_closed_or_length(s, data)
    assert status == 200
    assert b'"received": 300000' in payload


# --- timeouts --------------------------------------------------------------------------------


def test_slow_upstream_is_504_after_the_read_timeout(strict: ProxyProcess) -> None:
    start = time.monotonic()
    r = requests.get(strict.url("/slow?s=2"), timeout=10)
    elapsed = time.monotonic() - start
    assert r.status_code == 504
    err = r.json()["error"]
    assert err["code"] == "upstream_timeout"
    assert err["status"] == 504
    assert err["request_id"] == r.headers["X-Request-ID"]
    assert elapsed < 1.5, f"504 took {elapsed:.2f}s with a 500 ms read timeout"


def test_upstream_faster_than_the_read_timeout_passes(strict: ProxyProcess) -> None:
    r = requests.get(strict.url("/slow?s=0.1"), timeout=10)
    assert r.status_code == 200
    assert r.text.startswith("slept")


# --- large bodies ------------------------------------------------------------------------------


def test_large_download_streams_completely(roomy: ProxyProcess) -> None:
    size = 100 * MB
    with requests.get(roomy.url(f"/stream?bytes={size}"), stream=True, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["Content-Length"] == str(size)
        assert "Transfer-Encoding" not in r.headers
        total = sum(len(c) for c in r.iter_content(1024 * 1024))
    assert total == size


def test_large_chunked_download_streams_completely(roomy: ProxyProcess) -> None:
    size = 20 * MB + 123
    with requests.get(roomy.url(f"/stream?bytes={size}&chunked=1"), stream=True, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers.get("Transfer-Encoding") == "chunked"
        assert "Content-Length" not in r.headers
        total = sum(len(c) for c in r.iter_content(1024 * 1024))
    assert total == size


def test_large_chunked_upload_streams_completely(roomy: ProxyProcess) -> None:
    block = b"u" * MB
    r = requests.post(roomy.url("/upload"), data=(block for _ in range(50)), timeout=60)
    assert r.status_code == 200
    assert r.json()["received"] == 50 * MB


def test_large_sized_upload_streams_completely(roomy: ProxyProcess) -> None:
    r = requests.post(roomy.url("/upload"), data=b"s" * (30 * MB), timeout=60)
    assert r.status_code == 200
    assert r.json()["received"] == 30 * MB


# --- backpressure: a slow side never makes the proxy buffer the body -------------------------


@pytest.fixture
def fresh(tmp_path_factory: pytest.TempPathFactory, backend: str) -> Iterator[ProxyProcess]:
    """A proxy of its own: no earlier transfer has raised its peak memory."""
    yield from _proxy(tmp_path_factory, backend, max_body_size="0")


def peak_rss_mb(proxy: ProxyProcess) -> float:
    """The proxy's peak resident memory so far (VmHWM), in MB."""
    with open(f"/proc/{proxy.proc.pid}/status") as f:
        line = next(ln for ln in f if ln.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def test_upload_to_a_backend_that_is_not_reading_does_not_pile_up_in_the_proxy(
        fresh: ProxyProcess) -> None:
    # The backend reads nothing for 2 s while the client pushes 60 MB as fast as it can: a proxy
    # that kept reading the client would hold most of it in memory.
    before = peak_rss_mb(fresh)
    block = b"h" * MB
    r = requests.post(fresh.url("/upload?hold=2"), data=(block for _ in range(60)), timeout=60)
    assert r.status_code == 200
    assert r.json()["received"] == 60 * MB
    assert peak_rss_mb(fresh) - before < 20


def test_download_to_a_client_that_is_not_reading_does_not_pile_up_in_the_proxy(
        fresh: ProxyProcess) -> None:
    before = peak_rss_mb(fresh)
    size = 60 * MB
    with socket.create_connection(("127.0.0.1", fresh.port), timeout=30) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.sendall(f"GET /stream?bytes={size} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                  .encode())
        time.sleep(2)  # not reading: the backend keeps sending
        got = 0
        while chunk := s.recv(1024 * 1024):
            got += len(chunk)
    assert got > size  # head plus the whole body
    assert peak_rss_mb(fresh) - before < 20
