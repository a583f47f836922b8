"""OTLP/protobuf encoding of finished spans, written by hand: an ExportTraceServiceRequest's
bytes, the same message the OTel exporter's encoder builds, at a fraction of its cost.

Why: the exporter package builds a protobuf object per span, attribute and value (about
45 us per span measured here), and its thread shares the proxy's core and GIL; at 100 %
sampling that alone cost more than the plain route's whole request. This writes the wire
format directly, with the resource and scope encoded once. Spans with events or links (the
proxy makes none) are refused with `Unsupported`, and the caller falls back to the exporter's
own encoder. tests/unit/test_otlp.py checks the bytes parse to the exporter's message.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan

_DOUBLE = struct.Struct("<d")
_FIXED64 = struct.Struct("<Q")
_FIXED32 = struct.Struct("<I")
# Span.flags: SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK, and IS_REMOTE for a remote parent.
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200


class Unsupported(ValueError):
    """A span this encoder does not write (events, links, exotic attribute values)."""


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64: two's complement, ten bytes
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, data: bytes) -> bytes:
    """A length-delimited field: tag, length, bytes."""
    return tag + _varint(len(data)) + data


def _value(value: Any) -> bytes:
    """An AnyValue's fields."""
    if isinstance(value, str):
        return _field(b"\x0a", value.encode("utf-8", "surrogatepass"))
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(value)
    if isinstance(value, float):
        return b"\x21" + _DOUBLE.pack(value)
    raise Unsupported(f"attribute value of type {type(value).__name__}")


# Encoded KeyValue fields by (tag, key, value, type): methods, routes, statuses, addresses
# repeat from request to request. Bounded: a varying value (a path) only churns the cache.
_kv: dict[tuple[bytes, str, Any, type], bytes] = {}


def _attributes(tag: bytes, attributes: Mapping[str, Any] | None) -> bytes:
    """Repeated KeyValue fields (`tag` is the field's tag in the enclosing message)."""
    if not attributes:
        return b""
    parts = []
    cache = _kv
    for key, value in attributes.items():
        index = (tag, key, value, type(value))
        try:
            encoded = cache.get(index)
        except TypeError:  # an unhashable value (a list): not one of ours
            raise Unsupported(f"attribute {key!r} holds a {type(value).__name__}") from None
        if encoded is None:
            kv = _field(b"\x0a", key.encode()) + _field(b"\x12", _value(value))
            encoded = _field(tag, kv)
            if len(cache) >= 4096:
                cache.clear()
            cache[index] = encoded
        parts.append(encoded)
    return b"".join(parts)


def encode_span(span: ReadableSpan) -> bytes:
    """One Span message (without its field tag)."""
    if span.events or span.links:
        raise Unsupported("span with events or links")
    ctx = span.get_span_context()
    assert ctx is not None  # noqa: S101 - an ended SDK span always has one
    parts = [b"\x0a\x10", ctx.trace_id.to_bytes(16, "big"),
             b"\x12\x08", ctx.span_id.to_bytes(8, "big")]
    if ctx.trace_state:
        parts.append(_field(b"\x1a", ",".join(f"{k}={v}" for k, v in
                                              ctx.trace_state.items()).encode()))
    parent = span.parent
    if parent is not None:
        parts += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
    parts.append(_field(b"\x2a", span.name.encode("utf-8", "surrogatepass")))
    parts += (b"\x30", _varint(span.kind.value + 1),  # API enum + 1 = OTLP enum
              b"\x39", _FIXED64.pack(span.start_time or 0),
              b"\x41", _FIXED64.pack(span.end_time or 0))
    parts.append(_attributes(b"\x4a", span.attributes))
    if span.dropped_attributes:
        parts += (b"\x50", _varint(span.dropped_attributes))
    status = span.status
    body = b""
    if status.description:
        body += _field(b"\x12", status.description.encode("utf-8", "surrogatepass"))
    if status.status_code.value:
        body += b"\x18" + _varint(status.status_code.value)
    parts.append(_field(b"\x7a", body))
    flags = _HAS_IS_REMOTE | (_IS_REMOTE if parent is not None and parent.is_remote else 0)
    parts += (b"\x85\x01", _FIXED32.pack(flags))
    return b"".join(parts)


_heads: dict[tuple[int, int], tuple[Any, Any, bytes, bytes]] = {}


def _head(span: ReadableSpan) -> tuple[bytes, bytes]:
    """The Resource field and the InstrumentationScope field for this span's (resource,
    scope), encoded once."""
    resource, scope = span.resource, span.instrumentation_scope
    key = (id(resource), id(scope))
    head = _heads.get(key)
    if head is None or head[0] is not resource or head[1] is not scope:
        res = _field(b"\x0a", _attributes(b"\x0a", resource.attributes))
        sc = b""
        if scope is not None:
            body = _field(b"\x0a", scope.name.encode()) if scope.name else b""
            if scope.version:
                body += _field(b"\x12", scope.version.encode())
            body += _attributes(b"\x1a", scope.attributes)
            sc = _field(b"\x0a", body)
        if len(_heads) > 16:
            _heads.clear()
        head = _heads[key] = (resource, scope, res, sc)
    return head[2], head[3]


def encode_request(spans: Sequence[ReadableSpan]) -> bytes:
    """An ExportTraceServiceRequest holding `spans`, grouped by resource and scope."""
    groups: dict[tuple[int, int], list[bytes]] = {}
    firsts: dict[tuple[int, int], ReadableSpan] = {}
    for span in spans:
        key = (id(span.resource), id(span.instrumentation_scope))
        encoded = _field(b"\x12", encode_span(span))
        if key in groups:
            groups[key].append(encoded)
        else:
            groups[key] = [encoded]
            firsts[key] = span
    out = []
    for key, encoded_spans in groups.items():
        first = firsts[key]
        resource, scope_field = _head(first)
        scope = first.instrumentation_scope
        scope_spans = scope_field + b"".join(encoded_spans)
        if scope is not None and scope.schema_url:
            scope_spans += _field(b"\x1a", scope.schema_url.encode())
        body = resource + _field(b"\x12", scope_spans)
        if first.resource.schema_url:
            body += _field(b"\x1a", first.resource.schema_url.encode())
        out.append(_field(b"\x0a", body))
    return b"".join(out)
