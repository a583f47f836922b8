"""edgeproxy.routes.model: Upstream identity, Route pools and the smooth weighted round-robin order."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeproxy.routes.model import Route, RouteSpec, Upstream, weighted_sequence

WEIGHTS = st.lists(st.integers(1, 40), min_size=1, max_size=6)


@pytest.mark.parametrize(
    ("weights", "sequence"),
    [
        ([], ()),
        ([1], (0,)),
        ([7], (0,)),
        ([1, 1, 1], (0, 1, 2)),
        ([3, 3], (0, 1)),  # equal weights: a plain rotation, whatever the weight
        ([2, 1], (0, 1, 0)),
        ([1, 2], (1, 0, 1)),
        ([3, 2], (0, 1, 0, 1, 0)),
        ([5, 1, 1], (0, 0, 1, 0, 2, 0, 0)),  # nginx's example: a a b a c a a
        ([1, 1, 5], (2, 2, 0, 2, 1, 2, 2)),
    ],
)
def test_weighted_sequence_examples(weights: list[int], sequence: tuple[int, ...]) -> None:
    assert weighted_sequence(weights) == sequence


@given(WEIGHTS)
def test_each_index_appears_in_proportion_to_its_weight(weights: list[int]) -> None:
    seq = weighted_sequence(weights)
    counts = Counter(seq)
    total = sum(weights)
    assert set(seq) == set(range(len(weights)))
    for i, w in enumerate(weights):
        assert counts[i] * total == w * len(seq)
    if len(set(weights)) > 1:
        # unequal weights: one cycle is sum(weights) long and holds each index exactly w times
        assert len(seq) == total
        assert counts == dict(enumerate(weights))


@given(WEIGHTS)
def test_no_replica_ever_gets_ahead_of_its_fair_share(weights: list[int]) -> None:
    # Smoothness, the property nginx's algorithm guarantees: after any k picks (across cycle
    # boundaries too, the sequence repeats) replica i has had fewer than k*w_i/W + 1 picks, i.e.
    # at most ceil(k*w_i/W). Why: the running "current" weight of i is k*w_i - W*picks_i; before
    # each pick the currents sum to W, so the winner has at least W/n and keeps more than -W after
    # W is subtracted; the others only grow. Symmetrically (currents sum to 0 after each pick),
    # no replica falls more than n-1 picks behind. A light replica is never handed a burst.
    seq = weighted_sequence(weights)
    n, total = len(weights), sum(weights)
    picks = [0] * n
    for k, chosen in enumerate(seq * 2, start=1):
        picks[chosen] += 1
        for i, w in enumerate(weights):
            share = k * w  # fair share times W, in integers
            assert picks[i] * total < share + total, (k, i, picks)
            assert picks[i] * total >= share - (n - 1) * total, (k, i, picks)


@given(st.integers(2, 8), st.integers(1, 40))
def test_one_heavy_replica_is_interleaved_with_light_ones(n: int, heavy: int) -> None:
    # Weights (heavy, 1, 1, ...): when the heavy replica outweighs the light ones together, two
    # light replicas are never picked back to back, not even across the end of a cycle. (With
    # heavy == n - 1 an interleaving exists, but nginx's order is 0 1 2 0 for 2,1,1.)
    seq = weighted_sequence([heavy] + [1] * (n - 1))
    if heavy > n - 1:
        for x, y in itertools.pairwise(seq + seq[:1]):
            assert x == 0 or y == 0, seq


# --- Upstream and Route -------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("state", "eligible"),
    [("healthy", True), ("running", True), ("starting", False), ("unhealthy", False),
     ("draining", False), ("stopped", False)],
)
def test_upstream_eligible(state: str, eligible: bool) -> None:
    assert Upstream("http", "10.0.0.1", 80, "a", state=state).eligible is eligible  # type: ignore[arg-type]


def test_upstream_defaults_and_address() -> None:
    u = Upstream("http", "10.0.0.1", 8080, "a")
    assert (u.weight, u.state, u.reason, u.container_id) == (1, "running", "", None)
    assert u.address == "10.0.0.1:8080"
    assert Upstream("http", "fd00::2", 8080, "a").address == "[fd00::2]:8080"


def test_route_pool_and_sequence_cover_eligible_replicas_only() -> None:
    ups = (
        Upstream("http", "10.0.0.1", 80, "a", weight=3),
        Upstream("http", "10.0.0.2", 80, "b", state="starting", weight=50),
        Upstream("http", "10.0.0.3", 80, "c", weight=1),
    )
    r = Route("orders", "docker", RouteSpec(), ups)
    assert [u.name for u in r.pool] == ["a", "c"]
    assert r.sequence == weighted_sequence([3, 1])
    assert Counter(r.pool[i].name for i in r.sequence) == {"a": 3, "c": 1}


def test_route_without_eligible_replicas() -> None:
    r = Route("orders", "held", RouteSpec(), ())
    assert (r.pool, r.sequence) == ((), ())


def test_routes_compare_without_their_counter() -> None:
    ups = (Upstream("http", "10.0.0.1", 80, "a"),)
    r1 = Route("orders", "docker", RouteSpec(), ups)
    r2 = Route("orders", "docker", RouteSpec(), ups)
    next(r1.counter)
    assert r1 == r2
    assert r1 != Route("orders", "docker", RouteSpec(), (Upstream("http", "10.0.0.1", 80, "a", weight=2),))
