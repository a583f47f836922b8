"""edgeproxy.telemetry.tracing without a network: when tracing is on, which OTEL_* values are refused at
start, the bounded export queue and what it counts, the SDK staying unloaded when off, the spans
queued for export (sampling, ids, limits) and their encoding (the same bytes as the SDK's)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from types import SimpleNamespace
from typing import Any

import pytest
from helpers import ROOT, wait_for
from multidict import CIMultiDict
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import TraceState

from edgeproxy.core.settings import SettingsError
from edgeproxy.telemetry import otlp, tracing

ON = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}


@pytest.mark.parametrize(("env", "on"), [
    ({}, False),
    (ON, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, True),
    ({**ON, "OTEL_SDK_DISABLED": "true"}, False),
    ({**ON, "OTEL_TRACES_EXPORTER": "none"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, False),
])
def test_tracing_is_on_only_with_an_endpoint(env: dict[str, str], on: bool) -> None:
    assert tracing.enabled(env) is on


@pytest.mark.parametrize(("env", "variable", "message"), [
    ({**ON, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "OTEL_EXPORTER_OTLP_PROTOCOL",
     "opentelemetry-exporter-otlp-proto-grpc, is not installed"),
    ({**ON, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"},
     "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "expected http/protobuf"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"}, "OTEL_EXPORTER_OTLP_ENDPOINT",
     "an http:// or https:// URL"),
    ({**ON, "OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER", "one of always_off"),
    ({**ON, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
      "OTEL_TRACES_SAMPLER_ARG": "1.5"}, "OTEL_TRACES_SAMPLER_ARG", "a ratio from 0 to 1"),
    ({**ON, "OTEL_BSP_MAX_QUEUE_SIZE": "0"}, "OTEL_BSP_MAX_QUEUE_SIZE", "a positive whole"),
])
def test_unusable_settings_are_refused_at_start(env: dict[str, str], variable: str,
                                                message: str) -> None:
    with pytest.raises(SettingsError, match=message) as info:
        tracing.check_env(env)
    assert info.value.env == variable


def test_settings_are_not_checked_while_tracing_is_off() -> None:
    tracing.check_env({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_TRACES_SAMPLER": "x"})
    tracing.check_env({**ON, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                       "OTEL_TRACES_SAMPLER_ARG": "0.25", "OTEL_BSP_SCHEDULE_DELAY": "100"})


def test_trace_headers_are_left_out_whatever_their_case() -> None:
    raw = ((b"Host", b"a"), (b"TraceParent", b"00-x"), (b"tracestate", b"k=v"), (b"X", b"1"))
    assert tracing.without_trace_headers(raw) == ((b"Host", b"a"), (b"X", b"1"))


class FakeExporter:
    """Blocks each export until released; answers with `result`."""

    def __init__(self, result: SpanExportResult = SpanExportResult.SUCCESS) -> None:
        self.result = result
        self.release = threading.Event()
        self.exported: list[Any] = []
        self.shut = False

    def export(self, batch: list[Any]) -> SpanExportResult:
        self.release.wait(5)
        self.exported.extend(batch)
        return self.result

    def send(self, batch: list[Any]) -> bool:
        """What from_env's sender does with a batch, through this fake's export."""
        return self.export(batch) is SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.shut = True


def drops() -> tuple[dict[str, int], Any]:
    counted: dict[str, int] = {}

    def on_drop(reason: str, n: int) -> None:
        counted[reason] = counted.get(reason, 0) + n
    return counted, on_drop


def test_a_stuck_exporter_fills_the_queue_and_drops_are_counted() -> None:
    exporter = FakeExporter()
    counted, on_drop = drops()
    processor = tracing.BoundedBatchProcessor(exporter, on_drop, max_queue=3, batch=2,
                                              delay=0.01, send=exporter.send)  # type: ignore[arg-type]
    processor.on_end("s1")  # type: ignore[arg-type]
    processor.on_end("s2")  # type: ignore[arg-type]  # a whole batch: the exporter takes it
    wait_for(lambda: not processor._queue, 5, what="the batch taken")
    for n in range(10):  # the exporter hangs: 3 fit, 7 are dropped, none blocks
        processor.on_end(f"t{n}")  # type: ignore[arg-type]
    assert counted == {"queue_full": 7}
    exporter.release.set()
    processor.shutdown(timeout=5)
    assert exporter.exported == ["s1", "s2", "t0", "t1", "t2"]
    assert exporter.shut


def test_spans_of_a_failed_export_are_counted_as_dropped() -> None:
    exporter = FakeExporter(SpanExportResult.FAILURE)
    exporter.release.set()
    counted, on_drop = drops()
    processor = tracing.BoundedBatchProcessor(exporter, on_drop, max_queue=10, batch=4,
                                              delay=0.01, send=exporter.send)  # type: ignore[arg-type]
    for n in range(3):
        processor.on_end(f"s{n}")  # type: ignore[arg-type]
    wait_for(lambda: counted.get("export_failed") == 3, 5, what="failed spans counted")
    processor.shutdown()


def test_the_sdk_is_not_loaded_while_tracing_is_off() -> None:
    code = ("from edgeproxy.proxy.pipeline import Proxy\n"
            "from edgeproxy.core.settings import load_settings\n"
            "from edgeproxy.routes.table import RouteTable\n"
            "p = Proxy(load_settings({}), lambda: RouteTable())\n"
            "assert p.tracing is None\n"
            "import sys; print(' '.join(sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT, env={"PATH": "/usr/bin:/bin"})
    assert not [m for m in out.stdout.split() if m.startswith("opentelemetry")]


# --- the spans handed to the exporter ---------------------------------------------------------

HELD = {**ON, "OTEL_BSP_SCHEDULE_DELAY": "600000", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "1000"}
UPSTREAM = SimpleNamespace(host="10.0.0.7", port=8080, scheme="http", address="10.0.0.7:8080",
                           name="web-1")


def held_tracing(monkeypatch: pytest.MonkeyPatch, **env: str) -> tracing.Tracing:
    """Tracing from the OTEL_* variables (the SDK reads os.environ too); its export thread
    waits ten minutes, so the spans stay in the queue for the test to read."""
    for name, value in {**HELD, **env}.items():
        monkeypatch.setenv(name, value)
    traced = tracing.from_env(lambda reason, n: None, os.environ)
    assert traced is not None
    return traced


def close(traced: tracing.Tracing) -> None:
    """Stop the export thread without sending what is queued (there is no collector)."""
    traced.processor._queue.clear()
    traced.shutdown(timeout=5)


def request(traced: tracing.Tracing, headers: dict[str, str], path: str = "/api/x",
            status: int = 200) -> tuple[tracing.ServerTrace, bytes]:
    """One request through the hooks the pipeline calls: its trace and the try's header."""
    view = SimpleNamespace(headers=CIMultiDict({"Host": "edge.test", **headers}), method="GET",
                           target=path + "?q=1", secure=False, protocol="HTTP/1.1")
    trace = traced.start_server(view)  # type: ignore[arg-type]
    span, lines = trace.start_client("GET", UPSTREAM, path, 0)  # type: ignore[arg-type]
    trace.end_client(span, status, None)
    trace.end(SimpleNamespace(status=status, route="api", client="192.0.2.1", retries=0,
                              error=None))  # type: ignore[arg-type]
    return trace, lines


