"""edgeproxy.proxy.http2 and edgeproxy.clients.upstream_h2: the pure parts (gRPC statuses of the proxy's
refusals, the HTTP/2 request head built for a replica, the checks and normalisation that stand in
for h2's own outbound and replica-side passes)."""

from __future__ import annotations

import re
from pathlib import Path

import hpack
import pytest
from multidict import CIMultiDict

from edgeproxy.clients.upstream import UpstreamError
from edgeproxy.clients.upstream_h2 import _response_fields, request_headers
from edgeproxy.core.headers import HopInfo, UpstreamHead, upstream_head
from edgeproxy.proxy.exchange import Refusal
from edgeproxy.proxy.http2 import GRPC_BY_STATUS, BadHeader, _pairs, _replica_pairs, grpc_status_of

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_error_status_in_the_readme_has_its_grpc_status() -> None:
    rows = re.findall(r"^\| (\d{3}) \| [^|]*\| [^|]*\| (\d+) `([A-Z_]+)` \|$",
                      README.read_text(), re.MULTILINE)
    assert len(rows) >= 11
    for status, grpc, _ in rows:
        assert GRPC_BY_STATUS[int(status)] == int(grpc), status


@pytest.mark.parametrize(("refusal", "grpc"), [
    (Refusal(404, "no_route", "x"), 12),
    (Refusal(503, "no_replica", "x"), 14),
    (Refusal(401, "invalid_token", "x"), 16),
    (Refusal(429, "rate_limited", "x"), 8),
    (Refusal(504, "upstream_timeout", "x"), 4),
    (Refusal(418, "teapot", "x"), 2),  # anything else: UNKNOWN
])
def test_grpc_status_of_refusals(refusal: Refusal, grpc: int) -> None:
    assert grpc_status_of(refusal) == grpc


def test_request_headers_for_an_http2_replica() -> None:
    head = UpstreamHead([b"Host: api.test\r\nContent-Type: application/grpc\r\n",
                         b"Grpc-Timeout", b": ", b"100m", b"\r\n",
                         b"X-Forwarded-For: 10.0.0.1\r\n"], True, False)
    assert request_headers("POST", "/svc/M", "http", "10.0.0.5:50051", head) == [
        (b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"api.test"),
        (b":path", b"/svc/M"), (b"content-type", b"application/grpc"),
        (b"grpc-timeout", b"100m"), (b"x-forwarded-for", b"10.0.0.1"), (b"te", b"trailers")]


def test_request_headers_without_host_use_the_replica_address() -> None:
    head = UpstreamHead([b"Accept: */*\r\n"], False, False)
    assert request_headers("GET", "/", "https", "10.0.0.5:443", head)[:4] == [
        (b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"10.0.0.5:443"),
        (b":path", b"/")]


def _never_indexed(pairs: list[tuple[bytes, bytes]]) -> set[bytes]:
    return {p[0] for p in pairs if isinstance(p, hpack.NeverIndexedHeaderTuple)}


def test_request_headers_from_pairs_match_those_from_lines_and_keep_secrets_unindexed() -> None:
    raw = [(b"Host", b"api.test"), (b"Authorization", b"Bearer s3cret"),
           (b"Cookie", b"a=1"), (b"Accept", b"*/* ")]
    head = upstream_head(raw, HopInfo("10.0.0.1", "10.0.0.1", "https", "rid-1", False),
                         ("alice", "read"))
    assert head.pairs is not None
    from_lines = UpstreamHead(head.pieces, head.has_host, head.has_length)
    out = request_headers("GET", "/x", "http", "10.0.0.5:80", head, b"traceparent: 00-ab\r\n")
    assert out == request_headers("GET", "/x", "http", "10.0.0.5:80", from_lines,
                                  b"traceparent: 00-ab\r\n")
    assert (b"accept", b"*/*") in out  # trimmed: h2's own normalisation is off
    assert (b"x-auth-subject", b"alice") in out
    assert _never_indexed(out) == {b"authorization", b"cookie", b"x-request-id", b"traceparent"}


@pytest.mark.parametrize(("fields", "trailers", "problem"), [
    ([(b":status", b"200"), (b"x-a", b"b\x00c")], False, "NUL, CR or LF"),
    ([(b":status", b"200"), (b"x-a", b"b\r\nx-injected: 1")], False, "NUL, CR or LF"),
    ([(b":status", b"200"), (b"X-Upper", b"v")], False, "invalid response field name"),
    ([(b":status", b"200"), (b"bad name", b"v")], False, "invalid response field name"),
    ([(b":status", b"200"), (b"connection", b"close")], False, "invalid response field name"),
    ([(b":status", b"200"), (b":path", b"/")], False, "':path'"),
    ([(b"x-a", b"v"), (b":status", b"200")], False, "':status'"),
    ([(b":status", b"200"), (b":status", b"204")], False, "':status'"),
    ([(b":status", b"20")], False, "':status'"),
    ([(b"x-a", b"v")], False, "without :status"),
    ([(b":status", b"200")], True, "trailers"),
])
def test_a_replicas_malformed_response_fields_are_refused(
        fields: list[tuple[bytes, bytes]], trailers: bool, problem: str) -> None:
    with pytest.raises(UpstreamError, match=re.escape(problem)):
        _response_fields(fields, trailers)


def test_a_replicas_good_response_fields_are_trimmed() -> None:
    assert _response_fields([(b":status", b"204"), (b"x-a", b" v\t"), (b"set-cookie", b"a=1")],
                            False) == (204, [(b"x-a", b"v"), (b"set-cookie", b"a=1")])
    assert _response_fields([(b"grpc-status", b"0")], True) == (0, [(b"grpc-status", b"0")])


def test_answer_heads_from_replica_bytes_match_the_multidict_path() -> None:
    raw = [(b"Server", b"nginx"), (b"Content-Type", b"text/plain "), (b"Content-Length", b"5"),
           (b"Connection", b"keep-alive, X-Hop"), (b"X-Hop", b"1"), (b"X-Request-ID", b"theirs"),
           (b"Set-Cookie", b"id=1"), (b"Retry-After", b"9")]
    out = _replica_pairs(raw, "ours", {"Retry-After": "1", "RateLimit-Limit": "5"})
    assert out == [(b"server", b"nginx"), (b"content-type", b"text/plain"),
                   (b"set-cookie", b"id=1"), (b"x-request-id", b"ours"),
                   (b"retry-after", b"1"), (b"ratelimit-limit", b"5")]
    assert _never_indexed(out) == {b"set-cookie", b"x-request-id"}
    multidict: CIMultiDict[str] = CIMultiDict(
        [("Server", "nginx"), ("Content-Type", "text/plain "), ("Set-Cookie", "id=1"),
         ("X-Request-ID", "ours"), ("Retry-After", "1"), ("RateLimit-Limit", "5")])
    assert _pairs(multidict) == out


def test_an_answer_head_value_http2_cannot_carry_is_refused() -> None:
    with pytest.raises(BadHeader, match="'X-A' has a NUL, CR or LF"):
        _pairs(CIMultiDict([("X-A", "a\x00b")]))
