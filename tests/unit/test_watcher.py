"""edgeproxy.control.watcher.Watcher.build: holding the routes of vanished containers, active health."""

from __future__ import annotations

import pytest

import edgeproxy.control.watcher as watcher_module
from edgeproxy.control.watcher import Watcher
from edgeproxy.core.settings import Settings
from edgeproxy.routes.model import Container, Route, RouteSpec, Upstream
from edgeproxy.routes.table import FileRoute, RouteTable

ORDERS = {"gateway.path": "/orders", "com.docker.compose.service": "orders"}


class FakeTime:
    """Stands in for the `time` module inside edgeproxy.control.watcher."""

    def __init__(self) -> None:
        self.now = 5000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1_700_000_000.0 + self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(watcher_module, "time", fake)
    return fake


def container(cid: str, labels: dict[str, str] = ORDERS, ip: str = "10.0.0.2",
              state: str = "running", created: float = 1.0) -> Container:
    return Container(id=cid * 16, name=f"shop-{cid}", labels=labels, state=state, health=None,
                     networks=(("app", ip),), exposed_ports=(8080,), created=created)


def watcher(hold: float = 30.0) -> Watcher:
    return Watcher(Settings(hold_period=hold, docker=False))


def route_named(table: RouteTable, name: str) -> Route:
    [r] = [r for r in table.routes if r.name == name]
    return r


def summary(table: RouteTable) -> list[tuple[str, str, list[str]]]:
    return [(r.name, r.source, [u.name for u in r.upstreams]) for r in table.routes]


# --- hold period ------------------------------------------------------------------------------

def test_vanished_route_is_held_with_an_empty_pool(clock: FakeTime) -> None:
    w = watcher()
    w.resync([container("a")])
    assert summary(w.build()) == [("orders", "docker", ["shop-a"])]
    w.resync([])
    table = w.build()
    assert summary(table) == [("orders", "held", [])]
    held = route_named(table, "orders")
    assert held.pool == ()
    assert table.match("", "/orders/1") == (held, "/orders")  # 503 while held, not 404
    assert held.spec.paths == ("/orders",)


def test_held_route_expires_after_the_hold_period(clock: FakeTime) -> None:
    w = watcher(hold=30.0)
    w.resync([container("a")])
    w.build()
    w.resync([])
    w.build()
    assert w.next_expiry() == 30.0
    clock.now += 29.9
    assert summary(w.build()) == [("orders", "held", [])]
    assert w.next_expiry() == pytest.approx(0.1)
    clock.now += 0.1
    table = w.build()
    assert table.routes == ()
    assert table.match("", "/orders") is None  # now 404
    assert w.next_expiry() is None


def test_rebuilds_during_the_hold_do_not_extend_it(clock: FakeTime) -> None:
    w = watcher(hold=10.0)
    w.resync([container("a")])
    w.build()
    w.resync([])
    for _ in range(5):
        w.build()
        clock.now += 2.0
    assert w.build().routes == ()


def test_new_container_with_the_same_labels_replaces_the_held_route(clock: FakeTime) -> None:
    w = watcher()
    w.resync([container("a")])
    w.build()
    w.resync([])
    w.build()
    clock.now += 10
    w.resync([container("b", ip="10.0.0.3")])
    assert summary(w.build()) == [("orders", "docker", ["shop-b"])]
    assert w.next_expiry() is None
    # ...and when that one goes too, the route is held again for a whole new period
    clock.now += 100
    w.resync([])
    assert summary(w.build()) == [("orders", "held", [])]
    assert w.next_expiry() == 30.0


def test_new_container_with_other_settings_takes_the_held_path(clock: FakeTime) -> None:
    w = watcher()
    w.resync([container("a")])
    w.build()
    w.resync([])
    w.build()
    w.resync([container("b", {**ORDERS, "gateway.strip_prefix": "true"})])
    table = w.build()
    assert summary(table) == [("orders", "docker", ["shop-b"])]
    assert route_named(table, "orders").spec.strip_prefix is True
    assert table.conflicts == ()  # a held route gives way without a conflict report
    clock.now += 31
    assert summary(w.build()) == [("orders", "docker", ["shop-b"])]


