"""Replicas that misbehave on purpose, behind the real proxy process: an answer ends where its
own framing says, what a replica sends after it never reaches a client, and a malformed answer
is a 502 upstream_error. Replicas and clients are raw sockets writing exact bytes."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import ProxyProcess, close_listener, run_proxy, wait_for, write_routes

INJECTED = b"HTTP/1.1 200 OK\r\nSet-Cookie: injected=1\r\nContent-Length: 8\r\n\r\ninjected"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

# A script gets the replica's socket and its connection number; it writes the answer and says
# whether the connection may carry another request.
Script = Callable[[socket.socket, int], bool]


class RawReplica:
    """A replica on a raw socket. Each request's path picks a script (or exact bytes).

    Counts accepted connections, and records which connection served which path and which
    connections the proxy closed, so a test can tell a fresh upstream connection from a
    reused one."""

    def __init__(self) -> None:
        self.scripts: dict[str, bytes | Script] = {}
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.served: list[tuple[int, str]] = []
        self.closed: set[int] = set()
        self.events: dict[str, threading.Event] = {}
        self.counters: dict[str, int] = {}
        self._lock = threading.Lock()
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def connection_of(self, path: str) -> int:
        return next(n for n, p in reversed(self.served) if p == path)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                number = self.accepted
            threading.Thread(target=self._serve, args=(conn, number), daemon=True).start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, buf = buf.split(b"\r\n\r\n", 1)
                path = head.split(b" ")[1].decode()
                self.served.append((number, path))
                script = self.scripts[path]
                if not path.startswith("/early"):  # /early* answers before reading the body
                    buf = self._skip_body(conn, head, buf)
                if isinstance(script, bytes):
                    conn.sendall(script)
                elif not script(conn, number):
                    return
        except OSError:
            return
        finally:
            self.closed.add(number)
            conn.close()

    @staticmethod
    def _skip_body(conn: socket.socket, head: bytes, buf: bytes) -> bytes:
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
            elif name.strip().lower() == b"transfer-encoding":
                while b"0\r\n\r\n" not in buf:
                    buf += conn.recv(65536)
                return buf.split(b"0\r\n\r\n", 1)[1]
        while len(buf) < length:
            buf += conn.recv(65536)
        return buf[length:]

    def close(self) -> None:
        close_listener(self.sock, self._accepting)


@pytest.fixture(scope="module")
def replica() -> Iterator[RawReplica]:
    r = RawReplica()
    yield r
    r.close()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, replica: RawReplica) -> Iterator[ProxyProcess]:
    tmp = tmp_path_factory.mktemp("upstream-hardening")
    routes = write_routes(tmp / "routes.toml", {
        "raw": {"path": "/", "upstreams": [f"http://127.0.0.1:{replica.port}"], "retries": 0},
    })
    with run_proxy(tmp, docker="false", routes_file=str(routes), read_timeout="2s") as p:
        yield p


# --- the client's side: exact bytes --------------------------------------------------------

class Client:
    """One client connection; every byte it ever received is kept in `seen`."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""
        self.seen = b""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def _more(self) -> bool:
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        self.buf += chunk
        self.seen += chunk
        return bool(chunk)

    def request(self, method: str, path: str, extra: bytes = b"") -> tuple[int, bytes, bytes]:
        self.sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: t\r\n".encode() + extra + b"\r\n")
        return self.response(head_only=method == "HEAD")

    def response(self, head_only: bool = False) -> tuple[int, bytes, bytes]:
        """Status, head and body of one answer, read by its framing (or to the close)."""
        while b"\r\n\r\n" not in self.buf:
            if not self._more():
                raise ConnectionError(f"closed before a whole head: {self.buf!r}")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status = int(head.split(b" ")[1])
        lines = head.lower().split(b"\r\n")
        length = next((int(x.split(b":")[1]) for x in lines if x.startswith(b"content-length:")),
                      None)
        chunked = b"transfer-encoding: chunked" in lines
        if head_only or status in (204, 304):
            return status, head, b""
        if chunked:
            while not self.buf.endswith(b"0\r\n\r\n"):
                if not self._more():
                    raise ConnectionError("closed in a chunked body")
            body, self.buf = _dechunk(self.buf), b""
            return status, head, body
        assert length is not None, head
        while len(self.buf) < length:
            if not self._more():
                raise ConnectionError(f"closed after {len(self.buf)} of {length} body bytes")
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, head, body

    def closed(self) -> bool:
        """True once the proxy closed this connection (nothing more arrives)."""
        self.sock.settimeout(5)
        return not self._more()


