"""edgeproxy.otlp writes the same ExportTraceServiceRequest as the OTel exporter's encoder."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.span import TraceState

from edgeproxy import otlp


def finished_spans(tracer_version: str | None = "1.2.3") -> list[ReadableSpan]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "t", "n": 3,
                                                        "f": 0.5, "b": True}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("edgeproxy", tracer_version)
    remote = SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, is_remote=True,
                         trace_flags=trace.TraceFlags(1),
                         trace_state=TraceState([("vendor", "abc"), ("x", "1")]))
    parent = trace.set_span_in_context(NonRecordingSpan(remote), Context())
    server = tracer.start_span("GET api", context=parent, kind=SpanKind.SERVER, attributes={
        "http.request.method": "GET", "url.path": "/a/\u00e9", "server.port": 8080,
        "neg": -5, "ratio": 0.25, "flag": False})
    client = tracer.start_span("GET", context=trace.set_span_in_context(server),
                               kind=SpanKind.CLIENT, attributes={"server.port": 1})
    client.set_status(Status(StatusCode.ERROR))
    client.end()
    server.set_status(Status(StatusCode.ERROR, "boom"))
    server.end()
    tracer.start_span("lonely").end()  # no parent, unset status
    return list(memory.get_finished_spans())


def parse(data: bytes) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    req.ParseFromString(data)
    return req


@pytest.mark.parametrize("version", ["1.2.3", None])
def test_encoding_parses_to_the_exporters_message(version: str | None) -> None:
    spans = finished_spans(version)
    ours = parse(otlp.encode_request(spans))
    theirs = parse(encode_spans(spans).SerializeToString())
    assert ours == theirs
    assert len(ours.resource_spans[0].scope_spans[0].spans) == 3


def test_spans_with_events_are_left_to_the_exporter() -> None:
    provider = TracerProvider()
    span = provider.get_tracer("x").start_span("s")
    span.add_event("e")
    span.end()
    with pytest.raises(otlp.Unsupported):
        otlp.encode_request([span])  # type: ignore[list-item]


@pytest.mark.parametrize("value", [2**63 - 1, -(2**63), 0, 127, 128, 300])
def test_int_attributes_round_trip(value: Any) -> None:
    provider = TracerProvider()
    span = provider.get_tracer("x").start_span("s", attributes={"v": value})
    span.end()
    got = parse(otlp.encode_request([span]))  # type: ignore[list-item]
    assert got.resource_spans[0].scope_spans[0].spans[0].attributes[0].value.int_value == value
