"""Choosing a replica: weighted round robin or least connections, skipping passively ejected ones."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable

from edgeproxy.routes.model import Route, Upstream, weighted_sequence


class Balancer:
    """Process-wide replica bookkeeping that outlives table swaps: in-flight counts, ejections.

    A connection failure or timeout ejects a replica for `eject_base` seconds, doubling with each
    consecutive failure up to `eject_max`; the first success clears it. When every replica of a
    route is ejected, the one whose ejection ends first is tried anyway (a dead pool gets 502s
    fast, a recovered one is found without waiting).
    """

    def __init__(self, eject_base: float = 5.0, eject_max: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.eject_base = eject_base
        self.eject_max = eject_max
        self._clock = clock
        self.inflight: dict[str, int] = {}
        self.ejected: dict[str, float] = {}  # upstream key -> monotonic deadline
        self.failures: dict[str, int] = {}
        self.ejections_total = 0

    def is_ejected(self, u: Upstream) -> bool:
        """True while a replica sits out its ejection."""
        if not self.ejected:
            return False
        until = self.ejected.get(u.key)
        if until is None:
            return False
        if until > self._clock():
            return True
        del self.ejected[u.key]  # half-open: the next request probes it
        return False

    def pick(self, route: Route, exclude: Collection[Upstream] = ()) -> Upstream | None:
        """A replica for the next request, or None when the route has none left to try."""
        pool = route.pool
        if not pool:
            return None
        if route.spec.lb == "least_conn":
            return self._least_conn(route, exclude)
        seq = route.sequence
        start = next(route.counter)
        first = pool[seq[start % len(seq)]]
        if not exclude and not self.ejected:
            return first  # the common case: nothing to skip
        available = [u for u in pool if u not in exclude and not self.is_ejected(u)]
        if len(available) == len(pool):
            return first
        if available:
            # Spread the missing replicas' share over the others by their weights, instead of
            # handing it all to the next one in the sequence.
            order = weighted_sequence([u.weight for u in available])
            return available[order[start % len(order)]]
        return self._soonest_back(u for u in pool if u not in exclude)

    def _least_conn(self, route: Route, exclude: Collection[Upstream]) -> Upstream | None:
        best: Upstream | None = None
        best_load = 0.0
        fallback: Upstream | None = None
        pool = route.pool
        n = len(pool)
        start = next(route.counter)  # rotate so ties spread instead of piling on the first
        for i in range(n):
            u = pool[(start + i) % n]
            if u in exclude:
                continue
            if self.is_ejected(u):
                fallback = self._soonest_back((u,) if fallback is None else (fallback, u))
                continue
            load = self.inflight.get(u.key, 0) / u.weight
            if best is None or load < best_load:
                best, best_load = u, load
        return best or fallback

    def _soonest_back(self, candidates: Iterable[Upstream]) -> Upstream | None:
        """Among ejected replicas, the one whose ejection ends first."""
        best: Upstream | None = None
        for u in candidates:
            if best is None or self.ejected.get(u.key, 0) < self.ejected.get(best.key, 0):
                best = u
        return best

    def acquire(self, u: Upstream) -> None:
        """A request to `u` starts."""
        self.inflight[u.key] = self.inflight.get(u.key, 0) + 1

    def release(self, u: Upstream) -> None:
        """A request to `u` ended."""
        left = self.inflight.get(u.key, 1) - 1
        if left > 0:
            self.inflight[u.key] = left
        else:
            self.inflight.pop(u.key, None)

    def failed(self, u: Upstream) -> float:
        """Connection failure or timeout on `u`: eject it; returns the ejection in seconds."""
        n = self.failures.get(u.key, 0) + 1
        self.failures[u.key] = n
        seconds = float(min(self.eject_base * 2.0 ** min(n - 1, 30), self.eject_max))
        self.ejected[u.key] = self._clock() + seconds
        self.ejections_total += 1
        return seconds

    def succeeded(self, u: Upstream) -> None:
        """`u` answered: forget its failures."""
        if self.failures:
            self.failures.pop(u.key, None)
            self.ejected.pop(u.key, None)

    def ejected_for(self, u: Upstream) -> float | None:
        """Seconds left in `u`'s ejection, for the admin API."""
        until = self.ejected.get(u.key)
        if until is None:
            return None
        left = until - self._clock()
        return round(left, 1) if left > 0 else None

    def forget(self, keys: Collection[str]) -> None:
        """Drop bookkeeping of replicas that left every route (bounded memory)."""
        for k in list(self.failures):
            if k not in keys:
                del self.failures[k]
        for k in list(self.ejected):
            if k not in keys:
                del self.ejected[k]
