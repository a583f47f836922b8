"""edgeproxy.proxy.balancer.Balancer: weighted round robin, least connections, passive ejection."""

from __future__ import annotations

import string
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeproxy.proxy.balancer import Balancer
from edgeproxy.routes.model import Route, RouteSpec, Upstream


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def replicas(*weights: int) -> tuple[Upstream, ...]:
    """Replicas named a, b, c... on their own addresses, with these weights."""
    return tuple(
        Upstream("http", f"10.0.0.{i + 1}", 8080, name, f"{i + 1:064x}", weight=w)
        for i, (name, w) in enumerate(zip(string.ascii_lowercase, weights, strict=False))
    )


def route(upstreams: tuple[Upstream, ...], lb: str = "round_robin") -> Route:
    return Route("orders", "docker", RouteSpec(paths=("/orders",), lb=lb), upstreams)


def names(balancer: Balancer, r: Route, n: int, exclude: tuple[Upstream, ...] = ()) -> list[str]:
    out = []
    for _ in range(n):
        u = balancer.pick(r, exclude)
        assert u is not None
        out.append(u.name)
    return out


# --- round robin ----------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_round_robin_equal_weights_is_a_strict_rotation(n: int) -> None:
    r = route(replicas(*[1] * n))
    picks = names(Balancer(), r, n * 10)
    assert Counter(picks) == {u.name: 10 for u in r.pool}
    for start in range(0, len(picks), n):
        assert sorted(picks[start:start + n]) == sorted(u.name for u in r.pool)


def test_round_robin_weights_5_1_1_exact_order_per_cycle() -> None:
    r = route(replicas(5, 1, 1))
    picks = names(Balancer(), r, 70)
    for start in range(0, 70, 7):
        cycle = picks[start:start + 7]
        # nginx's smooth order: the heavy replica is interleaved, not sent 5 in a row
        assert cycle == ["a", "a", "b", "a", "c", "a", "a"]
        assert Counter(cycle) == {"a": 5, "b": 1, "c": 1}


@given(st.lists(st.integers(1, 20), min_size=1, max_size=6))
def test_round_robin_gives_each_replica_its_weight_per_cycle(weights: list[int]) -> None:
    r = route(replicas(*weights))
    total = sum(weights)
    picks = names(Balancer(), r, total * 3)
    for start in range(0, len(picks), total):
        assert Counter(picks[start:start + total]) == {u.name: u.weight for u in r.pool}


def test_round_robin_over_eligible_replicas_only() -> None:
    ups = replicas(1, 1, 1)
    starting = Upstream("http", "10.0.0.9", 8080, "z", "9" * 64, state="starting")
    r = route((*ups, starting))
    assert Counter(names(Balancer(), r, 30)) == {"a": 10, "b": 10, "c": 10}


def test_empty_pool_picks_nothing() -> None:
    stopped = Upstream("http", "", 80, "a", "1" * 64, state="stopped")
    assert Balancer().pick(route(())) is None
    assert Balancer().pick(route((stopped,))) is None
    assert Balancer().pick(route((stopped,), lb="least_conn")) is None


# --- passive ejection -------------------------------------------------------------------------

def test_ejected_replica_is_skipped_until_it_expires() -> None:
    clock = Clock()
    b = Balancer(clock=clock)
    r = route(replicas(1, 1, 1))
    bb = r.pool[1]
    assert b.failed(bb) == 5.0
    assert b.is_ejected(bb)
    assert "b" not in names(b, r, 30)
    clock.advance(4.9)
    assert "b" not in names(b, r, 30)
    clock.advance(0.1)  # the deadline itself ends the ejection
    assert not b.is_ejected(bb)
    assert Counter(names(b, r, 30)) == {"a": 10, "b": 10, "c": 10}