def _dechunk(data: bytes) -> bytes:
    out = b""
    while True:
        size_line, data = data.split(b"\r\n", 1)
        size = int(size_line, 16)
        if size == 0:
            return out
        out, data = out + data[:size], data[size + 2:]


def error_code(body: bytes) -> str:
    return str(json.loads(body)["error"]["code"])


def no_traceback(p: ProxyProcess) -> None:
    log = p.log_text()
    assert "Traceback" not in log and "proxy_error" not in log


# --- an answer ends where its framing says -------------------------------------------------

def test_keep_alive_reuses_one_upstream_connection(proxy: ProxyProcess,
                                                   replica: RawReplica) -> None:
    """The control for the tests below: a clean answer leaves its connection in the pool."""
    replica.scripts["/clean"] = OK
    with Client(proxy.port) as c:
        for _ in range(3):
            assert c.request("GET", "/clean")[::2] == (200, b"ok")
    served = [n for n, p in replica.served if p == "/clean"]
    assert len(set(served[-3:])) == 1


def test_second_message_in_the_same_write_never_reaches_the_client(
        proxy: ProxyProcess, replica: RawReplica) -> None:
    replica.scripts["/overrun"] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello" + INJECTED
    replica.scripts["/after-overrun"] = OK
    with Client(proxy.port) as c:
        status, head, body = c.request("GET", "/overrun")
        assert (status, body) == (200, b"hello")
        assert b"\r\nContent-Length: 5" in head and b"Set-Cookie" not in head
        first = replica.connection_of("/overrun")
        # The same client connection goes on; its next request gets a fresh upstream one.
        assert c.request("GET", "/after-overrun")[::2] == (200, b"ok")
        assert replica.connection_of("/after-overrun") != first
        assert first in replica.closed
        assert b"injected" not in c.seen
    no_traceback(proxy)


def test_bytes_sent_while_the_connection_is_idle_discard_it(
        proxy: ProxyProcess, replica: RawReplica) -> None:
    sent = threading.Event()
    later = threading.Event()

    def answer_then_more(conn: socket.socket, number: int) -> bool:
        conn.sendall(OK)
        later.wait(10)  # once the client holds its answer and the connection sits in the pool
        conn.sendall(INJECTED)
        sent.set()
        return True

    replica.scripts["/idle-talker"] = answer_then_more
    replica.scripts["/after-idle"] = OK
    with Client(proxy.port) as c:
        assert c.request("GET", "/idle-talker")[::2] == (200, b"ok")
        later.set()
        sent.wait(10)
        first = replica.connection_of("/idle-talker")
        wait_for(lambda: first in replica.closed, 5, what="the proxy dropping the connection")
        assert c.request("GET", "/after-idle")[::2] == (200, b"ok")
        assert replica.connection_of("/after-idle") != first
        assert b"injected" not in c.seen


@pytest.mark.parametrize(("method", "answer", "status"), [
    ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 200),
    ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello" + INJECTED, 200),
    ("GET", b"HTTP/1.1 204 No Content\r\n\r\nhello" + INJECTED, 204),
    ("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 8\r\n\r\n" + INJECTED, 304),
], ids=["head-body", "head-message", "204", "304"])
def test_bodyless_answer_followed_by_bytes_is_delivered_and_the_connection_dropped(
        proxy: ProxyProcess, replica: RawReplica, method: str, answer: bytes,
        status: int) -> None:
    path = f"/bodyless-{status}-{method}-{len(answer)}"
    replica.scripts[path] = answer
    replica.scripts[path + "-next"] = OK
    with Client(proxy.port) as c:
        got, _, body = c.request(method, path)
        assert (got, body) == (status, b"")
        first = replica.connection_of(path)
        assert c.request("GET", path + "-next")[::2] == (200, b"ok")
        assert replica.connection_of(path + "-next") != first
        assert b"injected" not in c.seen and b"hello" not in c.seen


def test_early_answer_before_the_body_was_sent_is_not_reused(
        proxy: ProxyProcess, replica: RawReplica) -> None:
    replica.scripts["/early"] = b"HTTP/1.1 413 Too Large\r\nContent-Length: 4\r\n\r\nbig!"
    replica.scripts["/after-early"] = OK
    with Client(proxy.port) as c:
        c.sock.sendall(b"POST /early HTTP/1.1\r\nHost: t\r\nContent-Length: 4000000\r\n\r\n"
                       + b"x" * 65536)
        status, _, body = c.response()
        assert (status, body) == (413, b"big!")
    first = replica.connection_of("/early")
    with Client(proxy.port) as c:
        assert c.request("GET", "/after-early")[::2] == (200, b"ok")
    assert replica.connection_of("/after-early") != first