def test_spans_reach_the_otlp_encoder_as_spans_of_the_clients_trace(
        monkeypatch: pytest.MonkeyPatch) -> None:
    traced = held_tracing(monkeypatch, OTEL_SERVICE_NAME="edge-unit")
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    trace, lines = request(traced, {"traceparent": f"00-{trace_id}-{parent}-01",
                                    "tracestate": "vendor=abc"}, status=502)
    client, server = list(traced.processor._queue)
    assert lines == (b"traceparent: 00-%s-%016x-01\r\ntracestate: vendor=abc\r\n"
                     % (trace_id.encode(), client.span_id))
    # What the collector gets: the export thread's encoding of them.
    encoder = otlp.SpanEncoder(traced.provider.resource, InstrumentationScope("edgeproxy"))
    wire = ExportTraceServiceRequest.FromString(encoder.encode([client, server]))
    [resource_spans] = wire.resource_spans
    assert {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes
            }["service.name"] == "edge-unit"
    [scope_spans] = resource_spans.scope_spans
    assert scope_spans.scope.name == "edgeproxy"
    got_client, got_server = scope_spans.spans
    assert got_server.trace_id.hex() == got_client.trace_id.hex() == trace_id
    assert got_server.parent_span_id.hex() == parent
    assert got_client.parent_span_id == got_server.span_id
    assert got_server.span_id.hex() == trace.log_fields()["span_id"]
    assert (got_server.name, got_server.kind) == ("GET api", Span.SPAN_KIND_SERVER)
    assert (got_client.name, got_client.kind) == ("GET", Span.SPAN_KIND_CLIENT)
    assert got_server.status.code == got_client.status.code == Status.STATUS_CODE_ERROR  # 502
    assert got_server.trace_state == got_client.trace_state == "vendor=abc"
    assert 0 < got_server.start_time_unix_nano <= got_client.start_time_unix_nano \
        <= got_client.end_time_unix_nano <= got_server.end_time_unix_nano
    close(traced)