def test_changed_labels_hold_the_old_paths(clock: FakeTime) -> None:
    # Relabelling a service from /orders to /v2/orders: /orders answers 503 for the hold period.
    w = watcher()
    w.resync([container("a")])
    w.build()
    w.resync([container("a", {**ORDERS, "gateway.path": "/v2/orders"})])
    table = w.build()
    assert [(r.source, r.spec.paths) for r in table.routes] == [
        ("docker", ("/v2/orders",)), ("held", ("/orders",))]
    clock.now += 30
    assert [(r.source, r.spec.paths) for r in w.build().routes] == [("docker", ("/v2/orders",))]


def test_stopped_container_is_not_held_it_is_still_there(clock: FakeTime) -> None:
    w = watcher()
    w.resync([container("a")])
    w.build()
    w.resync([container("a", state="exited")])
    table = w.build()
    [r] = table.routes
    assert (r.source, [u.state for u in r.upstreams], r.pool) == ("docker", ["stopped"], ())
    assert w.next_expiry() is None


def test_remove_then_hold(clock: FakeTime) -> None:
    w = watcher()
    w.update(container("a"))
    w.build()
    w.remove("a" * 16)
    assert summary(w.build()) == [("orders", "held", [])]


def test_zero_hold_period_drops_the_route_at_once(clock: FakeTime) -> None:
    w = watcher(hold=0.0)
    w.resync([container("a")])
    w.build()
    w.resync([])
    assert w.build().routes == ()
    assert w.next_expiry() is None


def test_file_routes_are_not_held(clock: FakeTime) -> None:
    w = watcher()
    w.set_file_routes([FileRoute("legacy", RouteSpec(paths=("/legacy",)),
                                 (Upstream("http", "10.0.0.9", 80, "http://10.0.0.9"),))])
    w.build()
    w.set_file_routes([])
    assert w.build().routes == ()


def test_rebuild_now_swaps_and_counts(clock: FakeTime) -> None:
    w = watcher()
    swapped: list[RouteTable] = []
    w.on_swap.append(swapped.append)
    w.resync([container("a")])
    assert w.rebuild_now() is True
    assert w.rebuild_now() is False  # nothing changed: no swap
    w.resync([])
    assert w.rebuild_now() is True
    assert summary(w.table) == [("orders", "held", [])]
    clock.now += 30
    assert w.rebuild_now() is True
    assert w.table.routes == ()
    assert (w.swaps, len(swapped)) == (3, 3)
    assert [c["event"] for c in w.changes] == ["route_added", "route_changed", "route_removed"]


# --- active health checks ---------------------------------------------------------------------

def test_active_health_reports_reach_the_table(clock: FakeTime) -> None:
    labels = {**ORDERS, "gateway.health.path": "/healthz"}
    w = watcher()
    w.resync([container("a", labels)])
    key = route_named(w.build(), "orders").upstreams[0].key
    w.set_active_health(key, "GET /healthz answered 503, expected 200-399")
    [u] = route_named(w.build(), "orders").upstreams
    assert (u.state, u.reason) == ("unhealthy",
                                   "active health check: GET /healthz answered 503, expected 200-399")
    w.set_active_health(key, None)
    [u] = route_named(w.build(), "orders").upstreams
    assert (u.state, u.reason) == ("running", "")


# --- observations keyed by source -------------------------------------------------------------

def test_a_resync_of_one_source_keeps_the_others(clock: FakeTime) -> None:
    w = watcher(hold=0)
    other = {"gateway.path": "/pay", "com.docker.compose.service": "pay"}
    w.resync([container("a")], source="docker")
    w.resync([container("b", other, ip="10.0.0.3")], source="swarm")
    assert [r.name for r in w.build().routes] == ["orders", "pay"]
    w.resync([], source="docker")  # Docker's list is empty now: Swarm's items stay
    assert summary(w.build()) == [("pay", "docker", ["shop-b"])]
    w.remove("b" * 16, source="docker")  # not Docker's item: nothing happens
    assert [r.name for r in w.build().routes] == ["pay"]
    w.remove("b" * 16, source="swarm")
    assert w.build().routes == ()


def test_connected_is_kept_per_source() -> None:
    w = Watcher(Settings(docker=True))
    assert w.docker_connected is None
    w.connected(True)
    w.connected(False, source="swarm")
    assert w.docker_connected is True and w.sources_connected == {"docker": True, "swarm": False}
