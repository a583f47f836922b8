"""gRPC through the real proxy process with real grpcio clients and servers: the four call
kinds, metadata, large messages, deadlines and cancellation, over h2c and over TLS (edge and
replica), and the proxy's own refusals in gRPC form."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import requests
import trustme
from prometheus_client.parser import text_string_to_metric_families

from tests.grpc_backend import GrpcBackend, grpc_backend, method
from tests.helpers import ProxyProcess, free_port, run_proxy, wait_for, write_routes

BIG = 5 * 1024 * 1024  # several flow-control windows on every hop, under the 10m body limit
OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024),
           ("grpc.max_send_message_length", 64 * 1024 * 1024)]


@pytest.fixture(scope="module")
def backend() -> Iterator[GrpcBackend]:
    with grpc_backend() as b:
        yield b


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_backend(ca: trustme.CA) -> Iterator[GrpcBackend]:
    cert = ca.issue_cert("replica.test")
    creds = grpc.ssl_server_credentials([(cert.private_key_pem.bytes(),
                                          b"".join(c.bytes() for c in cert.cert_chain_pems))])
    with grpc_backend(creds) as b:
        yield b


@dataclass
class GrpcProxy:
    """The proxy process, its TLS listener's port and the CA that signed its certificate."""

    p: ProxyProcess
    tls_port: int
    ca_pem: bytes


@pytest.fixture(scope="module")
def proxy(backend: GrpcBackend, tls_backend: GrpcBackend, ca: trustme.CA,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[GrpcProxy]:
    tmp = tmp_path_factory.mktemp("grpc")
    ca_file = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    edge = ca.issue_cert("grpc.test")
    edge.cert_chain_pems[0].write_to_path(str(tmp / "edge.crt"))
    edge.private_key_pem.write_to_path(str(tmp / "edge.key"))
    routes = write_routes(tmp / "routes.toml", {
        "echo": {"path": "/test.Echo", "upstreams": [f"http://127.0.0.1:{backend.port}"],
                 "scheme": "h2c"},
        "secure": {"host": "secure.test", "upstreams": [f"h2://127.0.0.1:{tls_backend.port}"],
                   "tls.ca": str(ca_file), "tls.server_name": "replica.test"},
        "down": {"path": "/down.Svc", "upstreams": [f"h2c://127.0.0.1:{free_port()}"]},
        "limited": {"path": "/limited.Svc", "upstreams": [f"h2c://127.0.0.1:{backend.port}"],
                    "ratelimit": "1/h"},
        "private": {"path": "/private.Svc", "upstreams": [f"h2c://127.0.0.1:{backend.port}"],
                    "auth": "jwt"},
    })
    tls_port = free_port()
    with run_proxy(tmp, docker="false", routes_file=str(routes), h2c="true",
                   tls_listen=f"127.0.0.1:{tls_port}", tls_cert=str(tmp / "edge.crt"),
                   tls_key=str(tmp / "edge.key"), jwt_secret="s3cret" * 6) as p:
        yield GrpcProxy(p, tls_port, ca.cert_pem.bytes())


def h2c_channel(p: GrpcProxy) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{p.p.port}", options=OPTIONS)


def tls_channel(p: GrpcProxy, authority: str = "grpc.test") -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=p.ca_pem)
    return grpc.secure_channel(f"127.0.0.1:{p.tls_port}", creds,
                               options=[*OPTIONS, ("grpc.ssl_target_name_override", "grpc.test"),
                                        ("grpc.default_authority", authority)])


