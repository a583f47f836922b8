"""edgeproxy.proxy.http2 and edgeproxy.clients.upstream_h2: the pure parts (gRPC statuses of the proxy's
refusals, the HTTP/2 request head built for a replica)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edgeproxy.clients.upstream_h2 import request_headers
from edgeproxy.core.headers import UpstreamHead
from edgeproxy.proxy.exchange import Refusal
from edgeproxy.proxy.http2 import GRPC_BY_STATUS, grpc_status_of

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