def test_an_unsampled_parent_is_followed_and_nothing_is_exported(
        monkeypatch: pytest.MonkeyPatch) -> None:
    traced = held_tracing(monkeypatch)  # the SDK's default: parentbased_always_on
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    trace, lines = request(traced, {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-00"})
    assert lines.startswith(b"traceparent: 00-%s-" % trace_id.encode())
    assert lines.endswith(b"-00\r\n")  # the replica is told: not sampled
    assert trace.log_fields()["trace_id"] == trace_id
    sampled, _ = request(traced, {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    assert [s.span_id for s in traced.processor._queue][-1] == sampled.span_id
    assert len(traced.processor._queue) == 2  # the sampled request's two spans only
    close(traced)


def test_the_sampler_ratio_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    traced = held_tracing(monkeypatch, OTEL_TRACES_SAMPLER="traceidratio",
                          OTEL_TRACES_SAMPLER_ARG="0")
    for _ in range(20):
        _, lines = request(traced, {})
        assert lines.endswith(b"-00\r\n")
    assert not traced.processor._queue
    close(traced)


def test_span_attribute_limits_from_the_environment_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    traced = held_tracing(monkeypatch, OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT="6")
    request(traced, {}, path="/a-long-path")
    client, server = traced.processor._queue
    assert server.attributes["url.path"] == "/a-lon"
    assert client.attributes["url.full"] == "http:/"
    assert server.attributes["http.response.status_code"] == 200  # only strings are cut
    close(traced)


@pytest.mark.parametrize(("headers", "strip"), [
    ({}, False),
    ({"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}, True),
    ({"TraceState": "vendor=abc"}, True),  # alone, still the client's: not for the replica
    ({"traceparent": "garbage"}, True),
])
def test_the_pipeline_is_told_when_the_client_sent_trace_headers(
        monkeypatch: pytest.MonkeyPatch, headers: dict[str, str], strip: bool) -> None:
    traced = held_tracing(monkeypatch)
    trace, lines = request(traced, headers)
    assert trace.client_headers is strip
    assert lines.startswith(b"traceparent: 00-")
    close(traced)


# --- the encoding: the same bytes as the SDK's encoder ----------------------------------------

RESOURCE = Resource.create({"service.name": "edge-unit", "deployment.environment": "test"})
SCOPE = InstrumentationScope("edgeproxy", "9.9")
TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
RECORDS = [
    # A server span under a client's span (remote), with tracestate, failed (5xx), every
    # attribute type a span may hold.
    otlp.SpanRecord("GET api", TRACE, 0x77, 0x03, TraceState([("vendor", "abc"), ("k", "v")]),
                    0x00F067AA0BA902B7, True, False, True, 1_700_000_000_000_000_000,
                    1_700_000_000_002_000_000,
                    {"http.request.method": "GET", "http.response.status_code": 502,
                     "edgeproxy.flag": True, "edgeproxy.ratio": 0.25,
                     "edgeproxy.tags": ("a", "b"), "edgeproxy.list": ["unhashable", "list"]}),
    # Its client span (a local parent), answered.
    otlp.SpanRecord("GET", TRACE, 0x78, 0x01, None, 0x77, False, True, False,
                    1_700_000_000_000_100_000, 1_700_000_000_001_900_000,
                    {"http.request.method": "GET", "http.response.status_code": 200,
                     "server.port": 8080, "edgeproxy.flag": 1}),  # 1 is not True on the wire
    # A root span with an empty tracestate, its attributes cut by span limits (dropped count).
    otlp.SpanRecord("POST", 7, 0x79, 0x00, TraceState(), 0, False, False, False, 5, 9,
                    BoundedAttributes(2, {"a": "x", "b": 2, "c": 3})),
]


def test_the_encoding_is_the_sdk_encoders_byte_for_byte() -> None:
    encoder = otlp.SpanEncoder(RESOURCE, SCOPE)
    sdk = encode_spans([r.readable(RESOURCE, SCOPE) for r in RECORDS]).SerializeToString()
    assert encoder.encode(RECORDS) == sdk
    assert encoder.encode(RECORDS) == sdk  # again, from the encoded attributes it kept
    assert encoder.encode(RECORDS[1:]) == encode_spans(
        [r.readable(RESOURCE, SCOPE) for r in RECORDS[1:]]).SerializeToString()


def test_kept_attributes_are_bounded() -> None:
    encoder = otlp.SpanEncoder(RESOURCE, SCOPE)
    many = [otlp.SpanRecord("GET", 1, n + 1, 1, None, 0, False, False, False, 1, 2,
                            {"url.path": f"/p/{n}"}) for n in range(otlp._ATTRIBUTES_MAX + 10)]
    wire = ExportTraceServiceRequest.FromString(encoder.encode(many))
    assert [s.attributes[0].value.string_value for s in
            wire.resource_spans[0].scope_spans[0].spans][-1] == f"/p/{otlp._ATTRIBUTES_MAX + 9}"
    assert len(encoder._encoded) <= otlp._ATTRIBUTES_MAX


def test_the_otlp_http_exporter_posts_the_encoded_bytes_itself() -> None:
    """The installed exporter has the client the fast path uses (an upgrade that removes it
    fails here, not as a silent 7x CPU per span)."""
    exporter = OTLPSpanExporter(endpoint="http://127.0.0.1:9/v1/traces")
    posted: list[bytes] = []
    exporter._client.export = lambda data: (  # type: ignore[method-assign]
        posted.append(data) or SimpleNamespace(success=True))
    exporter.export = None  # type: ignore[assignment,method-assign]  # not the SDK's encoder
    send = tracing._sender(exporter, RESOURCE, SCOPE)
    assert send(RECORDS)
    assert posted == [otlp.SpanEncoder(RESOURCE, SCOPE).encode(RECORDS)]
    exporter.shutdown()


def test_an_exporter_without_that_client_gets_the_sdks_spans() -> None:
    exporter = FakeExporter()
    exporter.release.set()
    assert tracing._sender(exporter, RESOURCE, SCOPE)(RECORDS)  # type: ignore[arg-type]
    assert all(isinstance(s, ReadableSpan) for s in exporter.exported)
    assert encode_spans(exporter.exported).SerializeToString() == \
        otlp.SpanEncoder(RESOURCE, SCOPE).encode(RECORDS)