def four_kinds(channel: grpc.Channel, service: str = "test.Echo") -> None:
    def m(kind: str, name: str) -> grpc.UnaryUnaryMultiCallable:
        return channel.__getattribute__(kind)(
            f"/{service}/{name}", request_serializer=lambda b: b,
            response_deserializer=lambda b: b)

    reply, call = m("unary_unary", "Unary").with_call(
        b"hello", timeout=10, metadata=(("x-echo", "meta-value"),))
    assert reply == b"hello"
    assert dict(call.trailing_metadata())["x-echo"] == "meta-value"  # trailers pass through
    assert list(m("unary_stream", "Split")(b"abc", timeout=10)) == [b"a", b"b", b"c"]
    assert m("stream_unary", "Join")(iter([b"x", b"y", b"z"]), timeout=10) == b"xyz"
    assert list(m("stream_stream", "Chat")(iter([b"1", b"2"]), timeout=10)) == [b"re:1", b"re:2"]
    big = bytes(range(256)) * (BIG // 256)
    assert m("unary_unary", "Unary")(big, timeout=30) == big


def test_four_call_kinds_over_h2c(proxy: GrpcProxy) -> None:
    with h2c_channel(proxy) as ch:
        four_kinds(ch)
    wait_for(lambda: any(e.get("protocol") == "HTTP/2" and e.get("route") == "echo"
                         for e in proxy.p.events("access")), what="an HTTP/2 access log line")


def test_routes_show_the_replica_scheme(proxy: GrpcProxy, backend: GrpcBackend,
                                        tls_backend: GrpcBackend) -> None:
    routes = proxy.p.routes()
    [echo] = routes["echo"]["replicas"]
    [secure] = routes["secure"]["replicas"]
    assert (echo["scheme"], echo["url"]) == ("h2c", f"h2c://127.0.0.1:{backend.port}")
    assert (secure["scheme"], secure["url"]) == ("h2", f"h2://127.0.0.1:{tls_backend.port}")


def test_four_call_kinds_over_tls_to_a_tls_replica(proxy: GrpcProxy) -> None:
    with tls_channel(proxy) as ch:
        four_kinds(ch)  # TLS edge (ALPN h2) -> h2c replica
    with tls_channel(proxy, "secure.test") as ch:
        four_kinds(ch)  # TLS edge -> TLS replica (gateway.scheme=h2, ALPN h2)


def test_deadline_reaches_the_replica_and_the_client(proxy: GrpcProxy,
                                                     backend: GrpcBackend) -> None:
    backend.state.cancelled.clear()
    with h2c_channel(proxy) as ch, pytest.raises(grpc.RpcError) as err:
        method(ch, "unary_unary", "Sleep")(b"10", timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The client's RST_STREAM (or grpc-timeout) ends the replica's call too.
    wait_for(backend.state.cancelled.is_set, 5, what="the replica's call to be cancelled")


def test_cancellation_reaches_the_replica(proxy: GrpcProxy, backend: GrpcBackend) -> None:
    backend.state.cancelled.clear()
    backend.state.sleeping.clear()
    with h2c_channel(proxy) as ch:
        future = method(ch, "unary_unary", "Sleep").future(b"10", timeout=30)
        wait_for(backend.state.sleeping.is_set, 5, what="the call to reach the replica")
        future.cancel()
        wait_for(backend.state.cancelled.is_set, 5, what="the replica's call to be cancelled")


def test_replica_status_passes_unchanged(proxy: GrpcProxy) -> None:
    with h2c_channel(proxy) as ch, pytest.raises(grpc.RpcError) as err:
        method(ch, "unary_unary", "Fail")(b"NOT_FOUND", timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == "failed as asked"
    # The access log names the gRPC status the client got (5: NOT_FOUND).
    wait_for(lambda: any(e.get("grpc_status") == 5 and e.get("path") == "/test.Echo/Fail"
                         for e in proxy.p.events("access")), what="grpc_status in the log")


def counters(p: GrpcProxy, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of one counter family on /metrics, by their sorted labels."""
    text = requests.get(p.p.admin_base + "/metrics", timeout=5).text
    return {tuple(sorted(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples if s.name == name}


def changes(before: dict[Any, float], after: dict[Any, float]) -> dict[Any, float]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def test_metrics_count_the_protocol_and_the_grpc_status(proxy: GrpcProxy) -> None:
    by_protocol, by_status = "edgeproxy_requests_by_protocol_total", \
        "edgeproxy_grpc_responses_total"
    before = counters(proxy, by_protocol), counters(proxy, by_status)
    with h2c_channel(proxy) as ch:
        assert method(ch, "unary_unary", "Unary")(b"x", timeout=10) == b"x"  # replica: OK
        with pytest.raises(grpc.RpcError):
            method(ch, "unary_unary", "Fail")(b"NOT_FOUND", timeout=10)  # replica: 5
        with pytest.raises(grpc.RpcError):  # the proxy's own refusal, no route: 12
            ch.unary_unary("/nowhere.Svc/M", request_serializer=lambda b: b,
                           response_deserializer=lambda b: b)(b"x", timeout=10)
    requests.get(proxy.p.url("/test.Echo/Unary"), timeout=5)  # HTTP/1.1, not gRPC
    expected_protocol = {(("protocol", "HTTP/2"), ("route", "echo")): 2,
                         (("protocol", "HTTP/2"), ("route", "")): 1,
                         (("protocol", "HTTP/1.1"), ("route", "echo")): 1}
    expected_status = {(("grpc_status", "0"), ("route", "echo")): 1,
                       (("grpc_status", "5"), ("route", "echo")): 1,
                       (("grpc_status", "12"), ("route", "")): 1}

    def grew() -> bool:  # the proxy counts just after the answer's last byte: poll
        protocol, status = counters(proxy, by_protocol), counters(proxy, by_status)
        return (changes(before[0], protocol) == expected_protocol
                and changes(before[1], status) == expected_status)
    wait_for(grew, 5, what="the protocol and grpc_status counters")


@pytest.mark.parametrize(("path", "code", "says"), [
    ("/nowhere.Svc/Method", grpc.StatusCode.UNIMPLEMENTED, "no route"),  # 404 no_route
    ("/down.Svc/Method", grpc.StatusCode.UNAVAILABLE, "replica of route 'down'"),  # 502
    ("/private.Svc/Method", grpc.StatusCode.UNAUTHENTICATED, "token"),  # 401 invalid_token
])
def test_refusals_are_grpc_statuses(proxy: GrpcProxy, path: str,
                                    code: grpc.StatusCode, says: str) -> None:
    with h2c_channel(proxy) as ch, pytest.raises(grpc.RpcError) as err:
        ch.unary_unary(path, request_serializer=lambda b: b,
                       response_deserializer=lambda b: b)(b"x", timeout=10,
                                                          metadata=(("authorization",
                                                                     "Bearer not.a.jwt"),))
    assert err.value.code() == code, err.value.details()
    # The proxy's own message as grpc-message (not grpcio's guess from an HTTP status).
    assert says in (err.value.details() or "").lower(), err.value.details()


def test_rate_limited_is_resource_exhausted(proxy: GrpcProxy) -> None:
    with h2c_channel(proxy) as ch:
        call = ch.unary_unary("/limited.Svc/Unary", request_serializer=lambda b: b,
                              response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as first:
            call(b"x", timeout=10)
        # The first call reached the replica (no such service there: UNIMPLEMENTED from it).
        assert first.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.RpcError) as err:
            call(b"x", timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "rate limit" in (err.value.details() or "")


def test_goaway_lets_calls_finish_and_new_ones_use_a_new_connection(
        tmp_path: Path) -> None:
    with grpc_backend() as old:
        routes = write_routes(tmp_path / "routes.toml", {
            "echo": {"path": "/test.Echo", "upstreams": [f"h2c://127.0.0.1:{old.port}"]}})
        with run_proxy(tmp_path, docker="false", routes_file=str(routes), h2c="true") as p, \
                grpc.insecure_channel(f"127.0.0.1:{p.port}") as ch:
            assert method(ch, "unary_unary", "Unary")(b"warm", timeout=10) == b"warm"
            in_flight = method(ch, "unary_unary", "Sleep").future(b"2", timeout=20)
            wait_for(old.state.sleeping.is_set, 5, what="the call to reach the replica")
            old.server.stop(grace=10)  # GOAWAY: no new streams; the sleeping call may finish
            # A new server on the same port (gRPC sets SO_REUSEPORT) takes new connections.
            with grpc_backend(port=old.port) as new:
                # While the old connection still carries the sleeping call:
                assert method(ch, "unary_unary", "Unary")(b"after", timeout=10) == b"after"
                assert new.state.calls == 1
                assert not in_flight.done()
                assert in_flight.result(timeout=10) == b"slept"
