"""Rate limits per route and client key: `gateway.ratelimit=100/m;burst=20`, a token bucket kept
in process memory (LocalLimiter here) or in Redis shared by every proxy replica (RedisLimiter,
in redis_limiter.py).

Semantics (the same in both limiters):
- `N/period` refills N tokens per period, continuously (N/60 per second for `N/m`).
- `burst` is the bucket size: how many requests may go through at once. Without it the bucket
  holds N, so `100/m` admits exactly 100 requests at once and then one every 0.6 s, the
  allowance Kong users know from "100 per minute". With it, it is Traefik's `burst`: `100/m;
  burst=20` smooths traffic to at most 20 at once at the same average rate, `10/s;burst=50`
  tolerates spikes of 50. Like any token bucket (and Kong's fixed windows at a boundary), a
  client that waited for a full bucket can use `burst + N` requests within one period.
- A denied request consumes nothing.
- Keys: `ip` (the trusted client address), `sub` (the verified JWT subject) or `header:<Name>`.
  A request without the subject or header is limited by its IP instead, so key-less requests
  never share one bucket (traefik#10307).
- State is bounded: LocalLimiter keeps at most `max_keys` buckets (least recently used evicted;
  an evicted bucket is simply full again), Redis keys expire once their bucket would be full.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from edgeproxy.core.state import fast_state

_PERIODS = {"s": 1.0, "second": 1.0, "m": 60.0, "minute": 60.0, "h": 3600.0, "hour": 3600.0}
_RATE = re.compile(
    r"^\s*(\d+)\s*/\s*(s|second|m|minute|h|hour)\s*(?:;\s*burst\s*=\s*(\d+)\s*)?$", re.IGNORECASE)
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 token
_MAX_COUNT = 1_000_000_000
RATE_EXPECTED = ("a rate such as 100/m or 10/s;burst=20 (N/s, N/m or N/h, also /second, /minute, "
                 "/hour; N and burst whole numbers of at least 1)")
KEY_EXPECTED = "ip, sub or header:<Name> such as header:X-Api-Key"
# Tokens are floats once refill starts; without a tolerance N*(period/N) can land a hair below a
# whole token and deny the Nth request of a full refill.
EPSILON = 1e-9
POLICY_NAME = "default"


def parse_ratelimit(value: str) -> tuple[int, float, int]:
    """'100/m;burst=20' -> (100, 60.0, 20); without burst the bucket size is the limit."""
    m = _RATE.match(value)
    if not m:
        raise ValueError(RATE_EXPECTED)
    limit = int(m.group(1))
    burst = int(m.group(3)) if m.group(3) is not None else limit
    if not 1 <= limit <= _MAX_COUNT or not 1 <= burst <= _MAX_COUNT:
        raise ValueError(RATE_EXPECTED)
    return limit, _PERIODS[m.group(2).lower()], burst


def parse_ratelimit_key(value: str) -> str:
    """'ip' | 'sub' | 'header:X-Api-Key' -> the same, normalised; else ValueError."""
    v = value.strip()
    if v.lower() in ("ip", "sub"):
        return v.lower()
    kind, sep, name = v.partition(":")
    name = name.strip()
    if sep and kind.strip().lower() == "header" and _HEADER_NAME.match(name):
        return "header:" + name
    raise ValueError(KEY_EXPECTED)


@fast_state
@dataclass(frozen=True, slots=True)
class RateLimitSpec:
    """One route's limit: `limit` requests per `period` seconds, bucket size `burst`, key kind."""

    limit: int
    period: float
    burst: int
    key: str = "ip"  # 'ip' | 'sub' | 'header:<Name>'

    @property
    def rate(self) -> float:
        """Tokens added per second."""
        return self.limit / self.period

    @classmethod
    def parse(cls, rate: str, key: str = "ip") -> RateLimitSpec:
        """From the label values `gateway.ratelimit` and `gateway.ratelimit.key`."""
        limit, period, burst = parse_ratelimit(rate)
        return cls(limit, period, burst, parse_ratelimit_key(key))


@dataclass(slots=True)  # not frozen: made per request, and frozen __init__ costs ~1 us
class RateDecision:
    """The outcome of one request against its bucket.

    `remaining`: whole tokens left after this request. `reset`: seconds until the bucket is full
    again. `retry_after`: seconds until the next request can pass (0 when allowed). `error`: set
    when the backend could not decide; `allowed` then reflects the failure policy, and a denied
    request should be answered 503, not 429.
    """

    allowed: bool
    limit: int
    remaining: int
    reset: float
    retry_after: float
    error: str | None = None


def ratelimit_headers(spec: RateLimitSpec, decision: RateDecision) -> dict[str, str]:
    """RateLimit-Policy and RateLimit (draft-ietf-httpapi-ratelimit-headers), plus Retry-After
    when denied; seconds are rounded up so a client that waits that long is let through.

    `t` is the seconds until the quota is fully restored; on a denial it is the Retry-After
    delay instead (the time during which the available quota stays 0), as the draft asks that
    Retry-After not point before the end of the effective window. Without a decision from the
    backend (`error`), RateLimit is left out rather than invented.
    """
    headers = {"RateLimit-Policy": f'"{POLICY_NAME}";q={spec.limit};w={math.ceil(spec.period)}'}
    if decision.error is None:
        t = decision.reset if decision.allowed else decision.retry_after
        headers["RateLimit"] = f'"{POLICY_NAME}";r={max(decision.remaining, 0)};t={_seconds(t)}'
    if not decision.allowed:
        headers["Retry-After"] = str(max(1, _seconds(decision.retry_after)))
    return headers


