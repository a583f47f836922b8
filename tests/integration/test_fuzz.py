"""Fuzzing the proxy from both sides over loopback: mutated requests, mutated replica answers.

One proxy process serves the whole module, in front of two raw-socket replicas of our own: a
well-behaved one that records every request head it is sent, and a scripted one that answers
with whatever bytes the current example chose. Hypothesis runs a bounded, derandomized number of
examples (the same ones on every run, so CI is reproducible), and every socket has a timeout, so
a hang fails an example instead of blocking the suite.

Properties, checked after every example:
- the proxy process is up and still answers a good request;
- a client's own malformed request never gets a 5xx (501 and 505 are the answers HTTP asks for
  an unsupported coding or version, so they are the only ones allowed);
- the proxy's log has no traceback and no `proxy_error`;
- a head the proxy must refuse is refused with its status and never forwarded: a version other
  than HTTP/1.0 or 1.1 (505), a transfer coding other than chunked (501), a target over the
  limit (414), a head or header count over the limit (431); the proxy answers in HTTP/1.x and
  answers nothing after an answer that said `Connection: close`;
- a replica never sees more request heads than a strict parser (llhttp) finds in what the client
  sent, never a request smuggled inside a body, never two `Host` or an invalid one, never two
  `Authorization` on a route that verified one, and never bytes it can't parse;
- a client never sees bytes a replica sent after the end of its answer, and a malformed answer is
  a 502 (or a cut connection once the head was sent), never a 200 carrying the extra bytes.
"""

from __future__ import annotations

import base64
import hashlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httptools
import jwt
import pytest
from helpers import ProxyProcess, close_listener, run_proxy, write_routes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

JWT_SECRET = "fuzz-secret-" + "k" * 32
HOST = b"fuzz.test"
MARKERS = (b"INJECTED", b"injected=1")  # only ever placed after the end of a replica's answer
SMUGGLED = b"GET /good/smuggled HTTP/1.1\r\nHost: fuzz.test\r\n\r\n"
GOOD = b"GET /good/alive HTTP/1.1\r\nHost: fuzz.test\r\nConnection: close\r\n\r\n"
OK_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
SAFE_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nsafe"
# The statuses a client's own error may earn: everything below 500, plus 501 (a transfer coding
# we don't implement) and 505 (an HTTP version we don't speak).
CLIENT_ERROR_5XX = (501, 505)
# RFC 3986 host (reg-name, IPv4 or [IPv6]) with an optional numeric port; empty is allowed when
# the target has no authority (RFC 9112 section 3.2).
VALID_HOST = re.compile(rb"(?:(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*"
                        rb"|\[[0-9A-Fa-f:.]+\])(?::[0-9]*)?")
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
HEAD_LIMIT = 16 * 1024  # EDGEPROXY_MAX_HEADER_SIZE below: the whole request head
HEADER_COUNT_LIMIT = 1000  # over any proxy's count limit (Envoy 100, HAProxy 101)
TARGET_LIMIT = 64 * 1024  # over any proxy's request-target limit (nginx 8k, Envoy 60k)

# Shrunk examples of a 70 KB request are long; their repr is what a failure must show.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

# About 0.1 s per request example and 0.01 s per answer example on an idle machine: ~25 s in all.
REQUEST_SETTINGS = settings(
    max_examples=150, deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)
ANSWER_SETTINGS = settings(REQUEST_SETTINGS, max_examples=400)


# --- replicas ---------------------------------------------------------------------------------

@dataclass
class Head:
    """A request head as a replica received it."""

    url: bytes
    headers: list[tuple[bytes, bytes]]

    def values(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name]


class _RequestParse:
    """httptools callbacks that collect request heads; the owner reacts to each stage."""

    def __init__(self, on_head: Any, on_complete: Any) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self._on_head, self._on_complete = on_head, on_complete
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []

    def on_message_begin(self) -> None:
        self.url, self.headers = b"", []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._on_head(Head(self.url, list(self.headers)))

    def on_message_complete(self) -> None:
        if not self.parser.should_upgrade():  # an upgrade is answered once feed_data stops
            self._on_complete()


