"""RedisLimiter against a real redis-server: one budget across replicas, refill, outages."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from helpers import free_port
from redis_fixtures import RedisServer

from edgeproxy.policies.ratelimit import RateDecision, RateLimitSpec
from edgeproxy.policies.redis_limiter import RedisLimiter


def test_two_replicas_share_one_budget(redis_server: RedisServer) -> None:
    async def main() -> list[RateDecision]:
        # a generous timeout: this test is about atomicity, and a loaded CI machine must not
        # turn a slow reply into a fail-open admission
        a = RedisLimiter(redis_server.url, "open", timeout=5)
        b = RedisLimiter(redis_server.url, "open", timeout=5)
        await a.start()
        await b.start()
        try:
            spec = RateLimitSpec.parse("50/h")
            # different local clocks must not matter: the bucket runs on Redis's clock
            calls = [(a.hit("shared", spec, "ip:1.2.3.4", now=0.0) if i % 2 else
                      b.hit("shared", spec, "ip:1.2.3.4", now=1e9)) for i in range(200)]
            decisions = await asyncio.gather(*calls)
            assert a.healthy and b.healthy
            return decisions
        finally:
            await a.close()
            await b.close()

    decisions = asyncio.run(main())
    assert sum(d.allowed for d in decisions) == 50
    assert all(d.error is None for d in decisions)
    assert sorted(d.remaining for d in decisions if d.allowed) == list(range(50))
    denied = [d for d in decisions if not d.allowed]
    assert all(d.retry_after == pytest.approx(72.0, abs=1) for d in denied)


def test_refill(redis_server: RedisServer) -> None:
    async def main() -> None:
        limiter = RedisLimiter(redis_server.url, timeout=5)
        try:
            spec = RateLimitSpec.parse("5/s")
            first = await asyncio.gather(*(limiter.hit("refill", spec, "k") for _ in range(5)))
            assert all(d.allowed for d in first)
            denied = await limiter.hit("refill", spec, "k")
            assert not denied.allowed
            assert 0 < denied.retry_after <= 0.2 + 1e-6
            started = time.monotonic()
            deadline = started + 2.0
            while not (await limiter.hit("refill", spec, "k")).allowed:
                assert time.monotonic() < deadline, "no token after 2 s at 5/s"
                await asyncio.sleep(0.02)
            assert time.monotonic() - started <= 0.5
        finally:
            await limiter.close()

    asyncio.run(main())


def test_script_reloaded_after_flush_and_keys_expire(redis_server: RedisServer) -> None:
    with redis_server.client() as client:
        client.flushall()

    async def main() -> None:
        limiter = RedisLimiter(redis_server.url, timeout=5)
        try:
            spec = RateLimitSpec.parse("10/m")
            assert (await limiter.hit("ttl", spec, "k")).allowed
            with redis_server.client() as client:
                client.script_flush()
            d = await limiter.hit("ttl", spec, "k")
            assert d.allowed and d.remaining == 8 and limiter.healthy
            with redis_server.client() as client:
                keys = [k for k in client.scan_iter(match="edgeproxy:rl:*")]
                ttls = [client.pttl(k) for k in keys]
            # 10/m: an empty bucket is full again after 60 s, the key expires 1 s after that
            assert len(ttls) == 1 and 59_000 < ttls[0] <= 61_000, ttls
        finally:
            await limiter.close()

    asyncio.run(main())


def test_redis_down_open_closed_and_recovery(redis_server: RedisServer) -> None:
    async def main() -> None:
        spec = RateLimitSpec.parse("1/h")
        opened = RedisLimiter(redis_server.url, "open", retry_interval=0.05)
        closed = RedisLimiter(redis_server.url, "closed", retry_interval=0.05)
        try:
            assert (await opened.hit("down", spec, "k")).allowed
            assert not (await closed.hit("down", spec, "k")).allowed  # same shared bucket
            redis_server.stop()

            started = time.monotonic()
            d_open = [await opened.hit("down", spec, "k") for _ in range(5)]
            d_closed = [await closed.hit("down", spec, "k") for _ in range(5)]
            assert time.monotonic() - started < 2.0
            assert all(d.allowed and d.error for d in d_open)
            assert not any(d.allowed for d in d_closed)
            assert all(d.error and d.retry_after >= 1 for d in d_closed)
            for limiter in (opened, closed):
                assert limiter.healthy is False
                assert limiter.last_error

            redis_server.start()
            deadline = time.monotonic() + 5
            while not (opened.healthy and closed.healthy):
                assert time.monotonic() < deadline, (opened.last_error, closed.last_error)
                await opened.hit("up", spec, "k-open")
                await closed.hit("up", spec, "k-closed")
                await asyncio.sleep(0.02)
            assert opened.last_error is None and closed.last_error is None
            # a fresh Redis (no persistence): the bucket starts over, decisions are real again
            d = await closed.hit("down", spec, "k")
            assert d.allowed and d.error is None
            assert not (await opened.hit("down", spec, "k")).allowed
        finally:
            await opened.close()
            await closed.close()

    asyncio.run(main())


def test_unresponsive_redis_never_hangs() -> None:
    """A server that accepts connections and never answers: every hit ends within the timeout;
    after `max_failures` failures in a row Redis counts as down and is not asked at all."""
    with socket.socket() as sink:
        sink.bind(("127.0.0.1", 0))
        sink.listen(100)  # connections complete in the backlog; nothing is ever read or sent
        url = f"redis://127.0.0.1:{sink.getsockname()[1]}/0"

        async def main() -> None:
            limiter = RedisLimiter(url, "closed", timeout=0.2, retry_interval=30)
            try:
                spec = RateLimitSpec.parse("10/s")
                started = time.monotonic()
                first = await limiter.hit("hang", spec, "k")
                assert time.monotonic() - started < 1.0
                assert not first.allowed and first.error and "timed out" in first.error
                assert limiter.healthy is True  # one slow reply is not an outage
                started = time.monotonic()
                burst = await asyncio.gather(*(limiter.hit("hang", spec, "k") for _ in range(50)))
                assert time.monotonic() - started < 1.0
                assert not any(d.allowed for d in burst)
                assert limiter.healthy is False
                # within retry_interval: answered without touching the socket
                started = time.monotonic()
                rest = await asyncio.gather(*(limiter.hit("hang", spec, "k") for _ in range(50)))
                assert time.monotonic() - started < 0.5  # no socket I/O at all
                assert not any(d.allowed for d in rest)
            finally:
                await limiter.close()

        asyncio.run(main())


def test_start_reports_an_unreachable_redis() -> None:
    async def main() -> None:
        limiter = RedisLimiter(f"redis://127.0.0.1:{free_port()}/0", "open")
        try:
            await limiter.start()
            assert limiter.healthy is False and limiter.last_error
            d = await limiter.hit("x", RateLimitSpec.parse("1/s"), "k")
            assert d.allowed and d.error
        finally:
            await limiter.close()

    asyncio.run(main())


def test_invalid_failure_mode() -> None:
    with pytest.raises(ValueError, match="expected open or closed"):
        RedisLimiter("redis://127.0.0.1:1/0", "sometimes")  # type: ignore[arg-type]