def test_trailers_never_become_headers(proxy: ProxyProcess, replica: RawReplica) -> None:
    replica.scripts["/trailers"] = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                    b"2\r\nok\r\n0\r\nSet-Cookie: injected=1\r\n\r\n")
    with Client(proxy.port) as c:
        status, _head, body = c.request("GET", "/trailers")
        assert (status, body) == (200, b"ok")
        assert b"injected" not in c.seen


def broken_off(c: Client, path: str) -> None:
    """The answer failed after its head may have gone out: either a 502, or a head then a cut
    connection, never a complete-looking answer kept alive."""
    c.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    try:
        status, _, body = c.response()
    except ConnectionError:
        assert c.seen.startswith(b"HTTP/1.1 200")
    else:
        assert (status, error_code(body)) == (502, "upstream_error")


def test_truncated_body_never_looks_complete(proxy: ProxyProcess, replica: RawReplica) -> None:
    def short(conn: socket.socket, number: int) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")
        return False  # and close

    replica.scripts["/short"] = short
    with Client(proxy.port) as c:
        broken_off(c, "/short")
    no_traceback(proxy)


def test_trailers_over_the_limit_break_the_answer_off(proxy: ProxyProcess,
                                                      replica: RawReplica) -> None:
    replica.scripts["/huge-trailers"] = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n"
        + b"X-T: " + b"a" * 200_000 + b"\r\n\r\n")
    with Client(proxy.port) as c:
        broken_off(c, "/huge-trailers")
        assert c.seen.startswith(b"HTTP/1.1 502") or c.closed()
    no_traceback(proxy)


def test_a_reason_split_over_two_reads_arrives_whole(proxy: ProxyProcess,
                                                     replica: RawReplica) -> None:
    def split(conn: socket.socket, number: int) -> bool:
        conn.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 Very")
        threading.Event().wait(0.05)  # a separate read for the rest of the reason
        conn.sendall(b" Long Reason\r\nContent-Length: 2\r\n\r\nok")
        return True

    replica.scripts["/split"] = split
    with Client(proxy.port) as c:
        _status, head, body = c.request("GET", "/split")
        assert head.startswith(b"HTTP/1.1 200 Very Long Reason\r\n") and body == b"ok"
        assert b"Link" not in head  # interim heads are not forwarded


BIG = b"x" * 300_000
FRAMINGS = {
    "head of a chunked answer": ("HEAD", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                                 b""),
    "304 with chunked": ("GET", b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n"
                                b"\r\n", b""),
    "streamed by length": ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BIG)
                           + BIG, BIG),
    "streamed chunked": ("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n"
                         % len(BIG) + BIG + b"\r\n0\r\n\r\n", BIG),
    "small chunked": ("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"2\r\nok\r\n0\r\n\r\n", b"ok"),
}


@pytest.mark.parametrize(("method", "answer", "body"), FRAMINGS.values(), ids=FRAMINGS.keys())
def test_the_client_never_gets_both_content_length_and_transfer_encoding(
        proxy: ProxyProcess, replica: RawReplica, method: str, answer: bytes,
        body: bytes) -> None:
    path = f"/framing-{abs(hash(answer))}"
    replica.scripts[path] = answer
    with Client(proxy.port) as c:
        _, head, got = c.request(method, path)
        assert got == body
        low = head.lower()
        assert not (b"\r\ncontent-length:" in low and b"\r\ntransfer-encoding:" in low), head


# --- malformed answers: 502 upstream_error -------------------------------------------------

