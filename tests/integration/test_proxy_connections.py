"""A client connection's own limits and timeouts, over raw sockets against the real proxy: the
size of a request head, its number of headers and its target; the idle (keep-alive) and header
timeouts of every request on a connection; and an answer that closes the connection closing
it at once, with nothing after it read or served."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
import requests
from helpers import ProxyProcess, run_backend, run_proxy, write_routes

KEEPALIVE = 1.0
HEADER_TIMEOUT = 2.5
MAX_URI = 4096  # under the test backend's own 8190


@pytest.fixture(scope="module")
def backend() -> Iterator[str]:
    with run_backend("conn") as base:
        yield base


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, backend: str) -> Iterator[ProxyProcess]:
    # The keep-alive timeout is shorter than the header timeout on purpose: a head that has
    # begun must get its 408 at the header deadline, not be dropped as an idle connection.
    tmp = tmp_path_factory.mktemp("proxy-conn")
    routes = write_routes(tmp / "routes.toml", {"all": {"path": "/", "upstreams": [backend]}})
    with run_proxy(tmp, docker="false", routes_file=str(routes), max_body_size="1m",
                   keepalive_timeout=f"{KEEPALIVE}s", header_timeout=f"{HEADER_TIMEOUT}s",
                   max_uri_size=str(MAX_URI)) as p:
        yield p


_pending: dict[int, bytes] = {}  # bytes read past an answer, per socket, for the next one


def seen(backend: str, marker: str) -> list[str]:
    lines = requests.get(backend + "/__seen", timeout=5).json()["seen"]
    return [line for line in lines if marker in line]


def connect(proxy: ProxyProcess) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    _pending.pop(s.fileno(), None)  # left by an earlier socket with the same number
    return s


def read_until_closed(s: socket.socket) -> tuple[bytes, float]:
    """Everything the proxy sends until it closes, and when (monotonic) the close was seen."""
    out = _pending.pop(s.fileno(), b"")
    try:
        while chunk := s.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out, time.monotonic()


def read_answer(s: socket.socket) -> bytes:
    """One whole answer with a Content-Length body (pipelined answers are read one by one)."""
    data = _pending.pop(s.fileno(), b"")
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, "closed inside the body"
        body += chunk
    body, _pending[s.fileno()] = body[:length], body[length:]
    return head + b"\r\n\r\n" + body


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def head_of(size: int, marker: str, name: str = "X-Fill") -> bytes:
    """A GET head of exactly `size` bytes, filled with headers of at most 1000 bytes."""
    start = f"GET /{marker} HTTP/1.1\r\nHost: t\r\n".encode()
    room = size - len(start) - 2
    lines = []
    i = 0
    while room > 0:
        line_len = min(1000, room)
        if room - line_len and room - line_len < 12:  # the last line needs room for a name
            line_len = room - 12
        prefix = f"{name}-{i}: ".encode()
        lines.append(prefix + b"v" * (line_len - len(prefix) - 2) + b"\r\n")
        room -= line_len
        i += 1
    head = start + b"".join(lines) + b"\r\n"
    assert len(head) == size, len(head)
    return head


# --- the size of a request head --------------------------------------------------------------


def test_a_head_of_exactly_the_limit_is_served(proxy: ProxyProcess, backend: str) -> None:
    with connect(proxy) as s:
        s.sendall(head_of(32 * 1024, "whole-ok"))
        assert status(read_answer(s)) == 200
    assert seen(backend, "whole-ok")


def test_a_head_over_the_limit_of_small_lines_is_431_and_closed(
        proxy: ProxyProcess, backend: str) -> None:
    # Each line is far under the old single-line limit: only the whole head is too large.
    with connect(proxy) as s:
        s.sendall(head_of(32 * 1024 + 1, "whole-over"))
        answer, _ = read_until_closed(s)
    assert status(answer) == 431, answer[:200]
    assert b'"code": "header_too_large"' in answer
    assert b"Connection: close" in answer
    assert not seen(backend, "whole-over")


def test_a_huge_head_is_refused_before_it_is_all_sent(proxy: ProxyProcess) -> None:
    # 2 MB of headers: the answer comes once the limit is passed, not after 2 MB were buffered.
    with connect(proxy) as s:
        s.sendall(b"GET /huge HTTP/1.1\r\nHost: t\r\n")
        sent = 0
        try:
            while sent < 2 * 1024 * 1024:
                s.sendall(b"X-Many: " + b"m" * 990 + b"\r\n")
                sent += 1000
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer, _ = read_until_closed(s)
    assert status(answer) == 431, answer[:200]


def test_more_headers_than_the_count_limit_is_431(proxy: ProxyProcess, backend: str) -> None:
    def head(count: int, marker: str) -> bytes:
        return (f"GET /{marker} HTTP/1.1\r\nHost: t\r\n".encode()
                + b"".join(b"X-N-%d: 1\r\n" % i for i in range(count - 1)) + b"\r\n")

    with connect(proxy) as s:
        s.sendall(head(100, "count-ok"))  # Host and 99 others
        assert status(read_answer(s)) == 200
    with connect(proxy) as s:
        s.sendall(head(101, "count-over"))
        answer, _ = read_until_closed(s)
    assert status(answer) == 431, answer[:200]
    assert b"more than 100 headers" in answer
    assert seen(backend, "count-ok") and not seen(backend, "count-over")


@pytest.mark.parametrize("lead", ["", "\r\n", "\n\r\n"])
@pytest.mark.parametrize("length", [MAX_URI + 1, 20_000, 40_000])
def test_a_request_target_over_its_limit_is_414(proxy: ProxyProcess, length: int,
                                                lead: str) -> None:
    # Empty lines before the request line are skipped (RFC 9112 2.2), not counted as a head.
    target = "/long?" + "a" * (length - 6)
    with connect(proxy) as s:
        s.sendall(f"{lead}GET {target} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        answer, _ = read_until_closed(s)
    assert status(answer) == 414, answer[:200]
    assert b'"code": "uri_too_long"' in answer


def test_a_request_target_at_its_limit_is_served(proxy: ProxyProcess) -> None:
    target = "/long-ok?" + "a" * (MAX_URI - 9)
    with connect(proxy) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        assert status(read_answer(s)) == 200


def test_a_header_line_over_the_limit_is_still_431_not_414(proxy: ProxyProcess) -> None:
    with connect(proxy) as s:
        s.sendall(b"GET /line HTTP/1.1\r\nHost: t\r\nX-Big: " + b"b" * 40_000 + b"\r\n\r\n")
        answer, _ = read_until_closed(s)
    assert status(answer) == 431, answer[:200]


def test_heads_are_measured_one_by_one_on_a_kept_alive_connection(
        proxy: ProxyProcess, backend: str) -> None:
    # Three heads of 20 KB each, pipelined with a sized and a chunked body in between: each is
    # under the limit although together they are not, and no body byte counts as a head byte.
    h1 = head_of(20_000, "pipe-1").replace(b"GET", b"POST", 1)
    h1 = h1[:-2] + b"Content-Length: 10\r\n\r\n" + b"0123456789"
    h2 = head_of(20_000, "pipe-2").replace(b"GET", b"POST", 1)
    h2 = h2[:-2] + b"Transfer-Encoding: chunked\r\n\r\n" + b"4\r\n\r\n\r\n\r\n0\r\n\r\n"
    h3 = head_of(20_000, "pipe-3")
    with connect(proxy) as s:
        s.sendall(h1 + h2 + h3)
        assert [status(read_answer(s)) for _ in range(3)] == [200, 200, 200]
    assert all(seen(backend, f"pipe-{i}") for i in (1, 2, 3))


# --- timeouts ----------------------------------------------------------------------------------


def test_an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout(
        proxy: ProxyProcess) -> None:
    with connect(proxy) as s:
        s.sendall(b"GET /idle HTTP/1.1\r\nHost: t\r\n\r\n")
        assert status(read_answer(s)) == 200
        answered = time.monotonic()
        rest, closed = read_until_closed(s)
    assert rest == b""  # closed quietly: an idle connection gets no 408
    assert KEEPALIVE - 0.2 < closed - answered < KEEPALIVE + 1.0


def test_a_second_head_begun_after_an_answer_gets_408_at_the_header_deadline(
        proxy: ProxyProcess, backend: str) -> None:
    with connect(proxy) as s:
        # A whole request and the start of the next in one write, then nothing.
        s.sendall(b"GET /second-1 HTTP/1.1\r\nHost: t\r\n\r\nGET /second-2 HTTP/1.1\r\nHost: t\r\n")
        started = time.monotonic()
        assert status(read_answer(s)) == 200
        rest, closed = read_until_closed(s)
    assert status(rest) == 408, rest[:200]
    assert b'"code": "request_timeout"' in rest
    assert HEADER_TIMEOUT - 0.2 < closed - started < HEADER_TIMEOUT + 1.5
    assert not seen(backend, "second-2")


def test_a_head_sent_byte_by_byte_is_cut_at_its_deadline(proxy: ProxyProcess) -> None:
    # Each byte comes well within the keep-alive timeout: only the head's own deadline, counted
    # from its first byte and not reset by the next ones, ends it.
    head = b"GET /trickle HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"s" * 200
    with connect(proxy) as s:
        s.sendall(b"GET /trickle-0 HTTP/1.1\r\nHost: t\r\n\r\n")
        assert status(read_answer(s)) == 200
        started = time.monotonic()
        answer = b""
        try:
            for byte in head:
                s.sendall(bytes([byte]))
                s.settimeout(0.3)
                try:
                    answer = s.recv(65536)
                except TimeoutError:
                    continue
                break
        except (BrokenPipeError, ConnectionResetError):
            pass
        elapsed = time.monotonic() - started
    assert status(answer) == 408, answer[:200]
    assert HEADER_TIMEOUT - 0.2 < elapsed < HEADER_TIMEOUT + 1.0


# --- an answer that closes the connection --------------------------------------------------


def test_nothing_after_a_413_is_read_or_served(proxy: ProxyProcess, backend: str) -> None:
    with connect(proxy) as s:
        s.sendall(b"POST /upload?after-413 HTTP/1.1\r\nHost: t\r\nContent-Length: 2000000\r\n\r\n"
                  b"GET /smuggled-after-413 HTTP/1.1\r\nHost: t\r\n\r\n")
        answer = read_answer(s)
        answered = time.monotonic()
        rest, closed = read_until_closed(s)
    assert status(answer) == 413
    assert b"Connection: close" in answer
    assert rest == b""
    assert closed - answered < 0.5  # EOF right after the answer, not seconds later
    assert not seen(backend, "smuggled-after-413")


def test_nothing_after_a_400_is_read_or_served(proxy: ProxyProcess, backend: str) -> None:
    with connect(proxy) as s:
        s.sendall(b"GET /bad HTTP/1.1\r\nHost: t\r\nBad Header: x\r\n\r\n"
                  b"GET /smuggled-after-400 HTTP/1.1\r\nHost: t\r\n\r\n")
        answer, _ = read_until_closed(s)
    assert status(answer) == 400
    assert answer.count(b"HTTP/1.") == 1
    assert not seen(backend, "smuggled-after-400")


def test_a_client_asking_to_close_is_closed_at_once(proxy: ProxyProcess, backend: str) -> None:
    with connect(proxy) as s:
        s.sendall(b"GET /asked-close HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
                  b"GET /after-asked-close HTTP/1.1\r\nHost: t\r\n\r\n")
        answer = read_answer(s)
        answered = time.monotonic()
        rest, closed = read_until_closed(s)
    assert status(answer) == 200 and rest == b""
    assert closed - answered < 0.5
    assert not seen(backend, "after-asked-close")


def test_the_proxy_keeps_serving_after_refusals(proxy: ProxyProcess) -> None:
    assert requests.get(proxy.url("/still-up"), timeout=5).status_code == 200
    assert "Traceback" not in proxy.log_text()
