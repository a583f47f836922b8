"""Ended spans as OTLP protobuf, encoded in the export thread by opentelemetry-proto's messages.

Why not the SDK exporter's encoder (`encode_spans`): it builds one protobuf `KeyValue` and
`AnyValue` per attribute of every span, about 30 us a span here, 60 us for a request's two
spans, more than half a plain request's whole CPU. A proxy's span attributes repeat (the
method, the route, the replica, the status): here each (key, value) is encoded once, as a
serialized one-attribute `Span`, and a span's attributes are merged into its message from those
bytes (protobuf's merge of a serialized message: repeated fields append). About 4 us a span.

Every byte is still protobuf's: the request's frame (resource, scope, schema URLs) is the SDK
encoder's own output for a probe span, the fields are set on opentelemetry-proto's `Span`
messages, and the tests compare this encoding with the SDK's for the same spans.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import TraceState

# OTLP's values (opentelemetry/proto/trace/v1/trace.proto): kinds, status codes, span flags.
_KIND = (2, 3)  # SPAN_KIND_SERVER, SPAN_KIND_CLIENT
_STATUS_ERROR = 2
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200
_ATTRIBUTES_MAX = 4096  # encoded (key, value) pairs kept; emptied when full (paths, clients vary)


class SpanRecord(NamedTuple):
    """One ended span, as the request path hands it to the export queue: plain values, no SDK
    object (the export thread encodes it)."""

    name: str
    trace_id: int
    span_id: int
    flags: int  # W3C trace flags of the trace
    trace_state: TraceState | None
    parent_id: int  # 0: no parent
    parent_remote: bool  # the parent is the client's span (from its traceparent)
    client: bool  # a client span (a try against a replica); else the request's server span
    failed: bool  # error status
    start: int  # ns since the epoch
    end: int
    attributes: Mapping[str, Any]  # a dict, or the SDK's BoundedAttributes under span limits

    def readable(self, resource: Resource, scope: InstrumentationScope) -> ReadableSpan:
        """The same span as the SDK's ReadableSpan (for an exporter that takes only those)."""
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

        flags = TraceFlags(self.flags)
        parent = SpanContext(self.trace_id, self.parent_id, self.parent_remote, flags,
                             self.trace_state) if self.parent_id else None
        return ReadableSpan(
            self.name, SpanContext(self.trace_id, self.span_id, False, flags, self.trace_state),
            parent, resource, self.attributes,
            kind=SpanKind.CLIENT if self.client else SpanKind.SERVER,
            status=Status(StatusCode.ERROR if self.failed else StatusCode.UNSET),
            start_time=self.start, end_time=self.end, instrumentation_scope=scope)


class SpanEncoder:
    """SpanRecords to the bytes of one OTLP ExportTraceServiceRequest."""

    def __init__(self, resource: Resource, scope: InstrumentationScope) -> None:
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )
        from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
        from opentelemetry.proto.trace.v1.trace_pb2 import Span

        probe = SpanRecord("probe", 1, 1, 0, None, 0, False, False, False, 0, 0, {})
        frame = encode_spans([probe.readable(resource, scope)])
        del frame.resource_spans[0].scope_spans[0].spans[:]
        self._frame = frame.SerializeToString()
        self._parse = ExportTraceServiceRequest.FromString
        self._span = Span
        self._key_value = KeyValue
        self._any = AnyValue
        self._array = ArrayValue
        self._encoded: dict[tuple[str, Any, type], bytes] = {}

    def encode(self, records: Sequence[SpanRecord]) -> bytes:
        """One request holding `records` (all of this process's resource and scope)."""
        request = self._parse(self._frame)
        add = request.resource_spans[0].scope_spans[0].spans.add
        encoded = self._encoded
        attribute = self._attribute
        for r in records:
            span = add(trace_id=r.trace_id.to_bytes(16, "big"),
                       span_id=r.span_id.to_bytes(8, "big"), name=r.name, kind=_KIND[r.client],
                       start_time_unix_nano=r.start, end_time_unix_nano=r.end,
                       flags=_HAS_IS_REMOTE | _IS_REMOTE if r.parent_remote else _HAS_IS_REMOTE)
            if r.parent_id:
                span.parent_span_id = r.parent_id.to_bytes(8, "big")
            if r.trace_state is not None:
                span.trace_state = ",".join([f"{k}={v}" for k, v in r.trace_state.items()])
            if r.failed:
                span.status.code = _STATUS_ERROR
            else:
                span.status.SetInParent()  # the SDK always sends a status, UNSET here
            attributes = r.attributes
            parts = []
            for key, value in attributes.items():
                try:
                    known = encoded.get((key, value, value.__class__))
                except TypeError:  # an unhashable value (a list): encoded each time
                    known = None
                parts.append(known if known is not None else attribute(key, value))
            span.MergeFromString(b"".join(parts))
            dropped = getattr(attributes, "dropped", 0)  # BoundedAttributes under span limits
            if dropped:
                span.dropped_attributes_count = dropped
        data: bytes = request.SerializePartialToString()
        return data

    def _attribute(self, key: str, value: Any) -> bytes:
        """A one-attribute Span's bytes (kept for the next span, if the value can be a key)."""
        data: bytes = self._span(
            attributes=[self._key_value(key=key, value=self._value(value))]).SerializeToString()
        if isinstance(value, (str, bool, int, float)):
            if len(self._encoded) >= _ATTRIBUTES_MAX:
                self._encoded.clear()
            self._encoded[(key, value, value.__class__)] = data
        return data

    def _value(self, value: Any) -> Any:
        """An attribute value as an AnyValue (the types OTel attributes may hold)."""
        if isinstance(value, bool):
            return self._any(bool_value=value)
        if isinstance(value, str):
            return self._any(string_value=value)
        if isinstance(value, int):
            return self._any(int_value=value)
        if isinstance(value, float):
            return self._any(double_value=value)
        if isinstance(value, bytes):
            return self._any(bytes_value=value)
        if isinstance(value, Sequence):
            return self._any(array_value=self._array(values=[self._value(v) for v in value]))
        raise TypeError(f"span attribute value {value!r}: expected str, bool, int, float, "
                        "bytes or a sequence of them")


def bytes_sender(exporter: SpanExporter) -> Callable[[bytes], bool] | None:
    """The OTLP/HTTP exporter's own HTTP client, which posts encoded bytes with the exporter's
    endpoint, headers, compression, TLS files, timeout and retries (all from the OTEL_*
    variables), or None when this exporter has none (another exporter or SDK version: the
    spans then go through `exporter.export` as ReadableSpans, at the SDK encoder's cost).

    `_client` is the exporter's private attribute (opentelemetry-exporter-otlp-proto-http
    1.45 has it); tests/unit/test_tracing_setup.py checks that the installed exporter has it,
    so an upgrade that takes it away shows there instead of as a silent slowdown."""
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:  # only the gRPC exporter installed
        return None
    if not isinstance(exporter, OTLPSpanExporter):  # e.g. the gRPC exporter: its own client
        return None
    export = getattr(getattr(exporter, "_client", None), "export", None)
    if not callable(export):
        return None

    def send(data: bytes) -> bool:
        return bool(export(data).success)
    return send