MALFORMED = {
    "duplicate content-length": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n"
                                b"\r\nok",
    "conflicting content-length": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                                  b"Content-Length: 8\r\n\r\nokinjected",
    "content-length list": b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok",
    "content-length and chunked": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                                  b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "chunked and content-length": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                                  b"Content-Length: 2\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "gzip coding": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nok",
    "gzip, chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                     b"2\r\nok\r\n0\r\n\r\n",
    "two transfer-encodings": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "bad chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n",
    "chunk without its CRLF": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                              b"2\r\nokX0\r\n\r\n",
    "NUL in a value": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
    "CR in a value": b"HTTP/1.1 200 OK\r\nX-A: a\rSet-Cookie: injected=1\r\n"
                     b"Content-Length: 0\r\n\r\n",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: a\r\n Set-Cookie: injected=1\r\n"
                b"Content-Length: 0\r\n\r\n",
    "status 000": b"HTTP/1.1 000 OK\r\nContent-Length: 0\r\n\r\n",
    "HTTP/2.0": b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    "not HTTP": b"hello there\r\n\r\n",
    "NUL in the reason": b"HTTP/1.1 200 O\x00K\r\nContent-Length: 0\r\n\r\n",
    "101 unasked": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                   b"Connection: upgrade\r\n\r\n" + INJECTED,
    "bare 101": b"HTTP/1.1 101 Switching Protocols\r\n\r\n" + INJECTED,
    "101 headers": b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(101))
                   + b"Content-Length: 0\r\n\r\n",
    "a 70 KB header": b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000
                      + b"\r\nContent-Length: 0\r\n\r\n",
    "70 headers of 1 KB": b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"a" * 1000)
                                                              for i in range(70))
                          + b"Content-Length: 0\r\n\r\n",
    "1xx flood": b"HTTP/1.1 100 Continue\r\n\r\n" * 3000 + INJECTED,
}


@pytest.mark.parametrize("answer", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_answer_is_502_upstream_error(proxy: ProxyProcess, replica: RawReplica,
                                                answer: bytes) -> None:
    path = f"/malformed-{abs(hash(answer))}"
    replica.scripts[path] = answer
    replica.scripts[path + "-next"] = OK
    with Client(proxy.port) as c:
        status, head, body = c.request("GET", path)
        assert (status, error_code(body)) == (502, "upstream_error"), (head, body[:300])
        assert b"malformed response from the replica" in body
        first = replica.connection_of(path)
        wait_for(lambda: first in replica.closed, 5, what="the proxy closing the replica")
        assert c.request("GET", path + "-next")[::2] == (200, b"ok")
        assert b"injected" not in c.seen and b"Set-Cookie" not in c.seen
    no_traceback(proxy)


def test_header_count_at_the_limit_passes(proxy: ProxyProcess, replica: RawReplica) -> None:
    replica.scripts["/hundred"] = (b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i
                                                                      for i in range(99))
                                   + b"Content-Length: 2\r\n\r\nok")
    with Client(proxy.port) as c:
        status, head, body = c.request("GET", "/hundred")
        assert (status, body) == (200, b"ok") and b"X-98: v" in head


def _rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))


def test_an_endless_header_is_cut_off_after_the_limit(proxy: ProxyProcess,
                                                       replica: RawReplica) -> None:
    sent = [0]

    def endless(conn: socket.socket, number: int) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nX-Big: ")
        piece = b"a" * 65536
        try:
            while sent[0] < 64 * 1024 * 1024:
                conn.sendall(piece)
                sent[0] += len(piece)
        except OSError:
            pass  # the proxy hung up: what we wanted
        return False

    replica.scripts["/endless"] = endless
    before = _rss_kb(proxy.proc.pid)
    with Client(proxy.port) as c:
        status, _, body = c.request("GET", "/endless")
        assert (status, error_code(body)) == (502, "upstream_error")
        assert b"response head over 65536 bytes" in body
    wait_for(lambda: replica.connection_of("/endless") in replica.closed, 10,
             what="the replica seeing its connection cut")
    assert sent[0] < 16 * 1024 * 1024, sent[0]  # socket buffers, not the 64 MB
    assert _rss_kb(proxy.proc.pid) - before < 16 * 1024


def test_limits_come_from_the_settings(tmp_path: Path, replica: RawReplica) -> None:
    routes = write_routes(tmp_path / "routes.toml", {
        "raw": {"path": "/", "upstreams": [f"http://127.0.0.1:{replica.port}"], "retries": 0},
    })
    replica.scripts["/six-headers"] = (b"HTTP/1.1 200 OK\r\n" + b"X-A: 1\r\n" * 5
                                       + b"Content-Length: 2\r\n\r\nok")
    replica.scripts["/two-kb"] = (b"HTTP/1.1 200 OK\r\nX-A: " + b"a" * 2048
                                  + b"\r\nContent-Length: 2\r\n\r\nok")
    with run_proxy(tmp_path, docker="false", routes_file=str(routes),
                   max_response_headers="5", max_response_header_size="1k") as p, \
            Client(p.port) as c:
        status, _, body = c.request("GET", "/six-headers")
        assert (status, error_code(body)) == (502, "upstream_error")
        assert b"more than 5 header lines" in body
        status, _, body = c.request("GET", "/two-kb")
        assert (status, error_code(body)) == (502, "upstream_error")
        assert b"response head over 1024 bytes" in body