def _seconds(value: float) -> int:
    # Subtract a tolerance first so 3.0000000001 (float noise) is 3, not 4.
    return max(0, math.ceil(value - 1e-6))


def client_key(spec: RateLimitSpec, *, ip: str, subject: str | None = None,
               headers: Mapping[str, str] | None = None) -> str:
    """The bucket key of one request: 'ip:<addr>', 'sub:<subject>' or 'header:<value>'.

    `ip` must be the trusted client address (X-Forwarded-For only from trusted proxies); a
    missing subject or header falls back to it. `headers` should be case-insensitive
    (CIMultiDict), as aiohttp's are.
    """
    if spec.key == "sub" and subject:
        return "sub:" + subject
    if spec.key.startswith("header:") and headers is not None:
        value = headers.get(spec.key[7:])
        if value:
            return "header:" + value
    return "ip:" + ip


def _bucket_id(route: str, spec: RateLimitSpec, key: str) -> bytes:
    """A fixed-size id per (route, spec, key): memory per bucket doesn't grow with header size,
    and a changed limit starts from a fresh bucket instead of inheriting an odd state."""
    raw = f"{route}\0{spec.limit}/{spec.period};{spec.burst};{spec.key}\0{key}"
    return hashlib.blake2b(raw.encode("utf-8", "surrogateescape"), digest_size=16).digest()


def _local_key(route: str, spec: RateLimitSpec, key: str) -> object:
    """The in-process bucket key: a cheap tuple for ordinary keys, a digest for long ones (so
    a flood of huge header values can't make the bounded cache large in bytes)."""
    if len(key) <= 96:  # plain fields: a frozen dataclass would rehash all of them each time
        return (route, spec.limit, spec.period, spec.burst, spec.key, key)
    return _bucket_id(route, spec, key)


def refill_and_take(spec: RateLimitSpec, tokens: float, last: float,
                    now: float) -> tuple[float, float, bool]:
    """One token-bucket step: (tokens left, new last-update time, allowed)."""
    tokens = min(float(spec.burst), tokens + max(0.0, now - last) * spec.rate)
    last = max(last, now)  # a clock that steps back must not mint tokens later
    allowed = tokens >= 1.0 - EPSILON
    if allowed:
        tokens = max(0.0, tokens - 1.0)
    return tokens, last, allowed


def _decide(spec: RateLimitSpec, tokens: float, allowed: bool) -> RateDecision:
    """A decision from the bucket level left after this request."""
    rate = spec.rate
    return RateDecision(
        allowed=allowed,
        limit=spec.limit,
        remaining=max(0, math.floor(tokens + EPSILON)),
        reset=max(0.0, (spec.burst - tokens) / rate),
        retry_after=0.0 if allowed else max(0.0, (1.0 - tokens) / rate),
    )


class Limiter(Protocol):
    """What the request path needs from a limiter, local or shared."""

    @property
    def healthy(self) -> bool: ...

    @property
    def last_error(self) -> str | None: ...

    async def hit(self, route: str, spec: RateLimitSpec, key: str,
                  now: float | None = None) -> RateDecision: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class InMemoryLimiter:
    """Shared shape of the in-memory limiters: `take` is synchronous, `hit` wraps it.

    `hit` never awaits, so on one event loop each call is atomic without a lock; callers that
    know the type call `take` directly and skip a coroutine per request.
    """

    healthy = True
    last_error: str | None = None

    async def start(self) -> None:
        """Nothing to set up; present so every limiter is wired the same way."""

    async def close(self) -> None:
        """Nothing to release."""

    async def hit(self, route: str, spec: RateLimitSpec, key: str,
                  now: float | None = None) -> RateDecision:
        """Take one token from the bucket of (route, key); `now` (monotonic seconds) for tests."""
        return self.take(route, spec, key, time.monotonic() if now is None else now)

    def take(self, route: str, spec: RateLimitSpec, key: str, now: float) -> RateDecision:
        """Take one token at time `now`."""
        raise NotImplementedError


class LocalLimiter(InMemoryLimiter):
    """Token buckets in this process: the limit applies per proxy replica."""

    def __init__(self, max_keys: int = 100_000) -> None:
        # value: [tokens, last update]; a list so a hit updates in place without allocating.
        # An OrderedDict used as an LRU directly: cachetools' LRUCache does the same through
        # several Python layers, which showed up per request in profiles.
        self._buckets: OrderedDict[object, list[float]] = OrderedDict()
        self._max = max_keys

    @property
    def size(self) -> int:
        """Buckets held now (never more than max_keys)."""
        return len(self._buckets)

    def take(self, route: str, spec: RateLimitSpec, key: str, now: float) -> RateDecision:
        """The synchronous core of `hit`."""
        bid = _local_key(route, spec, key)
        buckets = self._buckets
        state = buckets.get(bid)
        if state is None:
            state = [float(spec.burst), now]
            buckets[bid] = state
            if len(buckets) > self._max:
                buckets.popitem(last=False)  # evict the least recently used bucket
        else:
            buckets.move_to_end(bid)
        tokens, state[1], allowed = refill_and_take(spec, state[0], state[1], now)
        state[0] = tokens
        return _decide(spec, tokens, allowed)
