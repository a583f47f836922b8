"""edgeproxy.policies.ratelimit: parsing, the local token bucket, headers, bounded memory."""

from __future__ import annotations

import asyncio
import math

import pytest
from multidict import CIMultiDict

from edgeproxy.policies.ratelimit import (
    LocalLimiter,
    RateDecision,
    RateLimitSpec,
    client_key,
    parse_ratelimit,
    parse_ratelimit_key,
    ratelimit_headers,
)

# --- parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("100/m", (100, 60.0, 100)),
    ("100/minute", (100, 60.0, 100)),
    ("10/s", (10, 1.0, 10)),
    ("10/second", (10, 1.0, 10)),
    ("5000/h", (5000, 3600.0, 5000)),
    ("5000/HOUR", (5000, 3600.0, 5000)),
    ("100/m;burst=20", (100, 60.0, 20)),
    (" 10 / s ; burst = 50 ", (10, 1.0, 50)),
])
def test_parse_ratelimit(text: str, expected: tuple[int, float, int]) -> None:
    assert parse_ratelimit(text) == expected


@pytest.mark.parametrize("text", [
    "", "100", "100/", "/m", "0/m", "-1/m", "1.5/m", "100/d", "100/ms", "100/m;burst=0",
    "100/m;burst=", "100/m;bursts=2", "100/m;burst=2;x=1", "100 per minute", "1000000001/s",
])
def test_parse_ratelimit_errors(text: str) -> None:
    with pytest.raises(ValueError, match=r"a rate such as 100/m or 10/s;burst=20"):
        parse_ratelimit(text)


def test_parse_ratelimit_key() -> None:
    assert parse_ratelimit_key("ip") == "ip"
    assert parse_ratelimit_key(" SUB ") == "sub"
    assert parse_ratelimit_key("header:X-Api-Key") == "header:X-Api-Key"
    assert parse_ratelimit_key("Header: X-Api-Key") == "header:X-Api-Key"
    for bad in ("", "user", "header:", "header:X Api", "cookie:sid", "header:a:b"):
        with pytest.raises(ValueError, match=r"ip, sub or header:<Name>"):
            parse_ratelimit_key(bad)


def test_spec_parse() -> None:
    spec = RateLimitSpec.parse("100/m;burst=20", "header:X-Api-Key")
    assert spec == RateLimitSpec(100, 60.0, 20, "header:X-Api-Key")
    assert spec.rate == pytest.approx(100 / 60)


def test_client_key_falls_back_to_ip() -> None:
    headers = CIMultiDict({"x-api-key": "k1"})
    ip = RateLimitSpec(1, 1, 1, "ip")
    sub = RateLimitSpec(1, 1, 1, "sub")
    hdr = RateLimitSpec(1, 1, 1, "header:X-Api-Key")
    assert client_key(ip, ip="10.0.0.1", subject="u", headers=headers) == "ip:10.0.0.1"
    assert client_key(sub, ip="10.0.0.1", subject="u") == "sub:u"
    assert client_key(sub, ip="10.0.0.1", subject="") == "ip:10.0.0.1"
    assert client_key(hdr, ip="10.0.0.1", headers=headers) == "header:k1"
    assert client_key(hdr, ip="10.0.0.1", headers=CIMultiDict()) == "ip:10.0.0.1"


# --- the local bucket -------------------------------------------------------------------------


def hits(limiter: LocalLimiter, spec: RateLimitSpec, n: int, now: float, key: str = "k",
         route: str = "r") -> list[RateDecision]:
    return [limiter.take(route, spec, key, now) for _ in range(n)]


def test_exactly_n_under_200_concurrent_hits() -> None:
    async def main() -> list[RateDecision]:
        limiter = LocalLimiter()
        spec = RateLimitSpec.parse("100/h")
        return await asyncio.gather(*(limiter.hit("r", spec, "1.2.3.4") for _ in range(200)))

    decisions = asyncio.run(main())
    assert sum(d.allowed for d in decisions) == 100
    assert all(d.allowed for d in decisions[:100])
    assert not any(d.allowed for d in decisions[100:])
    assert [d.remaining for d in decisions[:3]] == [99, 98, 97]
    assert decisions[99].remaining == 0


