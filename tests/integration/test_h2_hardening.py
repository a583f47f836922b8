"""HTTP/2 attacks against the real proxy process, frame by frame: each is bounded by its
EDGEPROXY_H2_* setting and answered with GOAWAY, and the proxy keeps serving others."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
import requests
from hpack import Encoder

from tests.h2_raw import (
    DATA,
    ENHANCE_YOUR_CALM,
    GOAWAY,
    HEADERS,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    RST_STREAM,
    SETTINGS,
    RawH2,
)
from tests.helpers import ProxyProcess, run_backend, run_proxy, wait_for, write_routes


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    tmp = tmp_path_factory.mktemp("h2-hardening")
    with run_backend("h2-backend") as backend:
        routes = write_routes(tmp / "routes.toml", {"app": {"path": "/",
                                                            "upstreams": [backend]}})
        with run_proxy(tmp, docker="false", routes_file=str(routes), h2c="true",
                       h2_max_concurrent_streams="8", h2_max_header_list_size="4k",
                       h2_max_resets="20", h2_max_control_frames="50") as p:
            yield p


def still_serves(p: ProxyProcess) -> None:
    """A fresh connection still gets an answer: the attack cost one connection only."""
    c = RawH2(p.port)
    try:
        c.headers(1, "/ready")
        head = c.until(HEADERS)
        assert head is not None and head.stream_id == 1
    finally:
        c.close()


def goaway_code(c: RawH2) -> int | None:
    frame = c.until(GOAWAY)
    return None if frame is None else frame.error_code


def test_settings_announce_the_limits(proxy: ProxyProcess) -> None:
    c = RawH2(proxy.port)
    try:
        settings = c.until(SETTINGS)
        assert settings is not None
        values = settings.settings()
        assert values[0x3] == 8  # SETTINGS_MAX_CONCURRENT_STREAMS
        assert values[0x6] == 4096  # SETTINGS_MAX_HEADER_LIST_SIZE
        assert values.get(0x2) == 0  # no server push
    finally:
        c.close()


def test_rapid_reset_gets_goaway(proxy: ProxyProcess) -> None:
    c = RawH2(proxy.port)
    try:
        with c.batch():
            for i in range(40):  # open and cancel at once, CVE-2023-44487
                c.headers(1 + 2 * i, "/slow?seconds=5", end_stream=False)
                c.rst(1 + 2 * i)
        assert goaway_code(c) == ENHANCE_YOUR_CALM
        assert c.closed()
    finally:
        c.close()
    wait_for(lambda: proxy.events("h2_abuse"), what="an h2_abuse event")
    assert proxy.events("h2_abuse")[0]["kind"] == "rapid_reset"
    still_serves(proxy)


def test_continuation_flood_is_cut_before_decoding(proxy: ProxyProcess) -> None:
    c = RawH2(proxy.port)
    try:
        block = Encoder().encode([(":method", "GET"), (":scheme", "http"),
                                  (":authority", "t"), (":path", "/")])
        # 60 CONTINUATION frames of 1 KiB, never END_HEADERS: h2 alone would hold 64.
        c.raw_headers_block(1, block, [b"\x00" * 1024] * 60)
        assert goaway_code(c) == ENHANCE_YOUR_CALM
        assert c.closed()
    finally:
        c.close()
    still_serves(proxy)


def test_hpack_bomb_is_refused(proxy: ProxyProcess) -> None:
    c = RawH2(proxy.port)
    try:
        enc = Encoder()
        first = enc.encode([(":method", "GET"), (":scheme", "http"), (":authority", "t"),
                            (":path", "/"), ("x-bomb", "a" * 3000)])
        # Each further reference to the indexed 3 KB header costs one byte on the wire.
        again = enc.encode([("x-bomb", "a" * 3000)])
        assert len(again) <= 2
        # 15 references: 48 KB decoded, under h2's own 64 KiB default but over our 4k.
        c.raw_headers_block(1, first + again * 15, [b""], end=True)
        assert goaway_code(c) == ENHANCE_YOUR_CALM
    finally:
        c.close()
    still_serves(proxy)


@pytest.mark.parametrize("flood", ["ping", "settings"])
def test_control_frame_floods_get_goaway(proxy: ProxyProcess, flood: str) -> None:
    c = RawH2(proxy.port)
    try:
        with c.batch():
            for _ in range(200):
                c.ping() if flood == "ping" else c.empty_settings()
        assert goaway_code(c) == ENHANCE_YOUR_CALM
    finally:
        c.close()
    still_serves(proxy)


def open_streams(c: RawH2, first: int, count: int) -> None:
    """Open `count` streams from id `first` whose bodies never finish: they stay open."""
    for i in range(count):
        c.headers(first + 2 * i, "/echo", end_stream=False)


def test_a_stream_over_the_limit_is_refused_and_the_others_go_on(proxy: ProxyProcess) -> None:
    c = RawH2(proxy.port)
    try:
        with c.batch():
            open_streams(c, 1, 8)
            c.headers(17, "/echo", end_stream=False)  # one over SETTINGS_MAX_CONCURRENT_STREAMS
        # RFC 9113 5.1.2: that stream is refused (the client may retry it, nothing was done);
        # the connection and its 8 streams live on (a GOAWAY would fail them all).
        frame = c.until(RST_STREAM)
        assert frame is not None, "the proxy closed the connection"
        assert (frame.stream_id, frame.error_code) == (17, REFUSED_STREAM)
        c.data(1, b"hello", end_stream=True)
        ended = None
        while ended is None:  # stream 1 gets its whole answer
            f = c.read_frame()
            assert f is not None and f.type != GOAWAY, "the proxy closed the connection"
            if f.stream_id == 1 and f.type in (HEADERS, DATA) and f.flags & 0x1:
                ended = f
        c.headers(19, "/ready")  # stream 1 is closed: room for a new one
        head = c.until(HEADERS)
        assert head is not None and head.stream_id == 19
    finally:
        c.close()
    still_serves(proxy)


def test_a_client_that_keeps_opening_streams_over_the_limit_gets_goaway(
        proxy: ProxyProcess) -> None:
    c = RawH2(proxy.port)
    try:
        with c.batch():
            open_streams(c, 1, 8)
            open_streams(c, 17, 30)  # 30 refusals in a second: over EDGEPROXY_H2_MAX_RESETS=20
        assert goaway_code(c) == ENHANCE_YOUR_CALM
        assert c.closed()
    finally:
        c.close()
    wait_for(lambda: any(e["kind"] == "refused_streams" for e in proxy.events("h2_abuse")),
             what="an h2_abuse event for refused streams")
    still_serves(proxy)


@pytest.mark.parametrize("field", [("X-Upper", "v"), ("x-a", "v\x00"), ("x-a", " v"),
                                   ("connection", "close"), ("te", "gzip"), (":custom", "v")],
                         ids=["uppercase-name", "nul-in-value", "leading-space", "connection",
                              "te-not-trailers", "unknown-pseudo"])
def test_a_malformed_request_head_ends_the_connection(proxy: ProxyProcess,
                                                       field: tuple[str, str]) -> None:
    """h2's inbound checks stay on at the edge (only its outbound passes are ours)."""
    c = RawH2(proxy.port)
    try:
        c.headers(1, "/", extra=[field])
        assert goaway_code(c) == PROTOCOL_ERROR
    finally:
        c.close()
    still_serves(proxy)