class Replica:
    """A raw-socket HTTP/1.1 server on loopback, one thread per connection."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.lock = threading.Lock()
        self.heads: list[Head] = []
        self.errors: list[str] = []  # what the proxy sent that a strict parser refused
        self._conns: list[socket.socket] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(60)  # idle pooled connections; the proxy closes them sooner
            with self.lock:
                self._conns.append(conn)
            threading.Thread(target=self._guarded, args=(conn,), daemon=True).start()

    def _guarded(self, conn: socket.socket) -> None:
        with conn:
            try:
                self.serve(conn)
            except OSError:
                pass

    def serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def record(self, head: Head) -> None:
        with self.lock:
            self.heads.append(head)

    def close(self) -> None:
        close_listener(self.sock, self._accepting)
        with self.lock:
            for conn in self._conns:
                try:  # its thread's recv() returns and its `with` closes it: never a reused number
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class CountingReplica(Replica):
    """A well-behaved replica: answers every request with 200 `ok`, 100 to `Expect`, 101 to a
    WebSocket handshake; records each head and anything it could not parse."""

    def serve(self, conn: socket.socket) -> None:
        def on_head(head: Head) -> None:
            self.record(head)
            if b"100-continue" in b",".join(head.values(b"expect")).lower():
                conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")

        p = _RequestParse(on_head, lambda: conn.sendall(OK_ANSWER))
        while data := conn.recv(65536):
            try:
                p.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                key = b"".join(Head(p.url, p.headers).values(b"sec-websocket-key"))
                if not key:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n"
                                 b"Content-Length: 2\r\n\r\nok")
                    return
                accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())  # noqa: S324
                conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                             b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept
                             + b"\r\n\r\n")
                while conn.recv(65536):
                    pass  # frames are not our subject here
                return
            except httptools.HttpParserCallbackError:
                return  # our own write failed: the proxy closed the connection
            except httptools.HttpParserError as exc:
                with self.lock:
                    self.errors.append(f"{exc!r} after {data[:200]!r}")
                return


class ScriptedReplica(Replica):
    """Answers each request with the current script's bytes in one write, then maybe closes."""

    def __init__(self) -> None:
        super().__init__()
        self.script = SAFE_ANSWER
        self.hang_up = False

    def play(self, script: bytes, hang_up: bool) -> None:
        with self.lock:
            self.script, self.hang_up = script, hang_up

    def serve(self, conn: socket.socket) -> None:
        hang_up = False

        def on_complete() -> None:
            nonlocal hang_up
            with self.lock:
                script, hang_up = self.script, self.hang_up
            conn.sendall(script)

        p = _RequestParse(self.record, on_complete)
        while not hang_up and (data := conn.recv(65536)):
            try:
                p.parser.feed_data(data)
            except httptools.HttpParserCallbackError:
                return  # our own write failed: the proxy closed the connection
            except httptools.HttpParserError as exc:
                with self.lock:
                    self.errors.append(f"{exc!r} after {data[:200]!r}")
                return


@dataclass
class Env:
    proxy: ProxyProcess
    good: CountingReplica
    scripted: ScriptedReplica
    log_offset: int = 0


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("fuzz")
    good, scripted = CountingReplica(), ScriptedReplica()
    routes = write_routes(tmp / "routes.toml", {
        "good": {"path": "/good", "upstreams": [good.url]},
        "secure": {"path": "/secure", "upstreams": [good.url], "auth": "jwt"},
        "evil": {"path": "/evil", "upstreams": [scripted.url]},
    })
    try:
        with run_proxy(tmp, docker="false", routes_file=str(routes), read_timeout="1s",
                       header_timeout="1s", connect_timeout="1s", max_header_size="16k",
                       jwt_secret=JWT_SECRET) as p:
            yield Env(p, good, scripted)
    finally:
        good.close()
        scripted.close()