@pytest.mark.parametrize("rate", ["1/s", "7/s", "100/m", "60/m", "3600/h", "1000/s", "13/h"])
def test_exactly_n_at_once_and_again_after_a_full_period(rate: str) -> None:
    limiter = LocalLimiter()
    spec = RateLimitSpec.parse(rate)
    t0 = 1000.0
    first = hits(limiter, spec, spec.limit + 5, t0)
    assert sum(d.allowed for d in first) == spec.limit
    # after exactly one period the bucket is full again: N more, not N-1
    again = hits(limiter, spec, spec.limit + 5, t0 + spec.period)
    assert sum(d.allowed for d in again) == spec.limit


def test_refill_is_gradual() -> None:
    limiter = LocalLimiter()
    spec = RateLimitSpec.parse("60/m")  # one token per second
    assert sum(d.allowed for d in hits(limiter, spec, 61, 0.0)) == 60
    denied = limiter.take("r", spec, "k", 0.5)
    assert not denied.allowed
    assert denied.retry_after == pytest.approx(0.5)
    assert limiter.take("r", spec, "k", 1.0).allowed
    assert not limiter.take("r", spec, "k", 1.0).allowed
    # 10 s later: 10 tokens
    assert sum(d.allowed for d in hits(limiter, spec, 20, 11.0)) == 10


def test_denied_requests_consume_nothing() -> None:
    limiter = LocalLimiter()
    spec = RateLimitSpec.parse("2/s")
    hits(limiter, spec, 2, 0.0)
    hits(limiter, spec, 50, 0.1)  # all denied
    assert limiter.take("r", spec, "k", 0.5).allowed  # 0.5 s -> 1 token, not eaten by denials


def test_burst_is_the_bucket_size() -> None:
    limiter = LocalLimiter()
    small = RateLimitSpec.parse("100/m;burst=20")
    assert sum(d.allowed for d in hits(limiter, small, 100, 0.0)) == 20
    # same average rate: 0.6 s per token
    assert limiter.take("r", small, "k", 0.6).allowed
    assert not limiter.take("r", small, "k", 0.6).allowed
    # a long idle time refills only up to the burst, not to the limit
    assert sum(d.allowed for d in hits(limiter, small, 100, 3600.0)) == 20

    big = RateLimitSpec.parse("10/s;burst=50")
    assert sum(d.allowed for d in hits(limiter, big, 100, 0.0, route="big")) == 50
    assert sum(d.allowed for d in hits(limiter, big, 100, 1.0, route="big")) == 10


def test_keys_and_routes_are_separate_buckets() -> None:
    limiter = LocalLimiter()
    spec = RateLimitSpec.parse("1/m")
    assert limiter.take("r1", spec, "a", 0).allowed
    assert not limiter.take("r1", spec, "a", 0).allowed
    assert limiter.take("r1", spec, "b", 0).allowed
    assert limiter.take("r2", spec, "a", 0).allowed
    # a changed limit on the same route starts a fresh bucket
    assert limiter.take("r1", RateLimitSpec.parse("2/m"), "a", 0).allowed


def test_clock_stepping_back_mints_no_tokens() -> None:
    limiter = LocalLimiter()
    spec = RateLimitSpec.parse("1/s")
    assert limiter.take("r", spec, "k", 100.0).allowed
    assert not limiter.take("r", spec, "k", 50.0).allowed
    assert not limiter.take("r", spec, "k", 100.5).allowed
    assert limiter.take("r", spec, "k", 101.0).allowed


def test_decision_reset_and_retry_after() -> None:
    limiter = LocalLimiter()
    spec = RateLimitSpec.parse("100/m")
    d = hits(limiter, spec, 58, 0.0)[-1]
    assert (d.allowed, d.limit, d.remaining, d.retry_after) == (True, 100, 42, 0.0)
    assert d.reset == pytest.approx(58 * 0.6)
    hits(limiter, spec, 42, 0.0)
    denied = limiter.take("r", spec, "k", 0.0)
    assert not denied.allowed and denied.remaining == 0
    assert denied.retry_after == pytest.approx(0.6)
    assert denied.reset == pytest.approx(60.0)