def test_an_answer_larger_than_the_clients_window_arrives_whole(proxy: ProxyProcess) -> None:
    """A small answer read whole from the replica still waits for the client's window: the
    stream ends after its last byte, never with a reset once the first window is spent."""
    c = RawH2(proxy.port, window=1000)
    try:
        c.headers(1, "/respond?body=" + "x" * 3000)  # the head limit here is 4k
        got = 0
        while True:
            frame = c.read_frame()
            assert frame is not None and frame.type != RST_STREAM
            if frame.type == DATA and frame.stream_id == 1:
                got += len(frame.payload)
                c.window_update(1, len(frame.payload))
                if frame.flags & 1:  # END_STREAM
                    break
        assert got == 3000
    finally:
        c.close()


class _Replica:
    """A replica on a loopback port: each connection it accepts is counted and served by
    `serve` on a thread of its own."""

    def __init__(self) -> None:
        self.connections = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            self.connections += 1
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn: socket.socket) -> None:
        raise NotImplementedError


def _h2_server(conn: socket.socket, **config: Any) -> h2.connection.H2Connection:
    """The server side of an h2c connection, its preface sent."""
    h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, **config))
    h2c.initiate_connection()
    conn.sendall(h2c.data_to_send())
    return h2c


class _BigReplica(_Replica):
    """An HTTP/1.1 replica answering with an endless body, counting what it could send."""

    def __init__(self) -> None:
        self.sent = 0
        self.stop = threading.Event()
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n")
        conn.settimeout(0.5)
        chunk = b"x" * 65536
        while not self.stop.is_set():
            try:
                self.sent += conn.send(chunk)
            except TimeoutError:
                continue
            except OSError:
                return
        conn.close()