# --- the client's side ------------------------------------------------------------------------

@dataclass
class Answer:
    """What a client received on one connection, parsed leniently enough to judge it."""

    raw: bytes = b""
    finals: list[tuple[int, bytes]] = field(default_factory=list)  # (status, body), 101 too
    closing: list[bool] = field(default_factory=list)  # per final: it said the connection ends
    head_seen: bool = False  # a final head arrived whose message never completed
    error: str | None = None  # the proxy's bytes were not HTTP
    closed: bool = False

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._status, self._body = 0, b""

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        self.head_seen = self._status >= 200

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        if self._status >= 200 or self._status == 101:
            self.finals.append((self._status, self._body))
            self.closing.append(not self._parser.should_keep_alive())
            self.head_seen = False

    def __post_init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._status, self._body = 0, b""
        self._upgraded = False

    def feed(self, data: bytes) -> bool:
        """Take bytes from the proxy; False once nothing more can be parsed."""
        self.raw += data
        if self.error or self._upgraded:
            return False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._upgraded = True
            return False
        except httptools.HttpParserError as exc:
            self.error = repr(exc)
            return False
        return True


def exchange(port: int, data: bytes, want: int = 1, quiet: float = 0.15,
             limit: float = 4.0) -> Answer:
    """Send `data` on a fresh connection and read the answers: until the proxy closes, or
    `quiet` seconds pass without a byte once `want` final answers arrived, or `limit`."""
    answer = Answer()
    deadline = time.monotonic() + limit
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as s:
        try:
            s.sendall(data)
        except OSError:
            pass  # the proxy may refuse and close before taking it all: read what it said
        while (left := deadline - time.monotonic()) > 0:
            s.settimeout(min(left, quiet) if len(answer.finals) >= want else left)
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            except OSError:
                answer.closed = True
                break
            if not chunk:
                answer.closed = True
                break
            if not answer.feed(chunk):
                break
    return answer


@dataclass
class Sent:
    """A request head that a strict HTTP/1.1 parser (llhttp) finds in what the client sent."""

    target: bytes
    version: str
    headers: list[tuple[bytes, bytes]]

    @property
    def head_size(self) -> int:
        return sum(len(n) + len(v) + 4 for n, v in self.headers)  # the target has its own limit

    def refusals(self) -> set[int]:
        """The statuses the proxy must answer this head with instead of forwarding it; empty
        when it may be forwarded."""
        out: set[int] = set()
        if self.version not in ("1.0", "1.1"):
            out |= {400, 505}
        codings = [c.strip().lower() for n, v in self.headers if n.lower() == b"transfer-encoding"
                   for c in v.split(b",")]
        if codings and codings != [b"chunked"]:
            out |= {400, 501}  # a coding we would have to decode (nginx: 501)
        if len(self.target) > TARGET_LIMIT:
            out.add(414)
        elif self.head_size > HEAD_LIMIT + 1024 or len(self.headers) >= HEADER_COUNT_LIMIT:
            out.add(431)  # 1 KiB of slack: what counts towards the limit is the proxy's choice
        return out


def strict_requests(data: bytes) -> list[Sent]:
    """The request heads a strict HTTP/1.1 parser (llhttp) finds in `data`."""
    found: list[Sent] = []
    p = _RequestParse(lambda head: found.append(
        Sent(head.url, p.parser.get_http_version(), head.headers)), lambda: None)
    try:
        p.parser.feed_data(data)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        pass  # nothing after a framing error or an upgrade is a request
    return found


def check_alive_and_clean(e: Env) -> None:
    """The proxy still runs, answers a good request, and logged no traceback meanwhile."""
    assert e.proxy.proc.poll() is None, f"proxy exited with {e.proxy.proc.returncode}"
    answer = exchange(e.proxy.port, GOOD)
    assert answer.finals == [(200, b"ok")], f"good request after the example: {answer.raw[:300]!r}"
    log = e.proxy.log_text()
    fresh, e.log_offset = log[e.log_offset:], len(log)
    for bad in ("Traceback", "proxy_error", "Error handling request"):
        assert bad not in fresh, f"{bad} in the proxy log:\n{fresh[-3000:]}"