def test_memory_bounded_under_a_key_flood() -> None:
    limiter = LocalLimiter(max_keys=1000)
    spec = RateLimitSpec.parse("10/s")
    for i in range(100_000):
        limiter.take("r", spec, f"ip:10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", 0.0)
    assert limiter.size <= 1000
    # huge header values cost no more than short ones: long keys become fixed-size digests
    limiter.take("r", spec, "header:" + "x" * 8000, 0.0)
    for k in limiter._buckets:
        assert (isinstance(k, bytes) and len(k) == 16) or (
            isinstance(k, tuple) and len(k[-1]) <= 96), k


def test_local_limiter_health_attributes() -> None:
    limiter = LocalLimiter()
    assert limiter.healthy is True and limiter.last_error is None
    asyncio.run(limiter.start())
    asyncio.run(limiter.close())


# --- headers ----------------------------------------------------------------------------------


def test_headers_allowed() -> None:
    spec = RateLimitSpec.parse("100/m")
    d = RateDecision(True, 100, 42, 16.2, 0.0)
    assert ratelimit_headers(spec, d) == {
        "RateLimit-Policy": '"default";q=100;w=60',
        "RateLimit": '"default";r=42;t=17',
    }


def test_headers_denied() -> None:
    spec = RateLimitSpec.parse("10/s;burst=5")
    d = RateDecision(False, 10, 0, 0.5, 0.1)
    assert ratelimit_headers(spec, d) == {
        "RateLimit-Policy": '"default";q=10;w=1',
        "RateLimit": '"default";r=0;t=1',
        "Retry-After": "1",
    }
    spec = RateLimitSpec.parse("2/h")
    d = RateDecision(False, 2, 0, 3600.0, 1800.0000001)
    headers = ratelimit_headers(spec, d)
    assert headers["Retry-After"] == "1800"
    assert headers["RateLimit"] == '"default";r=0;t=1800'
    assert headers["RateLimit-Policy"] == '"default";q=2;w=3600'


def test_headers_from_real_decisions() -> None:
    limiter = LocalLimiter()
    spec = RateLimitSpec.parse("100/m")
    first = limiter.take("r", spec, "k", 0.0)
    assert ratelimit_headers(spec, first)["RateLimit"] == '"default";r=99;t=1'
    hits(limiter, spec, 99, 0.0)
    denied = limiter.take("r", spec, "k", 0.0)
    h = ratelimit_headers(spec, denied)
    assert h["Retry-After"] == "1" and h["RateLimit"] == '"default";r=0;t=1'
    # Retry-After never points before the end of the effective window t
    assert int(h["Retry-After"]) >= int(h["RateLimit"].rsplit("t=", 1)[1])


def test_headers_without_a_backend_decision() -> None:
    spec = RateLimitSpec.parse("100/m")
    open_ = RateDecision(True, 100, 100, 0.0, 0.0, error="rate limit backend unavailable: x")
    assert ratelimit_headers(spec, open_) == {"RateLimit-Policy": '"default";q=100;w=60'}
    closed = RateDecision(False, 100, 0, 1.0, 1.0, error="rate limit backend unavailable: x")
    assert ratelimit_headers(spec, closed) == {"RateLimit-Policy": '"default";q=100;w=60',
                                               "Retry-After": "1"}


def test_header_seconds_round_up() -> None:
    spec = RateLimitSpec.parse("1/h")
    for value, expected in ((0.0, 0), (0.001, 1), (1.0, 1), (1.5, 2), (59.99, 60)):
        d = RateDecision(True, 1, 0, value, 0.0)
        assert ratelimit_headers(spec, d)["RateLimit"] == f'"default";r=0;t={expected}'
        assert expected == max(0, math.ceil(value - 1e-6))
