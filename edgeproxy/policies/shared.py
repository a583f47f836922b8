"""Token buckets in shared memory: one budget per route for every worker process on a host.

With EDGEPROXY_WORKERS > 1 and the memory backend, per-process buckets would multiply every
limit by the number of workers. The supervisor maps one fixed-size table before it forks; each
worker updates it under one process-shared lock. Memory is fixed (24 bytes per slot), so a key
flood evicts old buckets instead of growing anything.
"""

from __future__ import annotations

import mmap
import multiprocessing
import struct
from typing import Any

from edgeproxy.policies.ratelimit import (
    InMemoryLimiter,
    RateDecision,
    RateLimitSpec,
    _bucket_id,
    _decide,
    refill_and_take,
)

_SLOT = struct.Struct("=Qdd")  # bucket id (first 8 bytes of its hash), tokens, last update
_PROBES = 8
_LOCK_WAIT = 0.2


class SharedTable:
    """The mapping and its lock; create before forking, use in every child."""

    def __init__(self, slots: int) -> None:
        self.slots = max(64, slots)
        self.map = mmap.mmap(-1, self.slots * _SLOT.size)  # anonymous + shared across fork
        self.lock: Any = multiprocessing.get_context("fork").Lock()


_table: SharedTable | None = None


def prepare(slots: int) -> None:
    """Called by the supervisor before it forks the workers."""
    global _table
    _table = SharedTable(slots)


def shared_table() -> SharedTable | None:
    """The table the supervisor prepared, if any."""
    return _table


class SharedLimiter(InMemoryLimiter):
    """Same semantics as LocalLimiter (token bucket, burst = size), shared by the workers;
    CLOCK_MONOTONIC is host-wide, so every worker's `now` agrees."""

    def __init__(self, table: SharedTable) -> None:
        self._t = table

    def take(self, route: str, spec: RateLimitSpec, key: str, now: float) -> RateDecision:
        """The synchronous core of `hit`."""
        bid = int.from_bytes(_bucket_id(route, spec, key)[:8], "little") or 1
        t = self._t
        buf = t.map
        size = _SLOT.size
        start = bid % t.slots
        # A worker killed while holding the lock must not hang the others: after a short
        # wait, admit the request without a decision (like Redis failing open).
        if not t.lock.acquire(timeout=_LOCK_WAIT):
            return RateDecision(True, spec.limit, 0, 0.0, 0.0,
                                error="shared rate-limit table busy")
        try:
            victim = -1
            victim_ts = float("inf")
            found = -1
            for i in range(_PROBES):
                slot = (start + i) % t.slots
                sid, tokens, ts = _SLOT.unpack_from(buf, slot * size)
                if sid == bid:
                    found = slot
                    break
                if sid == 0:
                    victim, victim_ts = slot, -1.0
                    break
                if ts < victim_ts:  # evict the least recently used bucket of the probe run
                    victim, victim_ts = slot, ts
            if found >= 0:
                slot = found
            else:
                tokens, ts, slot = float(spec.burst), now, victim
            tokens, ts, allowed = refill_and_take(spec, tokens, ts, now)
            _SLOT.pack_into(buf, slot * size, bid, tokens, ts)
        finally:
            t.lock.release()
        return _decide(spec, tokens, allowed)