# --- part 1: mutated requests from clients ----------------------------------------------------

@dataclass
class Req:
    """A request under construction, mutated structurally before it is serialised."""

    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    chunked: bool
    chunk_size: bytes | None = None  # a replacement for the first chunk-size line
    truncate_body: int | None = None
    eol: bytes = b"\r\n"
    tail: bytes = b""  # pipelined bytes after this request

    def serialise(self) -> bytes:
        lines = [self.method + b" " + self.target + b" " + self.version]
        lines += [n + b": " + v for n, v in self.headers]
        head = self.eol.join(lines) + self.eol + self.eol
        body = self.body
        if self.chunked:
            size = self.chunk_size if self.chunk_size is not None else b"%x" % len(body)
            body = (size + b"\r\n" + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
        if self.truncate_body is not None:
            body = body[:self.truncate_body % (len(body) + 1)]
        return head + body + self.tail


CL_VALUES = [b"20000000", b"99999999999999999999", b"-1", b"+5", b" 5", b"5, 5", b"0x5", b"", b"1e3",
             b"18446744073709551616", b"5\x00", b"0"]
TE_VALUES = [b"chunked", b"gzip, chunked", b"chunked, gzip", b"Chunked", b" chunked",
             b"identity", b"chunked\x0b", b"xchunked", b"chunked, chunked"]
CHUNK_SIZES = [b"zz", b"-1", b"ffffffffffffffffffff", b"5;ext=1", b"5 ", b"0x5", b"", b"1",
               b"fffffff"]
INJECT = [b"\r", b"\n", b"\x00", b" ", b"\t", b":", b"\r\n", b"\x7f", b"\xff"]
HOSTS = [HOST, HOST + b":8080", b"127.0.0.1", b"[::1]:80", b"hosted.test:1@evil.test",
         b"a/b", b"a b", b"fuzz.test:port", b"", b"fuzz.test:1:2", b"fuzz.test\\x"]


@st.composite
def base_requests(draw: st.DrawFn, token: bytes) -> Req:
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"]))
    route = draw(st.sampled_from([b"/good", b"/secure"]))
    target = draw(st.sampled_from([route + b"/x", route + b"/a/b?q=1", route,
                                   b"http://fuzz.test" + route + b"/abs", route + b"/%2e%2e/x",
                                   route + b"/" + b"p" * 70000]))
    version = draw(st.sampled_from([b"HTTP/1.1"] * 8 + [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.2"]))
    headers = [(b"Host", draw(st.sampled_from([HOST] * 6 + HOSTS)))]
    if route == b"/secure":
        headers.append((b"Authorization", b"Bearer " + token))
    body = draw(st.sampled_from([b"", b"", b"hello", SMUGGLED, b"x" * 3000]))
    chunked = draw(st.booleans()) if body else False
    if chunked:
        headers.append((b"Transfer-Encoding", b"chunked"))
    elif body or method in (b"POST", b"PUT"):
        headers.append((b"Content-Length", b"%d" % len(body)))
    for extra in draw(st.lists(st.sampled_from(range(8)), max_size=3, unique=True)):
        headers += [
            [(b"Connection", b"keep-alive")],
            [(b"Connection", b"close")],
            [(b"Expect", b"100-continue")],
            [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"),
             (b"Sec-WebSocket-Version", b"13"),
             (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ==")],
            [(b"Connection", b"Upgrade, HTTP2-Settings"), (b"Upgrade", b"h2c"),
             (b"HTTP2-Settings", b"AAMAAABkAARAAAAAAAIAAAAA")],
            [(b"X-Forwarded-Host", b"evil.test")],
            [(b"Authorization", b"Bearer " + token)],
            [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"),
             (b"Sec-WebSocket-Version", b"13"), (b"Sec-WebSocket-Key", b"\xe9" * 24)],
        ][extra]
    return Req(method, target, version, headers, body, chunked)


@st.composite
def mutated_requests(draw: st.DrawFn, token: bytes) -> bytes:
    req = draw(base_requests(token))
    for kind in draw(st.lists(st.integers(0, 13), max_size=3)):
        index = draw(st.integers(0, 63))
        if kind == 0 and req.headers:  # duplicate a header
            req.headers.append(req.headers[index % len(req.headers)])
        elif kind == 1 and req.headers:  # remove a header
            del req.headers[index % len(req.headers)]
        elif kind == 2:
            req.headers.append((b"Content-Length", draw(st.sampled_from(CL_VALUES))))
        elif kind == 3:
            req.headers.append((b"Transfer-Encoding", draw(st.sampled_from(TE_VALUES))))
        elif kind == 4:
            req.chunked = True
            req.body = req.body or b"hello"
            req.chunk_size = draw(st.sampled_from(CHUNK_SIZES))
        elif kind == 5 and req.headers:  # obs-fold
            n, v = req.headers[index % len(req.headers)]
            req.headers[index % len(req.headers)] = (n, v + b"\r\n folded")
        elif kind == 6:
            req.eol = b"\n"  # bare LF
        elif kind == 7 and req.headers:  # a control byte or separator inside a name or value
            n, v = req.headers[index % len(req.headers)]
            byte = draw(st.sampled_from(INJECT))
            if draw(st.booleans()):
                at = index % (len(n) + 1)
                req.headers[index % len(req.headers)] = (n[:at] + byte + n[at:], v)
            else:
                at = index % (len(v) + 1)
                req.headers[index % len(req.headers)] = (n, v[:at] + byte + v[at:])
        elif kind == 8:
            req.truncate_body = index
        elif kind == 9:  # a pipelined second request, good or smuggling-shaped
            req.tail += draw(st.sampled_from([
                b"GET /good/second HTTP/1.1\r\nHost: fuzz.test\r\n\r\n", SMUGGLED,
                b"GET /good/second HTTP/1.1\r\nHost: fuzz.test\r\n",  # an unfinished head
                b"POST /good/second HTTP/1.1\r\nHost: fuzz.test\r\nContent-Length: 9\r\n\r\nab"]))
        elif kind == 10:  # a big head: one long value or very many headers
            if draw(st.booleans()):
                req.headers.append((b"X-Big", b"a" * draw(st.sampled_from([8000, 20000, 70000]))))
            else:
                req.headers += [(b"X-H-%d" % i, b"v") for i in range(draw(
                    st.sampled_from([150, 1000, 5000])))]
        elif kind == 11:  # an injected byte in the request line
            line = req.method + b" " + req.target
            byte = draw(st.sampled_from(INJECT))
            at = index % (len(line) + 1)
            line = line[:at] + byte + line[at:]
            req.method, _, req.target = line.partition(b" ")
        elif kind == 12:
            req.target = draw(st.sampled_from([b"*", b"//good/x", b"good/x", b"/good/\x00",
                                               b"http://user@fuzz.test/good/x",
                                               b"http://fuzz.test:1@evil.test/good/x"]))
        elif kind == 13:
            req.method = draw(st.sampled_from([b"CONNECT", b"TRACE", b"GE T", b"get", b"",
                                               b"\x00GET", b"PRI"]))
    data = req.serialise()
    for _ in range(draw(st.integers(0, 2))):  # byte-level noise on top
        op, at = draw(st.integers(0, 3)), draw(st.integers(0, 1 << 20)) % (len(data) + 1)
        if op == 0 and at < len(data):
            data = data[:at] + bytes([data[at] ^ (1 << draw(st.integers(0, 7)))]) + data[at + 1:]
        elif op == 1:
            data = data[:at] + draw(st.sampled_from(INJECT)) + data[at:]
        elif op == 2:
            data = data[:at] + data[at + 1:]
        else:
            data = data[:at]
    return data


def _fuzz_token() -> bytes:
    # Strategies are built at import time, before the fixture exists: the token is made the
    # same way from the same secret, and its exp is far enough ahead for any CI run.
    return jwt.encode({"sub": "fuzzer", "exp": 4102444800}, JWT_SECRET,
                      algorithm="HS256").encode()


@REQUEST_SETTINGS
@given(data=mutated_requests(_fuzz_token()))
def test_mutated_requests_never_hurt_the_proxy_or_reach_a_replica_twice(
        env: Env, data: bytes) -> None:
    sent = strict_requests(data)
    before, errors_before = len(env.good.heads), len(env.good.errors)
    answer = exchange(env.proxy.port, data, want=max(1, len(sent)))
    check_alive_and_clean(env)
    with env.good.lock:
        seen = [h for h in env.good.heads[before:] if h.url != b"/good/alive"]
        replica_errors = env.good.errors[errors_before:]
    got = f"{answer.raw[:400]!r}"

    assert answer.error is None and answer.raw[:7] in (b"", b"HTTP/1."), (
        f"the proxy's answer is not HTTP/1.x ({answer.error}): {got}")
    statuses = [status for status, _ in answer.finals]
    server_errors = [s for s in statuses if s >= 500 and s not in CLIENT_ERROR_5XX]
    assert not server_errors, f"a client's request got {server_errors}: {got}"
    assert True not in answer.closing[:-1], f"answers after one that said close: {got}"
    refusals = sent[0].refusals() if sent else set()
    if refusals:
        assert statuses[:1] and statuses[0] in refusals, (
            f"a head to refuse with {sorted(refusals)} got {statuses[:1]}: {got}")
        assert not seen, f"a head to refuse with {sorted(refusals)} reached the replica"

    assert not replica_errors, f"the replica could not parse what the proxy sent: {replica_errors}"
    assert len(seen) <= len(sent), (
        f"the replica saw {len(seen)} requests ({[h.url[:60] for h in seen]}) where a strict "
        f"parser finds {len(sent)} ({[r.target[:60] for r in sent]}) in what the client sent")
    if not any(b"smuggled" in r.target for r in sent):
        assert not any(b"smuggled" in h.url for h in seen), "a request inside a body got through"
    for head in seen:
        hosts = head.values(b"host")
        assert len(hosts) == 1, f"the replica got Host {hosts}"
        for value in hosts + head.values(b"x-forwarded-host"):
            assert VALID_HOST.fullmatch(value), f"the replica got an invalid host {value!r}"
        if head.values(b"x-auth-subject"):
            creds = head.values(b"authorization")
            assert len(creds) == 1, f"a verified request reached the replica with {creds}"
        size = sum(len(n) + len(v) + 4 for n, v in head.headers)
        assert size <= HEAD_LIMIT + 2048 and len(head.headers) < HEADER_COUNT_LIMIT, (
            f"the replica got a head of {size} bytes in {len(head.headers)} headers")


# --- part 2: mutated answers from a replica ----------------------------------------------------

@dataclass
class Script:
    """A replica's answer and what the client may get for it."""

    data: bytes
    hang_up: bool
    method: bytes = b"GET"
    exact: tuple[int, bytes] | None = None  # a well-framed answer: this, or a 502
    # otherwise malformed: a 502, or a cut connection if the head had been sent

    def __repr__(self) -> str:  # shrunk examples are reported; keep a flood readable
        data = self.data if len(self.data) < 600 else self.data[:300] + b"..." + self.data[-200:]
        return (f"Script(data={data!r} ({len(self.data)} bytes), hang_up={self.hang_up}, "
                f"method={self.method!r}, exact={self.exact!r})")


def _head(status: bytes, headers: list[bytes]) -> bytes:
    return b"HTTP/1.1 " + status + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"


AFTER_END = [
    b"HTTP/1.1 200 OK\r\nSet-Cookie: injected=1\r\nContent-Length: 8\r\n\r\nINJECTED",
    b"INJECTED",
    b"\r\n\r\nSet-Cookie: injected=1\r\n\r\nINJECTED",
    b"0\r\n\r\nINJECTED",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nINJECTED",
]


@st.composite
def well_framed(draw: st.DrawFn) -> Script:
    status = draw(st.sampled_from([b"200 OK", b"201 Created", b"404 Not Found", b"204 No Content",
                                   b"304 Not Modified"]))
    code = int(status[:3])
    body = b"" if code in (204, 304) else draw(st.sampled_from([b"", b"hello", b"x" * 3000]))
    headers = draw(st.lists(st.sampled_from([b"Set-Cookie: ok=1", b"X-Replica: a",
                                             b"Connection: keep-alive", b"Cache-Control: no-store"]),
                            max_size=3))
    framing = draw(st.sampled_from(["length", "chunked", "close"] if code not in (204, 304)
                                   else ["length", "none"]))
    interim = draw(st.sampled_from([b"", b"", b"HTTP/1.1 100 Continue\r\n\r\n",
                                    b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n",
                                    b"HTTP/1.1 100 Continue\r\n\r\n" * 3]))
    if framing == "length":
        data = _head(status, [*headers, b"Content-Length: %d" % len(body)]) + body
    elif framing == "chunked":
        cut = draw(st.integers(0, len(body)))
        chunks = b"".join(b"%x\r\n%b\r\n" % (len(c), c) for c in (body[:cut], body[cut:]) if c)
        data = _head(status, [*headers, b"Transfer-Encoding: chunked"]) + chunks + b"0\r\n\r\n"
    elif framing == "none":
        data = _head(status, headers)
    else:  # delimited by the end of the connection: nothing comes after it, by definition
        return Script(interim + _head(status, headers) + body, True, exact=(code, body))
    after = draw(st.sampled_from([b"", *AFTER_END]))
    method = b"GET"
    if code == 200 and framing == "length" and not after and draw(st.booleans()):
        # a HEAD answer's "body" is after its end
        method, data, body = b"HEAD", _head(status, [*headers, b"Content-Length: 8"]) + b"INJECTED", b""
    return Script(interim + data + after, draw(st.booleans()), method, exact=(code, body))


@st.composite
def malformed(draw: st.DrawFn) -> Script:
    after = draw(st.sampled_from([b"", *AFTER_END]))
    shapes = [
        _head(b"200 OK", [b"Content-Length: 5", b"Content-Length: 6"]) + b"hello",
        _head(b"200 OK", [b"Content-Length: 5, 6"]) + b"hello",
        _head(b"200 OK", [b"Content-Length: 5", b"Transfer-Encoding: chunked"])
        + b"5\r\nhello\r\n0\r\n\r\n",
        _head(b"200 OK", [b"Transfer-Encoding: chunked", b"Content-Length: 5"])
        + b"5\r\nhello\r\n0\r\n\r\n",
        _head(b"200 OK", [b"Transfer-Encoding: chunked"]) + b"zz\r\nhello\r\n0\r\n\r\n",
        _head(b"200 OK", [b"Transfer-Encoding: chunked"]) + b"-5\r\nhello\r\n0\r\n\r\n",
        _head(b"200 OK", [b"Transfer-Encoding: chunked"])
        + b"ffffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
        _head(b"200 OK", [b"Transfer-Encoding: chunked"]) + b"5\r\nhelloXX0\r\n\r\n",
        _head(b"200 OK", [b"Content-Length: -1"]) + b"hello",
        _head(b"200 OK", [b"Content-Length: abc"]) + b"hello",
        _head(b"200 OK", [b"Content-Length: 99999999999999999999"]) + b"hello",
        _head(b"200 OK", [b"X-H: v"] * 2000 + [b"Content-Length: 5"]) + b"hello",
        _head(b"200 OK", [b"X-Big: " + b"a" * 256 * 1024, b"Content-Length: 5"]) + b"hello",
        _head(b"2x0 OK", [b"Content-Length: 5"]) + b"hello",
        b"HTTX/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        _head(b"200 OK", [b"Bad Name: x", b"Content-Length: 5"]) + b"hello",
        _head(b"101 Switching Protocols", [b"Upgrade: websocket", b"Connection: Upgrade"]),
    ]
    index = draw(st.integers(0, len(shapes) + 5))
    if index < len(shapes):
        return Script(shapes[index] + after, draw(st.booleans()))
    # truncated answers: the replica hangs up early
    full = _head(b"200 OK", [b"Content-Length: 100"]) + b"x" * 100
    chunked = _head(b"200 OK", [b"Transfer-Encoding: chunked"]) + b"64\r\n" + b"x" * 100 + b"\r\n"
    if index >= len(shapes) + 3:
        # Framed well but odd: HTTP lets a proxy either refuse these (502) or repair them (a
        # NUL or an obs-fold becomes a space: RFC 9110 section 5.5, RFC 9112 section 5.2); a
        # 1xx flood may hit a limit.
        odd = [b"HTTP/1.1 100 Continue\r\n\r\n" * 2000 + _head(b"200 OK", [b"Content-Length: 5"]),
               _head(b"200 OK", [b"X-Nul: a\x00b", b"Content-Length: 5"]),
               _head(b"200 OK", [b"X-Fold: a", b" folded", b"Content-Length: 5"])]
        return Script(odd[index - len(shapes) - 3] + b"hello" + after, draw(st.booleans()),
                      exact=(200, b"hello"))
    source = [full, chunked, full][index - len(shapes)]
    cut = draw(st.integers(1, len(source) - 1))
    return Script(source[:cut] if index - len(shapes) < 2 else b"HTTP/1.1 200", True)


def evil_request(method: bytes) -> bytes:
    return method + b" /evil/x HTTP/1.1\r\nHost: fuzz.test\r\nConnection: close\r\n\r\n"


def head_answer(raw: bytes) -> tuple[int, bytes]:
    """(status, bytes after the head) of an answer to HEAD, which no response parser frames."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    return int(head[9:12] or b"0"), rest


@ANSWER_SETTINGS
@given(script=st.one_of(well_framed(), malformed()))
def test_a_replicas_bytes_after_its_answer_never_reach_a_client(
        env: Env, script: Script) -> None:
    env.scripted.play(script.data, script.hang_up)
    answer = exchange(env.proxy.port, evil_request(script.method), limit=6.0)
    env.scripted.play(SAFE_ANSWER, False)  # a pooled connection must not answer with leftovers
    follow_up = exchange(env.proxy.port, evil_request(b"GET"), limit=6.0)
    check_alive_and_clean(env)

    for raw in (answer.raw, follow_up.raw):
        for marker in MARKERS:
            assert marker not in raw, (
                f"{marker!r}, sent after the answer's end, reached the client: {raw[:400]!r}")
    if script.method == b"HEAD":
        assert head_answer(answer.raw) in (script.exact, (502, head_answer(answer.raw)[1])), \
            answer.raw[:400]
    elif script.exact is not None:
        got = answer.finals
        assert len(got) == 1 and (got[0] == script.exact or got[0][0] == 502), (
            f"a well-framed answer {script.exact} reached the client as {answer.raw[:400]!r}")
    else:
        got = [status for status, _ in answer.finals]
        assert got == [502] or (not got and answer.head_seen), (
            f"a malformed answer gave {got or 'nothing complete'}: {answer.raw[:400]!r}")
    assert follow_up.finals == [(200, b"safe")], f"the next request got {follow_up.raw[:400]!r}"


def test_the_whole_log_has_no_traceback(env: Env) -> None:
    """The checks above read the log as it grows; this one reads it whole, once it settled."""
    check_alive_and_clean(env)
    env.log_offset = 0
    check_alive_and_clean(env)