def test_ejected_replica_share_is_spread_over_the_others() -> None:
    # KNOWN BUG: the unrolled sequence hands an ejected replica's turn to the next one in the
    # sequence, so one neighbour takes double load (c gets 2/3, a 1/3) instead of an even split.
    b = Balancer(clock=Clock())
    r = route(replicas(1, 1, 1))
    b.failed(r.pool[1])
    assert Counter(names(b, r, 300)) == {"a": 150, "c": 150}


def test_ejected_heavy_replica_share_follows_the_other_weights() -> None:
    # KNOWN BUG (same cause): weights 5,1,1 with 'a' ejected give b:c = 5:2, not 1:1.
    b = Balancer(clock=Clock())
    r = route(replicas(5, 1, 1))
    b.failed(r.pool[0])
    assert Counter(names(b, r, 70)) == {"b": 35, "c": 35}


def test_ejection_doubles_up_to_the_cap() -> None:
    clock = Clock()
    b = Balancer(eject_base=5.0, eject_max=60.0, clock=clock)
    [u] = replicas(1)
    assert [b.failed(u) for _ in range(7)] == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0, 60.0]
    assert b.ejected_for(u) == 60.0
    assert b.ejections_total == 7


def test_ejection_with_other_base_and_cap() -> None:
    b = Balancer(eject_base=0.5, eject_max=3.0, clock=Clock())
    [u] = replicas(1)
    assert [b.failed(u) for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_ejection_stays_capped_after_very_many_failures() -> None:
    # KNOWN BUG: eject_base * 2.0 ** (n - 1) overflows at the 1025th consecutive failure and
    # failed() raises OverflowError in the request handler. A dead pool under load gets there:
    # the fallback replica keeps being tried and keeps failing.
    b = Balancer(clock=Clock())
    [u] = replicas(1)
    seconds = [b.failed(u) for _ in range(1100)]
    assert seconds[-1] == 60.0


def test_half_open_after_expiry_and_failures_keep_doubling() -> None:
    clock = Clock()
    b = Balancer(clock=clock)
    r = route(replicas(1, 1))
    a = r.pool[0]
    assert b.failed(a) == 5.0
    clock.advance(5.0)
    # half-open: a gets traffic again, and its failure count is remembered...
    assert "a" in names(b, r, 2)
    assert b.failed(a) == 10.0  # ...so failing again ejects it for longer
    assert b.is_ejected(a)
    clock.advance(10.0)
    b.succeeded(a)  # the first success clears the record
    assert not b.is_ejected(a)
    assert b.failed(a) == 5.0


def test_success_clears_an_ejection_early() -> None:
    b = Balancer(clock=Clock())
    [u] = replicas(1)
    b.failed(u)
    b.succeeded(u)
    assert not b.is_ejected(u)
    assert b.ejected_for(u) is None
    assert b.failed(u) == 5.0


def test_success_of_another_replica_does_not_clear_an_ejection() -> None:
    b = Balancer(clock=Clock())
    x, y = replicas(1, 1)
    b.failed(x)
    b.succeeded(y)
    assert b.is_ejected(x)
    assert b.failed(x) == 10.0


def test_ejected_for() -> None:
    clock = Clock()
    b = Balancer(clock=clock)
    [u] = replicas(1)
    assert b.ejected_for(u) is None
    b.failed(u)
    assert b.ejected_for(u) == 5.0
    clock.advance(1.26)
    assert b.ejected_for(u) == 3.7  # rounded to tenths for the admin API
    clock.advance(3.74)
    assert b.ejected_for(u) is None


def test_ejection_is_per_replica_key() -> None:
    # The balancer outlives table swaps: a replica is the same replica in the next snapshot...
    b = Balancer(clock=Clock())
    r1 = route(replicas(1, 1))
    b.failed(r1.pool[0])
    r2 = route(replicas(1, 1))
    assert "a" not in names(b, r2, 10)
    # ...but a new container on the same address is not (it starts clean).
    reborn = Upstream("http", "10.0.0.1", 8080, "a", "f" * 64)
    assert reborn.address == r1.pool[0].address
    assert not b.is_ejected(reborn)


def test_all_ejected_falls_back_to_the_least_recently_ejected() -> None:
    clock = Clock()
    b = Balancer(clock=clock)
    r = route(replicas(1, 1, 1))
    a, bb, c = r.pool
    b.failed(bb)
    clock.advance(1)
    b.failed(a)
    clock.advance(1)
    b.failed(c)
    # every replica is out: try the one closest to coming back rather than answer 503
    assert names(b, r, 9) == ["b"] * 9
    # it stays ejected: the fallback is a try, not a reinstatement
    assert b.is_ejected(bb)


def test_all_ejected_with_weights_falls_back_too() -> None:
    clock = Clock()
    b = Balancer(clock=clock)
    r = route(replicas(5, 1, 1))
    for u in (r.pool[2], r.pool[0], r.pool[1]):
        b.failed(u)
        clock.advance(1)
    assert set(names(b, r, 14)) == {"c"}


# --- exclude (retries) ----------------------------------------------------------------------------

def test_exclude_skips_replicas_already_tried() -> None:
    b = Balancer(clock=Clock())
    r = route(replicas(1, 1, 1))
    a, bb, c = r.pool
    assert set(names(b, r, 12, exclude=(a,))) == {"b", "c"}
    assert set(names(b, r, 6, exclude=(a, c))) == {"b"}
    assert b.pick(r, exclude=(a, bb, c)) is None


def test_exclude_with_weights() -> None:
    b = Balancer(clock=Clock())
    r = route(replicas(5, 1, 1))
    assert set(names(b, r, 14, exclude=(r.pool[0],))) == {"b", "c"}


def test_exclude_prefers_a_live_replica_over_an_ejected_one() -> None:
    b = Balancer(clock=Clock())
    r = route(replicas(1, 1, 1))
    a, bb = r.pool[:2]
    b.failed(bb)
    assert set(names(b, r, 6, exclude=(a,))) == {"c"}


def test_exclude_falls_back_to_an_ejected_replica_not_tried_yet() -> None:
    b = Balancer(clock=Clock())
    r = route(replicas(1, 1, 1))
    a, bb, c = r.pool
    b.failed(bb)
    assert names(b, r, 3, exclude=(a, c)) == ["b"] * 3


@pytest.mark.parametrize("lb", ["round_robin", "least_conn"])
def test_exclude_everything_gives_none(lb: str) -> None:
    r = route(replicas(1, 2), lb=lb)
    assert Balancer().pick(r, exclude=r.pool) is None


@given(
    weights=st.lists(st.integers(1, 5), min_size=1, max_size=5),
    ejected=st.sets(st.integers(0, 4)),
    excluded=st.sets(st.integers(0, 4)),
    lb=st.sampled_from(["round_robin", "least_conn"]),
)
def test_pick_never_returns_an_excluded_or_needlessly_ejected_replica(
    weights: list[int], ejected: set[int], excluded: set[int], lb: str
) -> None:
    b = Balancer(clock=Clock())
    r = route(replicas(*weights), lb=lb)
    for i in ejected & set(range(len(weights))):
        b.failed(r.pool[i])
    exclude = tuple(r.pool[i] for i in excluded if i < len(weights))
    candidates = [u for u in r.pool if u not in exclude]
    live = [u for u in candidates if not b.is_ejected(u)]
    for _ in range(10):
        u = b.pick(r, exclude)
        if not candidates:
            assert u is None
        elif live:
            assert u in live
        else:
            assert u in candidates


# --- least connections ----------------------------------------------------------------------------

def test_least_conn_picks_the_idle_replica() -> None:
    b = Balancer()
    r = route(replicas(1, 1, 1), lb="least_conn")
    a, bb, c = r.pool
    b.acquire(a)
    b.acquire(c)
    b.acquire(c)
    assert names(b, r, 5) == ["b"] * 5
    b.acquire(bb)
    assert set(names(b, r, 6)) == {"a", "b"}  # 1 in flight beats 2; ties take turns
    b.release(c)
    b.release(c)
    assert names(b, r, 5) == ["c"] * 5


def test_least_conn_respects_weight() -> None:
    b = Balancer()
    r = route(replicas(3, 1), lb="least_conn")
    heavy, light = r.pool
    b.acquire(heavy)
    b.acquire(heavy)
    b.acquire(light)
    assert names(b, r, 3) == ["a"] * 3  # 2/3 per unit of weight beats 1/1
    b.acquire(heavy)
    b.acquire(heavy)
    assert names(b, r, 3) == ["b"] * 3  # 4/3 loses to 1/1


def test_least_conn_as_requests_pile_up_follows_the_weights() -> None:
    b = Balancer()
    r = route(replicas(3, 1), lb="least_conn")
    for _ in range(8):
        u = b.pick(r)
        assert u is not None
        b.acquire(u)
    assert b.inflight == {r.pool[0].key: 6, r.pool[1].key: 2}


def test_least_conn_spreads_ties() -> None:
    r = route(replicas(1, 1, 1), lb="least_conn")
    assert Counter(names(Balancer(), r, 30)) == {"a": 10, "b": 10, "c": 10}


def test_least_conn_skips_ejected_and_excluded() -> None:
    b = Balancer(clock=Clock())
    r = route(replicas(1, 1, 1), lb="least_conn")
    a, bb, c = r.pool
    b.acquire(c)
    b.acquire(c)
    b.failed(a)
    assert names(b, r, 4) == ["b"] * 4  # idle a is ejected
    assert names(b, r, 4, exclude=(bb,)) == ["c"] * 4


def test_least_conn_all_ejected_falls_back_to_the_least_recently_ejected() -> None:
    # KNOWN BUG: least_conn falls back to the first ejected replica in its rotation, so the
    # fallback alternates between replicas instead of the one whose ejection ends first, as the
    # Balancer docstring and round robin do.
    clock = Clock()
    b = Balancer(clock=clock)
    r = route(replicas(1, 1), lb="least_conn")
    b.failed(r.pool[1])
    clock.advance(1)
    b.failed(r.pool[0])
    assert names(b, r, 4) == ["b"] * 4


# --- bookkeeping ---------------------------------------------------------------------------------

def test_acquire_and_release_count_in_flight_requests() -> None:
    b = Balancer()
    x, y = replicas(1, 1)
    b.acquire(x)
    b.acquire(x)
    b.acquire(y)
    assert b.inflight == {x.key: 2, y.key: 1}
    b.release(x)
    b.release(y)
    assert b.inflight == {x.key: 1}  # no zero entries left behind
    b.release(x)
    b.release(x)  # an extra release does not go negative
    assert b.inflight == {}


def test_forget_drops_replicas_that_left_every_route() -> None:
    b = Balancer(clock=Clock())
    x, y, z = replicas(1, 1, 1)
    for u in (x, y, y):
        b.failed(u)
    b.acquire(z)
    b.forget({x.key, z.key})
    assert b.is_ejected(x)
    assert not b.is_ejected(y)
    assert (set(b.failures), set(b.ejected)) == ({x.key}, {x.key})
    assert b.inflight == {z.key: 1}  # in-flight requests still release their count
    assert b.failed(y) == 5.0  # a forgotten replica that comes back starts clean
    assert b.failed(x) == 10.0


def test_forget_everything() -> None:
    b = Balancer(clock=Clock())
    [u] = replicas(1)
    b.failed(u)
    b.forget(set())
    assert (b.failures, b.ejected) == ({}, {})


def test_upstream_key() -> None:
    u = Upstream("http", "10.0.0.1", 8080, "orders-1", "abc")
    assert u.key == "abc@10.0.0.1:8080"
    # file routes have no container: the URL names the replica
    assert Upstream("http", "fd00::1", 80, "http://[fd00::1]").key == "http://[fd00::1]@fd00::1:80"