def test_a_client_that_does_not_read_pauses_the_replica(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp = tmp_path_factory.mktemp("h2-slow-reader")
    replica = _BigReplica()
    routes = write_routes(tmp / "routes.toml", {
        "big": {"path": "/", "upstreams": [f"http://127.0.0.1:{replica.port}"]}})
    with run_proxy(tmp, docker="false", routes_file=str(routes), h2c="true") as p:
        c = RawH2(p.port, window=65535)
        try:
            c.headers(1, "/big")
            got = 0
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:  # read what the window allows, never update it
                try:
                    f = c.read_frame(0.5)
                except TimeoutError:
                    continue
                if f is not None and f.type == DATA:
                    got += len(f.payload)
            assert got <= 65535
            sent_then = replica.sent
            time.sleep(1.0)  # the replica is blocked: nothing more leaves it
            assert replica.sent == sent_then
            # What the proxy holds is its read buffer and the sockets', not the answer.
            assert replica.sent < 16 * 1024 * 1024, replica.sent
            c.window_update(0, 1 << 20)
            c.window_update(1, 1 << 20)
            wait_for(lambda: replica.sent > sent_then, 5, what="the replica to resume")
        finally:
            replica.stop.set()
            c.close()


def test_silent_and_idle_connections_are_closed_and_sigterm_drains(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp = tmp_path_factory.mktemp("h2-lifecycle")
    with run_backend("h2-lifecycle") as backend:
        routes = write_routes(tmp / "routes.toml", {"app": {"path": "/",
                                                            "upstreams": [backend]}})
        with run_proxy(tmp, docker="false", routes_file=str(routes), h2c="true",
                       header_timeout="1s", h2_idle_timeout="1s", drain_timeout="10s") as p:
            # Nothing sent at all: neither protocol has started, the connection still ends.
            silent = socket.create_connection(("127.0.0.1", p.port), timeout=10)
            started = time.monotonic()
            assert silent.recv(1) == b""
            assert time.monotonic() - started < 5
            silent.close()
            # An HTTP/2 connection whose streams are done gets GOAWAY after the idle timeout.
            idle = RawH2(p.port)
            idle.headers(1, "/ready")
            assert idle.until(HEADERS) is not None
            goaway = idle.until(GOAWAY)
            assert goaway is not None and goaway.error_code == 0
            assert idle.closed()
            idle.close()
            # SIGTERM: a stream in flight is answered, then the connection goes.
            busy = RawH2(p.port)
            busy.headers(1, "/slow?s=1.5")
            assert busy.until(SETTINGS) is not None
            wait_for(lambda: "/slow" in requests.get(backend + "/__seen", timeout=2).text,
                     what="the request to reach the replica")
            p.proc.send_signal(signal.SIGTERM)
            frame = busy.read_frame()
            kinds = []
            while frame is not None:
                kinds.append(frame.type)
                frame = busy.read_frame()
            busy.close()
            assert GOAWAY in kinds and HEADERS in kinds and DATA in kinds, kinds
            assert kinds.index(GOAWAY) < kinds.index(HEADERS)  # told first, answered after
            assert p.proc.wait(15) == 0


class _ResettingReplica(_Replica):
    """An h2c replica (h2 itself, server side) that answers a head and some data, then resets
    the stream with CANCEL."""

    def serve(self, conn: socket.socket) -> None:
        h2c = _h2_server(conn)
        while True:
            data = conn.recv(65536)
            if not data:
                return
            for event in h2c.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    h2c.send_headers(event.stream_id, [(":status", "200")])
                    h2c.send_data(event.stream_id, b"partial")
                    conn.sendall(h2c.data_to_send())
                    time.sleep(0.3)  # the head and data reach the client before the reset
                    h2c.reset_stream(event.stream_id, h2.errors.ErrorCodes.CANCEL)
            conn.sendall(h2c.data_to_send())


def test_a_replica_reset_reaches_the_client_with_its_code(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp = tmp_path_factory.mktemp("h2-reset")
    replica = _ResettingReplica()
    routes = write_routes(tmp / "routes.toml", {
        "r": {"path": "/", "upstreams": [f"h2c://127.0.0.1:{replica.port}"]}})
    with run_proxy(tmp, docker="false", routes_file=str(routes), h2c="true") as p:
        c = RawH2(p.port)
        try:
            c.headers(1, "/x")
            frame = c.until(RST_STREAM)
            assert frame is not None and frame.stream_id == 1
            assert frame.error_code == 8  # CANCEL, as the replica said
        finally:
            c.close()


class _MalformedReplica(_Replica):
    """An h2c replica (h2 with its own outbound checks off) that answers /bad with a field
    HTTP/2 forbids and anything else with 200 "ok", counting its connections."""

    def __init__(self, field: tuple[bytes, bytes]) -> None:
        self.field = field
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        h2c = _h2_server(conn, validate_outbound_headers=False,
                         normalize_outbound_headers=False)
        while data := conn.recv(65536):
            for event in h2c.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    path = dict(event.headers or ()).get(b":path")
                    head = [(b":status", b"200"), (b"content-length", b"2")]
                    if path == b"/bad":
                        head.append(self.field)
                    h2c.send_headers(event.stream_id, head)
                    h2c.send_data(event.stream_id, b"ok", end_stream=True)
            conn.sendall(h2c.data_to_send())


@pytest.mark.parametrize("field", [(b"x-a", b"b\x00c"), (b"X-Upper", b"v"), (b":path", b"/"),
                                   (b"connection", b"close")],
                         ids=["nul-in-value", "uppercase-name", "pseudo-header", "connection"])
def test_a_replicas_malformed_field_costs_that_request_only(
        tmp_path_factory: pytest.TempPathFactory, field: tuple[bytes, bytes]) -> None:
    """h2's own replica-side validation is off: our check fails the one stream with a 502
    (as nginx's "upstream sent invalid header"), the connection serves the next request."""
    tmp = tmp_path_factory.mktemp("h2-malformed")
    replica = _MalformedReplica(field)
    routes = write_routes(tmp / "routes.toml", {
        "r": {"path": "/", "upstreams": [f"h2c://127.0.0.1:{replica.port}"]}})
    with run_proxy(tmp, docker="false", routes_file=str(routes)) as p:
        bad = requests.get(p.url("/bad"), timeout=5)
        assert bad.status_code == 502
        assert bad.json()["error"]["code"] == "upstream_error"
        good = requests.get(p.url("/good"), timeout=5)
        assert (good.status_code, good.text) == (200, "ok")
        assert replica.connections == 1


class _CountingReplica(_Replica):
    """An h2c replica that answers once the request body has ended, with its length."""

    def serve(self, conn: socket.socket) -> None:
        h2c = _h2_server(conn)
        sizes: dict[int, int] = {}
        while data := conn.recv(65536):
            for event in h2c.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    sizes[event.stream_id] = sizes.get(event.stream_id, 0) + len(event.data)
                    h2c.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    body = str(sizes.pop(event.stream_id, 0)).encode()
                    h2c.send_headers(event.stream_id, [(":status", "200")])
                    h2c.send_data(event.stream_id, body, end_stream=True)
            conn.sendall(h2c.data_to_send())


def test_a_request_body_failing_on_its_way_to_an_h2_replica(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """The body's own failure (over the limit, found while streaming it) is the answer, 413,
    and a body within the limit still reaches the replica whole."""
    tmp = tmp_path_factory.mktemp("h2-body")
    replica = _CountingReplica()
    routes = write_routes(tmp / "routes.toml", {
        "r": {"path": "/", "upstreams": [f"h2c://127.0.0.1:{replica.port}"]}})
    with run_proxy(tmp, docker="false", routes_file=str(routes), max_body_size="1000") as p:
        # A generator body goes chunked: no Content-Length to refuse it by up front.
        big = requests.post(p.url("/up"), data=iter([b"x" * 600, b"x" * 600]), timeout=5)
        assert big.status_code == 413
        assert big.json()["error"]["code"] == "body_too_large"
        small = requests.post(p.url("/up"), data=iter([b"x" * 300, b"x" * 300]), timeout=5)
        assert (small.status_code, small.text) == (200, "600")
