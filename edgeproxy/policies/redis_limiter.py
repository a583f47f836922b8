"""Rate-limit buckets in Redis, shared by every proxy replica (imported only when
EDGEPROXY_RATELIMIT_BACKEND=redis, so the pure core and `edgeproxy check` never load redis)."""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import time
from typing import Literal

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from edgeproxy.core.logs import get_logger
from edgeproxy.policies.ratelimit import (
    EPSILON,
    RateDecision,
    RateLimitSpec,
    _bucket_id,
    _decide,
)

# One round trip: refill, take, store and expire atomically, on Redis's clock (TIME), so replicas
# with skewed clocks agree. Floats travel as strings: Redis truncates Lua numbers to integers.
_LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local eps = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local s = redis.call('HMGET', KEYS[1], 'ts', 'tokens')
local ts = tonumber(s[1])
local tokens = tonumber(s[2])
if ts == nil or tokens == nil then
  ts = now
  tokens = burst
elseif now > ts then
  tokens = math.min(burst, tokens + (now - ts) * rate)
  ts = now
else
  tokens = math.min(burst, tokens)
end
local allowed = 0
if tokens >= 1 - eps then
  tokens = math.max(0, tokens - 1)
  allowed = 1
end
local left = string.format('%.17g', tokens)
redis.call('HSET', KEYS[1], 'ts', string.format('%.6f', ts), 'tokens', left)
redis.call('PEXPIRE', KEYS[1], ttl)
return {allowed, left}
"""
_LUA_SHA = hashlib.sha1(_LUA.encode(), usedforsecurity=False).hexdigest()


class RedisLimiter:
    """Token buckets in Redis, shared by every proxy replica: the limit applies per route.

    `failure` decides what happens while Redis is unreachable or failing: 'open' (default)
    admits requests, because an outage of the limiter's store should not become an outage of
    every limited route (a rate limit protects against excess; it is not access control), while
    'closed' denies them with a decision carrying `error` (answer 503) for routes where an
    unmetered request costs more than a refused one.

    Every call is bounded by `timeout` (pool wait, connect and reply together). A call that
    fails gets the failure decision on its own; Redis counts as down (`healthy` False, logged
    once) on a refused or broken connection at once, or after `max_failures` failed calls in a
    row (timeouts, errors), and is then not asked again for `retry_interval` seconds, so
    requests don't each wait out a timeout. The first good reply makes it healthy again.
    `max_connections` bounds the pool: a burst of requests queues for a few warm connections
    instead of opening hundreds at once.
    """

    def __init__(self, url: str, failure: Literal["open", "closed"] = "open",
                 timeout: float = 0.25, *, retry_interval: float = 1.0, max_failures: int = 3,
                 max_connections: int = 16, prefix: str = "edgeproxy:rl:") -> None:
        if failure not in ("open", "closed"):
            raise ValueError(f"failure={failure!r}: expected open or closed")
        self.url = url
        self.failure = failure
        self.timeout = timeout
        self.retry_interval = retry_interval
        self.max_failures = max_failures
        self.prefix = prefix
        self.healthy = True
        self.last_error: str | None = None
        self._failures_in_row = 0
        self._retry_at = 0.0
        self._log = get_logger("ratelimit")
        # No client-side retries: a retry loop with backoff is exactly the hang we must avoid.
        # The pool waits without its own limit; asyncio.timeout in hit() bounds the whole call.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=None, socket_timeout=timeout,
            socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0), health_check_interval=0)
        self._redis: aioredis.Redis = aioredis.Redis.from_pool(pool)

    async def start(self) -> None:
        """Check Redis once and load the script, so the start-up log shows the backend state."""
        try:
            async with asyncio.timeout(self.timeout * 4):
                await self._redis.script_load(_LUA)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc, down=True)
        else:
            self._log.info("ratelimit_backend_ready", backend="redis", url=_safe_url(self.url),
                           failure=self.failure)

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()

    async def hit(self, route: str, spec: RateLimitSpec, key: str,
                  now: float | None = None) -> RateDecision:
        """Take one token in Redis; `now` is ignored (Redis's clock is the one all replicas
        share). Never raises for a Redis problem and never waits longer than `timeout`."""
        if not self.healthy and time.monotonic() < self._retry_at:
            return self._fallback(spec)
        bid = self.prefix + _bucket_id(route, spec, key).hex()
        # The key lives until its bucket would be full again: past that it equals a new one.
        ttl_ms = math.ceil(spec.burst / spec.rate * 1000) + 1000
        args = (repr(spec.rate), spec.burst, ttl_ms, repr(EPSILON))
        try:
            async with asyncio.timeout(self.timeout):
                try:
                    result = await self._redis.evalsha(_LUA_SHA, 1, bid, *args)
                except NoScriptError:
                    # Flushed or restarted Redis: EVAL runs and caches it in the same trip.
                    result = await self._redis.eval(_LUA, 1, bid, *args)
            allowed, left = int(result[0]), float(result[1])
        except (TimeoutError, RedisTimeoutError) as exc:  # before OSError: TimeoutError is one
            self._failed(exc, down=False)
            return self._fallback(spec)
        except (RedisConnectionError, OSError) as exc:
            self._failed(exc, down=True)
            return self._fallback(spec)
        except (RedisError, ValueError, IndexError, TypeError) as exc:
            self._failed(exc, down=False)
            return self._fallback(spec)
        self._failures_in_row = 0
        self.last_error = None
        if not self.healthy:
            self.healthy = True
            self._log.info("ratelimit_backend_recovered", backend="redis",
                           url=_safe_url(self.url))
        return _decide(spec, left, bool(allowed))

    def _failed(self, exc: BaseException, *, down: bool) -> None:
        if isinstance(exc, TimeoutError) and not str(exc):
            error = f"timed out after {self.timeout}s"
        else:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        self.last_error = error[:300]
        if not down:
            # Slow replies and odd errors are counted: one of them under load is not an outage.
            self._failures_in_row += 1
            down = self._failures_in_row >= self.max_failures
        if not down:
            return
        self._retry_at = time.monotonic() + self.retry_interval
        if self.healthy:
            self.healthy = False
            self._log.warning("ratelimit_backend_down", backend="redis", url=_safe_url(self.url),
                              error=self.last_error, failure=self.failure,
                              retry_in_s=self.retry_interval)

    def _fallback(self, spec: RateLimitSpec) -> RateDecision:
        error = "rate limit backend unavailable: " + (self.last_error or "unknown error")
        if self.failure == "open":
            return RateDecision(True, spec.limit, spec.limit, 0.0, 0.0, error)
        return RateDecision(False, spec.limit, 0, self.retry_interval,
                            max(1.0, self.retry_interval), error)


def _safe_url(url: str) -> str:
    """The Redis URL without its password, for logs."""
    safe: str = re.sub(r"//([^:@/]*):[^@/]*@", r"//\1:***@", url)
    return safe
