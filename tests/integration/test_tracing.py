"""OpenTelemetry tracing through the real proxy process: spans arrive at an OTLP/HTTP receiver
(tests/otlp.py), trace context flows from the client to the replica, retries show as sibling
client spans, sampling off sends nothing, and a dead collector never touches requests."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import requests
from grpc_backend import grpc_backend, method
from helpers import ROOT, ProxyProcess, free_port, run_backend, run_proxy, wait_for, write_routes
from otlp import Collector, SpanRecord, run_collector

TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


@dataclass
class Traced:
    proxy: ProxyProcess
    collector: Collector
    backend: str
    dead: int


def otel_env(endpoint: str, **extra: str) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50",
            "OTEL_SERVICE_NAME": "edge-test", **extra}


def routes_for(tmp: Path, backend: str, dead: int) -> Path:
    return write_routes(tmp / "routes.toml", {
        "api": {"path": "/api", "upstreams": [backend]},
        "retry": {"path": "/retry", "upstreams": [f"http://127.0.0.1:{dead}", backend]},
        "down": {"path": "/down", "upstreams": [f"http://127.0.0.1:{dead}"]},
    })


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    tmp = tmp_path_factory.mktemp("tracing")
    dead = free_port()
    with ExitStack() as stack:
        backend = stack.enter_context(run_backend("traced"))
        collector = stack.enter_context(run_collector())
        routes = routes_for(tmp, backend, dead)
        proxy = stack.enter_context(run_proxy(tmp, docker="false", routes_file=str(routes),
                                              eject_time="10ms",
                                              **otel_env(collector.endpoint)))
        yield Traced(proxy, collector, backend, dead)


def spans_of(collector: Collector, trace_id: str, count: int) -> list[SpanRecord]:
    return wait_for(lambda: (s := collector.spans(trace_id)) and len(s) >= count and s, 10,
                    what=f"{count} spans of trace {trace_id}")


def sent_traceparent(echo: dict[str, Any]) -> list[str]:
    return [v for k, v in echo["headers"] if k.lower() == "traceparent"]


def test_request_makes_a_server_span_and_a_client_span(traced: Traced) -> None:
    r = requests.get(traced.proxy.url("/api/orders/7?secret=1"), timeout=5)
    assert r.status_code == 200
    [header] = sent_traceparent(r.json())
    trace_id, client_span_id, flags = TRACEPARENT.fullmatch(header).groups()  # type: ignore[union-attr]
    assert flags == "01"
    spans = spans_of(traced.collector, trace_id, 2)
    [server] = [s for s in spans if s.kind == "server"]
    [client] = [s for s in spans if s.kind == "client"]
    assert server.parent_id == ""  # no traceparent from the client: a new trace
    assert client.parent_id == server.span_id
    assert client.span_id == client_span_id  # the replica's parent is the client span
    assert server.name == "GET api"
    port = traced.proxy.port
    assert server.attributes == {
        "http.request.method": "GET", "url.path": "/api/orders/7", "url.scheme": "http",
        "network.protocol.version": "1.1", "server.address": "127.0.0.1", "server.port": port,
        "http.route": "api",
        "http.response.status_code": 200, "client.address": "127.0.0.1"}
    backend_port = int(traced.backend.rsplit(":", 1)[1])
    assert client.attributes["server.address"] == "127.0.0.1"
    assert client.attributes["server.port"] == backend_port
    assert client.attributes["http.response.status_code"] == 200
    assert client.attributes["url.full"] == f"http://127.0.0.1:{backend_port}/api/orders/7"
    assert not server.error and not client.error
    assert server.resource["service.name"] == "edge-test"
    # The access log line joins the trace.
    line = wait_for(lambda: [e for e in traced.proxy.events("access")
                             if e.get("request_id") == r.headers["X-Request-ID"]], 10)[0]
    assert (line["trace_id"], line["span_id"]) == (trace_id, server.span_id)


def test_client_traceparent_is_continued_and_replaced_towards_the_replica(
        traced: Traced) -> None:
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    r = requests.get(traced.proxy.url("/api/x"), timeout=5, headers={
        "traceparent": f"00-{trace_id}-{parent}-01", "tracestate": "vendor=abc"})
    assert r.status_code == 200
    echo = r.json()
    [header] = sent_traceparent(echo)  # the client's is gone, ours is there
    got_trace, got_parent, _ = TRACEPARENT.fullmatch(header).groups()  # type: ignore[union-attr]
    assert got_trace == trace_id and got_parent != parent
    assert [v for k, v in echo["headers"] if k.lower() == "tracestate"] == ["vendor=abc"]
    spans = spans_of(traced.collector, trace_id, 2)
    [server] = [s for s in spans if s.kind == "server"]
    [client] = [s for s in spans if s.kind == "client"]
    assert server.parent_id == parent
    assert client.parent_id == server.span_id and client.span_id == got_parent


def test_retried_request_has_two_sibling_client_spans(traced: Traced) -> None:
    retried = None
    for _ in range(4):  # round robin: at least one request tries the dead replica first
        r = requests.get(traced.proxy.url("/retry/a"), timeout=5)
        assert r.status_code == 200
        trace_id = TRACEPARENT.fullmatch(sent_traceparent(r.json())[0]).group(1)  # type: ignore[union-attr]
        spans = spans_of(traced.collector, trace_id, 2)
        server = next((s for s in spans if s.kind == "server"), None)
        if server is not None and server.attributes.get("edgeproxy.retries") == 1:
            retried = spans_of(traced.collector, trace_id, 3)
            break
    assert retried is not None, "no request was retried"
    [server] = [s for s in retried if s.kind == "server"]
    clients = [s for s in retried if s.kind == "client"]
    assert len(clients) == 2
    assert {c.parent_id for c in clients} == {server.span_id}  # siblings
    failed = next(c for c in clients if c.error)
    answered = next(c for c in clients if not c.error)
    assert failed.attributes["server.port"] == traced.dead
    assert failed.attributes["error.type"] == "upstream_unreachable"
    assert answered.attributes["http.response.status_code"] == 200
    assert answered.attributes["http.request.resend_count"] == 1
    assert not server.error


def test_5xx_answer_marks_the_server_span_as_an_error(traced: Traced) -> None:
    r = requests.get(traced.proxy.url("/down/x"), timeout=5,
                     headers={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-"
                                             "b7ad6b7169203331-01"})
    assert r.status_code == 502
    spans = spans_of(traced.collector, "0af7651916cd43dd8448eb211c80319c", 2)
    [server] = [s for s in spans if s.kind == "server"]
    assert server.error
    assert server.attributes["http.response.status_code"] == 502
    assert server.attributes["error.type"] == "upstream_unreachable"


def test_sampling_off_sends_no_span_and_requests_work(tmp_path: Path) -> None:
    dead = free_port()
    with run_backend("unsampled") as backend, run_collector() as collector:
        routes = routes_for(tmp_path, backend, dead)
        with run_proxy(tmp_path, docker="false", routes_file=str(routes),
                       **otel_env(collector.endpoint, OTEL_TRACES_SAMPLER="always_off")) as p:
            for _ in range(5):
                r = requests.get(p.url("/api/x"), timeout=5)
                assert r.status_code == 200
            # Not sampled, but the decision still travels: flags 00.
            assert TRACEPARENT.fullmatch(sent_traceparent(r.json())[0]).group(3) == "00"  # type: ignore[union-attr]
            access = wait_for(lambda: len(p.events("access")) >= 5 and p.events("access"), 10)
            assert all("trace_id" in e for e in access)
        # The proxy stopped: whatever it had queued was sent at shutdown. Nothing was.
        assert collector.spans() == []


def test_dead_collector_leaves_requests_alone_and_counts_drops(tmp_path: Path) -> None:
    dead = free_port()
    nowhere = free_port()  # nothing listens: every export fails
    with run_backend("lonely") as backend:
        routes = routes_for(tmp_path, backend, dead)
        env = otel_env(f"http://127.0.0.1:{nowhere}", OTEL_BSP_MAX_QUEUE_SIZE="4",
                       OTEL_BSP_MAX_EXPORT_BATCH_SIZE="2", OTEL_EXPORTER_OTLP_TIMEOUT="1")
        with run_proxy(tmp_path, docker="false", routes_file=str(routes), **env) as p:
            session = requests.Session()
            start = time.monotonic()
            for _ in range(50):
                assert session.get(p.url("/api/x"), timeout=5).status_code == 200
            # 50 requests on one keep-alive connection; nothing waits on the collector.
            assert time.monotonic() - start < 5

            def dropped() -> float:
                text = requests.get(p.admin_base + "/metrics", timeout=5).text
                return sum(float(v) for v in re.findall(
                    r"^edgeproxy_trace_spans_dropped_total\{[^}]*\} (\S+)$", text, re.M))
            # 100 spans (a server and a client span per request) through a queue of 4.
            wait_for(lambda: dropped() >= 50, 15, what="dropped spans counted")


def test_each_try_to_an_h2c_replica_carries_its_own_client_span(tmp_path: Path) -> None:
    """gRPC over h2c on both sides: the replica's traceparent names the proxy's client span of
    the try that reached it (a retried call's second try, too), never the client's own."""
    dead = free_port()
    with grpc_backend() as backend, run_collector() as collector:
        live = f"h2c://127.0.0.1:{backend.port}"
        routes = write_routes(tmp_path / "routes.toml", {
            "echo": {"host": "echo.test", "upstreams": [live]},
            "retry": {"host": "retry.test", "upstreams": [f"h2c://127.0.0.1:{dead}", live]},
        })
        with run_proxy(tmp_path, docker="false", routes_file=str(routes), h2c="true",
                       eject_time="10ms", **otel_env(collector.endpoint)) as p:
            def call(authority: str, trace_id: str) -> tuple[dict[str, str], list[SpanRecord]]:
                seen = len(backend.state.metadata)
                with grpc.insecure_channel(f"127.0.0.1:{p.port}", options=[
                        ("grpc.default_authority", authority)]) as channel:
                    answer = method(channel, "unary_unary", "Unary")(b"hi", timeout=10, metadata=(
                        ("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),
                        ("tracestate", "vendor=abc")))
                assert answer == b"hi"
                [md] = backend.state.metadata[seen:]
                return md, spans_of(collector, trace_id, 2)

            md, spans = call("echo.test", "4bf92f3577b34da6a3ce929d0e0e4736")
            [server] = [s for s in spans if s.kind == "server"]
            [client] = [s for s in spans if s.kind == "client"]
            assert server.parent_id == "00f067aa0ba902b7"  # the client's context, continued
            assert client.parent_id == server.span_id
            assert md["traceparent"] == f"00-{server.trace_id}-{client.span_id}-01"
            assert md["tracestate"] == "vendor=abc"

            for i in range(4):  # round robin: one call tries the dead replica first
                trace_id = f"{i + 1:032x}"
                md, spans = call("retry.test", trace_id)
                server = next((s for s in spans if s.kind == "server"), None)
                if server is not None and server.attributes.get("edgeproxy.retries") == 1:
                    spans = spans_of(collector, trace_id, 3)
                    break
            else:
                pytest.fail("no call was retried")
            answered = [s for s in spans if s.kind == "client" and not s.error]
            failed = [s for s in spans if s.kind == "client" and s.error]
            assert len(answered) == 1 and len(failed) == 1
            assert md["traceparent"] == f"00-{trace_id}-{answered[0].span_id}-01"


@pytest.mark.parametrize(("protocol", "expected"), [
    ("grpc", "OTEL_EXPORTER_OTLP_PROTOCOL='grpc' is invalid: expected http/protobuf (the "
             "OTLP/gRPC exporter"),
    ("http/json", "OTEL_EXPORTER_OTLP_PROTOCOL='http/json' is invalid: expected http/protobuf"),
])
def test_unusable_protocol_is_a_settings_error(protocol: str, expected: str) -> None:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGEPROXY_", "OTEL_"))}
    env.update({"EDGEPROXY_DOCKER": "false", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
                "OTEL_EXPORTER_OTLP_PROTOCOL": protocol})
    out = subprocess.run([sys.executable, "-m", "edgeproxy"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 2
    assert expected in out.stderr
