"""edgeproxy.routes.table.build_table and RouteTable.match over Container observations built here."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from edgeproxy.proxy.balancer import Balancer
from edgeproxy.routes.labels import LabelError
from edgeproxy.routes.model import Container, HealthSpec, Route, RouteSpec, Skipped, Upstream
from edgeproxy.routes.table import Decision, FileRoute, RouteTable, build_table

_ids = itertools.count(1)


def container(
    name: str,
    labels: dict[str, str] | None = None,
    *,
    state: str = "running",
    health: str | None = None,
    networks: tuple[tuple[str, str], ...] = (("app", "172.18.0.2"),),
    ports: tuple[int, ...] = (),
    created: float = 1000.0,
    stopping: bool = False,
) -> Container:
    return Container(
        id=f"{next(_ids):064x}",
        name=name,
        labels={"gateway.path": "/orders"} if labels is None else labels,
        state=state,
        health=health,
        networks=networks,
        exposed_ports=ports,
        created=created,
        stopping=stopping,
    )


def decision(table: RouteTable, name: str) -> Decision:
    [d] = [d for d in table.decisions if d.container == name]
    return d


def only_route(table: RouteTable) -> Route:
    assert len(table.routes) == 1, table.routes
    return table.routes[0]


# --- replicas and round robin -------------------------------------------------------------

def test_replicas_with_identical_labels_form_one_route() -> None:
    labels = {"gateway.path": "/orders", "com.docker.compose.service": "orders"}
    table = build_table([
        container("shop-orders-2", labels, networks=(("app", "172.18.0.3"),), created=2),
        container("shop-orders-1", labels, networks=(("app", "172.18.0.2"),), created=1),
        container("shop-orders-3", labels, networks=(("app", "172.18.0.4"),), created=3),
    ])
    route = only_route(table)
    assert route.name == "orders"  # the compose service, not a container name
    assert route.source == "docker"
    assert route.spec == RouteSpec(paths=("/orders",))
    assert [(u.name, u.address, u.state) for u in route.upstreams] == [
        ("shop-orders-1", "172.18.0.2:80", "running"),
        ("shop-orders-2", "172.18.0.3:80", "running"),
        ("shop-orders-3", "172.18.0.4:80", "running"),
    ]
    assert route.pool == route.upstreams
    assert [(d.container, d.routed, d.reason, d.route) for d in table.decisions] == [
        ("shop-orders-1", True, "routed", "orders"),
        ("shop-orders-2", True, "routed", "orders"),
        ("shop-orders-3", True, "routed", "orders"),
    ]
    assert table.conflicts == ()


def test_route_named_after_swarm_service() -> None:
    labels = {"gateway.path": "/orders", "com.docker.swarm.service.name": "shop_orders",
              "com.docker.compose.service": "orders"}
    table = build_table([container("shop_orders.1.abc", labels)])
    assert only_route(table).name == "shop_orders"


def test_upstream_fields() -> None:
    c = container("orders-1", {"gateway.path": "/orders", "gateway.port": "8080"},
                  networks=(("app", "172.18.0.2"),))
    [upstream] = only_route(build_table([c])).upstreams
    assert upstream == Upstream("http", "172.18.0.2", 8080, "orders-1", c.id, "running", "")


def test_ipv6_upstream_address_is_bracketed() -> None:
    c = container("v6", networks=(("app6", "fd00::2"),), ports=(8080,))
    [upstream] = only_route(build_table([c])).upstreams
    assert upstream.address == "[fd00::2]:8080"


@pytest.mark.parametrize("replicas", [2, 3, 5])
def test_round_robin_spreads_evenly(replicas: int) -> None:
    containers = [container(f"orders-{i}", networks=(("app", f"10.0.0.{i}"),)) for i in range(replicas)]
    route = only_route(build_table(containers))
    balancer = Balancer()
    picks = [balancer.pick(route) for _ in range(replicas * 20)]
    counts = Counter(u.name for u in picks if u is not None)
    assert counts == {f"orders-{i}": 20 for i in range(replicas)}
    # strict rotation: every window of `replicas` picks holds each replica once
    names = [u.name for u in picks if u is not None]
    for start in range(0, len(names), replicas):
        assert len(set(names[start:start + replicas])) == replicas


def test_round_robin_skips_ineligible_replicas() -> None:
    table = build_table([
        container("a", networks=(("app", "10.0.0.1"),)),
        container("b", health="unhealthy", networks=(("app", "10.0.0.2"),)),
        container("c", networks=(("app", "10.0.0.3"),)),
    ])
    route = only_route(table)
    assert [u.name for u in route.upstreams] == ["a", "b", "c"]
    balancer = Balancer()
    picks = Counter(u.name for u in (balancer.pick(route) for _ in range(10)) if u is not None)
    assert picks == {"a": 5, "c": 5}


def test_single_replica_is_always_picked() -> None:
    route = only_route(build_table([container("a")]))
    balancer = Balancer()
    assert {balancer.pick(route) for _ in range(5)} == {route.upstreams[0]}


# --- replica state --------------------------------------------------------------------------

@pytest.mark.parametrize("state", ["exited", "created", "paused", "restarting", "dead", "removing"])
def test_stopped_container_keeps_route_with_empty_pool(state: str) -> None:
    table = build_table([container("orders-1", state=state)])
    route = only_route(table)  # 503 rather than 404: the route is still there
    [upstream] = route.upstreams
    assert upstream.state == "stopped"
    assert upstream.reason == f"container is {state}"
    assert not upstream.eligible
    assert route.pool == ()
    assert Balancer().pick(route) is None
    assert decision(table, "orders-1") == Decision(
        "orders-1", True, f"routed, but gets no traffic: stopped (container is {state})",
        route="orders-1")
    assert table.match("", "/orders") == (route, "/orders")


def test_stopped_container_needs_no_network() -> None:
    # An exited container has no address; it must not be reported as unreachable.
    table = build_table([container("orders-1", state="exited", networks=())])
    [upstream] = only_route(table).upstreams
    assert (upstream.state, upstream.host) == ("stopped", "")


@pytest.mark.parametrize(
    ("health", "state", "eligible", "reason"),
    [
        (None, "running", True, ""),
        ("healthy", "healthy", True, ""),
        ("starting", "starting", False, "health check has not passed yet"),
        ("unhealthy", "unhealthy", False, "Docker health check fails"),
    ],
)
def test_health(health: str | None, state: str, eligible: bool, reason: str) -> None:
    route = only_route(build_table([container("orders-1", health=health)]))
    [upstream] = route.upstreams
    assert (upstream.state, upstream.eligible, upstream.reason) == (state, eligible, reason)
    assert (Balancer().pick(route) is not None) is eligible


def test_stopping_container_is_draining() -> None:
    route = only_route(build_table([container("orders-1", health="healthy", stopping=True)]))
    [upstream] = route.upstreams
    assert upstream.state == "draining"
    assert upstream.reason == "stop or kill received; finishing in-flight requests"
    assert not upstream.eligible
    assert Balancer().pick(route) is None


def test_mixed_states_in_one_route() -> None:
    route = only_route(build_table([
        container("a", health="healthy", networks=(("app", "10.0.0.1"),)),
        container("b", health="starting", networks=(("app", "10.0.0.2"),)),
        container("c", state="exited"),
        container("d", stopping=True, networks=(("app", "10.0.0.4"),)),
        container("e", networks=(("app", "10.0.0.5"),)),
    ]))
    assert [(u.name, u.state) for u in route.upstreams] == [
        ("a", "healthy"), ("b", "starting"), ("c", "stopped"), ("d", "draining"), ("e", "running"),
    ]
    assert [u.name for u in route.pool] == ["a", "e"]


# --- weight and active health checks --------------------------------------------------------

def test_weight_label_sets_the_replica_weight() -> None:
    route = only_route(build_table([
        container("a", {"gateway.path": "/orders", "gateway.weight": "5"},
                  networks=(("app", "10.0.0.1"),)),
        container("b", {"gateway.path": "/orders"}, networks=(("app", "10.0.0.2"),)),
    ]))
    # weight is per replica: the two still share one route
    assert [(u.name, u.weight) for u in route.upstreams] == [("a", 5), ("b", 1)]
    assert sorted(route.sequence) == [0, 0, 0, 0, 0, 1]


HEALTH_LABELS = {"gateway.path": "/orders", "gateway.health.path": "/healthz",
                 "com.docker.compose.service": "orders"}


def _failing(c: Container, reason: str = "GET /healthz answered 500, expected 200-399") -> dict[str, str]:
    return {f"{c.id}@{c.networks[0][1]}:80": reason}


def test_failing_active_check_makes_a_replica_unhealthy() -> None:
    bad = container("bad", HEALTH_LABELS, networks=(("app", "10.0.0.1"),))
    good = container("good", HEALTH_LABELS, networks=(("app", "10.0.0.2"),))
    table = build_table([bad, good], failing=_failing(bad))
    route = only_route(table)
    assert route.spec.health == HealthSpec(path="/healthz")
    assert [(u.name, u.state, u.reason) for u in route.upstreams] == [
        ("bad", "unhealthy", "active health check: GET /healthz answered 500, expected 200-399"),
        ("good", "running", ""),
    ]
    assert [u.name for u in route.pool] == ["good"]
    # the container is still routed: only its replica is out of rotation, and the admin API says why
    assert decision(table, "bad") == Decision(
        "bad", True, "routed, but gets no traffic: unhealthy (active health check: GET /healthz "
        "answered 500, expected 200-399)", route="orders")
    assert decision(table, "good") == Decision("good", True, "routed", route="orders")


def test_failing_key_is_the_upstream_key() -> None:
    c = container("a", HEALTH_LABELS, networks=(("app", "10.0.0.1"),))
    [u] = only_route(build_table([c])).upstreams
    assert u.key == f"{c.id}@10.0.0.1:80"
    assert only_route(build_table([c], failing={u.key: "x"})).upstreams[0].state == "unhealthy"
    # the same container on another address is another replica: it starts clean
    assert only_route(build_table([c], failing={f"{c.id}@10.0.0.9:80": "x"})).pool == (u,)


def test_failing_is_ignored_without_a_health_spec() -> None:
    # A stale report for a route that dropped gateway.health.path must not keep it out.
    c = container("a", networks=(("app", "10.0.0.1"),))
    route = only_route(build_table([c], failing=_failing(c)))
    assert [(u.state, u.reason) for u in route.upstreams] == [("running", "")]


@pytest.mark.parametrize(
    ("kwargs", "state", "reason"),
    [
        ({"health": "starting"}, "starting", "health check has not passed yet"),
        ({"health": "unhealthy"}, "unhealthy", "Docker health check fails"),
        ({"stopping": True}, "draining", "stop or kill received; finishing in-flight requests"),
    ],
)
def test_failing_does_not_override_an_ineligible_state(
    kwargs: dict[str, object], state: str, reason: str
) -> None:
    c = container("a", HEALTH_LABELS, networks=(("app", "10.0.0.1"),), **kwargs)  # type: ignore[arg-type]
    [u] = only_route(build_table([c], failing=_failing(c))).upstreams
    assert (u.state, u.reason) == (state, reason)


def test_docker_healthy_replica_can_fail_the_active_check() -> None:
    c = container("a", HEALTH_LABELS, health="healthy", networks=(("app", "10.0.0.1"),))
    [u] = only_route(build_table([c], failing=_failing(c, "GET /healthz timed out after 2s"))).upstreams
    assert (u.state, u.reason, u.eligible) == (
        "unhealthy", "active health check: GET /healthz timed out after 2s", False)


# --- held routes ---------------------------------------------------------------------------

ORDERS = RouteSpec(paths=("/orders",))


def test_held_route_has_an_empty_pool_and_still_matches() -> None:
    table = build_table([], held=[("orders", ORDERS)])
    route = only_route(table)
    assert (route.name, route.source, route.spec, route.upstreams, route.pool) == (
        "orders", "held", ORDERS, (), ())
    assert table.match("", "/orders/1") == (route, "/orders")  # 503, not 404
    assert Balancer().pick(route) is None
    assert table.decisions == ()
    assert table.conflicts == ()


def test_held_route_is_replaced_by_a_live_route_with_the_same_spec() -> None:
    table = build_table([container("orders-1")], held=[("orders-1", ORDERS)])
    route = only_route(table)
    assert route.source == "docker"
    assert [u.name for u in route.upstreams] == ["orders-1"]


def test_held_route_loses_silently_to_a_live_route_on_the_same_path() -> None:
    live = container("new", {"gateway.path": "/orders", "gateway.strip_prefix": "true"}, created=1)
    table = build_table([live], held=[("old", ORDERS)])
    route = only_route(table)
    assert (route.name, route.source) == ("new", "docker")
    assert table.match("", "/orders") == (route, "/orders")
    assert table.conflicts == ()
    assert table.decisions == (Decision("new", True, "routed", route="new"),)


def test_held_route_loses_silently_to_a_file_route() -> None:
    table = build_table([], [_file_route("static", "/orders")], held=[("orders", ORDERS)])
    assert [(r.name, r.source) for r in table.routes] == [("static", "file")]
    assert table.conflicts == ()


def test_held_route_keeps_the_paths_nobody_took() -> None:
    live = container("new", {"gateway.path": "/a"}, created=1)
    table = build_table([live], held=[("old", RouteSpec(paths=("/a", "/b")))])
    assert [(r.name, r.source) for r in table.routes] == [("new", "docker"), ("old", "held")]
    assert _matched(table, "", "/a") == ("new", "/a")
    assert _matched(table, "", "/b") == ("old", "/b")
    assert table.conflicts == ()


def test_held_route_on_another_host_does_not_conflict() -> None:
    live = container("any", {"gateway.path": "/orders"}, created=1)
    held = RouteSpec(hosts=("shop.example.com",), paths=("/orders",))
    table = build_table([live], held=[("shop", held)])
    assert _matched(table, "shop.example.com", "/orders") == ("shop", "/orders")
    assert _matched(table, "other.example.com", "/orders") == ("any", "/orders")


def test_held_route_name_does_not_take_a_live_route_name() -> None:
    live = container("orders", {"gateway.path": "/live"}, created=1)
    table = build_table([live], held=[("orders", ORDERS)])
    assert [(r.name, r.source) for r in table.routes] == [("orders", "docker"), ("orders-2", "held")]


# --- port ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("labels", "ports", "port"),
    [
        ({"gateway.path": "/", "gateway.port": "9000"}, (8080,), 9000),
        ({"gateway.path": "/", "gateway.port": "9000"}, (), 9000),
        ({"gateway.path": "/", "gateway.port": "9000"}, (3000, 8080), 9000),
        ({"gateway.path": "/"}, (8080,), 8080),
        ({"gateway.path": "/"}, (), 80),
        ({"gateway.path": "/"}, (3000, 8080), 80),
    ],
)
def test_port_selection(labels: dict[str, str], ports: tuple[int, ...], port: int) -> None:
    [upstream] = only_route(build_table([container("svc", labels, ports=ports)])).upstreams
    assert upstream.port == port


def test_replicas_with_different_ports_share_a_route() -> None:
    route = only_route(build_table([
        container("a", ports=(8080,), networks=(("app", "10.0.0.1"),)),
        container("b", ports=(9090,), networks=(("app", "10.0.0.2"),)),
    ]))
    assert [u.address for u in route.upstreams] == ["10.0.0.1:8080", "10.0.0.2:9090"]


# --- network ------------------------------------------------------------------------------

TWO_NETS = (("backend", "10.1.0.2"), ("frontend", "10.2.0.2"))


@pytest.mark.parametrize(
    ("labels", "networks", "default", "host"),
    [
        ({"gateway.path": "/", "gateway.network": "frontend"}, TWO_NETS, None, "10.2.0.2"),
        ({"gateway.path": "/", "gateway.network": "frontend"}, TWO_NETS, "backend", "10.2.0.2"),
        ({"gateway.path": "/"}, TWO_NETS, "backend", "10.1.0.2"),
        ({"gateway.path": "/"}, TWO_NETS, "frontend", "10.2.0.2"),
        ({"gateway.path": "/"}, (("only", "10.3.0.2"),), None, "10.3.0.2"),
        ({"gateway.path": "/"}, (("only", "10.3.0.2"),), "elsewhere", "10.3.0.2"),
    ],
)
def test_network_selection(
    labels: dict[str, str], networks: tuple[tuple[str, str], ...], default: str | None, host: str
) -> None:
    table = build_table([container("svc", labels, networks=networks)], network=default)
    [upstream] = only_route(table).upstreams
    assert upstream.host == host


@pytest.mark.parametrize(
    ("labels", "networks", "default", "reason", "label_value"),
    [
        ({"gateway.path": "/"}, TWO_NETS, None,
         "attached to several networks (backend, frontend); set the network label or EDGEPROXY_NETWORK",
         ""),
        ({"gateway.path": "/"}, TWO_NETS, "elsewhere",
         "attached to several networks (backend, frontend); set the network label or EDGEPROXY_NETWORK",
         ""),
        ({"gateway.path": "/", "gateway.network": "db"}, TWO_NETS, None,
         "not attached to network 'db' (attached: backend, frontend)", "db"),
        ({"gateway.path": "/", "gateway.network": "db"}, TWO_NETS, "backend",
         "not attached to network 'db' (attached: backend, frontend)", "db"),
        ({"gateway.path": "/", "gateway.network": "db"}, (), None,
         "not attached to network 'db' (attached: none)", "db"),
        ({"gateway.path": "/"}, (), None, "attached to no network with an address", ""),
        ({"gateway.path": "/"}, (("host", ""),), None,
         "no IP address on network 'host' (host or none network mode?)", ""),
    ],
)
def test_unreachable_network(
    labels: dict[str, str],
    networks: tuple[tuple[str, str], ...],
    default: str | None,
    reason: str,
    label_value: str,
) -> None:
    table = build_table([container("svc", labels, networks=networks)], network=default)
    assert table.routes == ()
    assert decision(table, "svc") == Decision(
        "svc", False, "no reachable network: " + reason,
        errors=(LabelError("gateway.network", label_value, reason),),
    )


SHOP_NETS = (("shop_backend", "10.1.0.2"), ("shop_frontend", "10.2.0.2"))
PROJECT = "com.docker.compose.project"


@pytest.mark.parametrize(
    ("network", "labels", "networks", "host"),
    [
        # As written in the compose file: Compose prefixes it with the project's name.
        ("frontend", {PROJECT: "shop"}, SHOP_NETS, "10.2.0.2"),
        ("shop_frontend", {PROJECT: "shop"}, SHOP_NETS, "10.2.0.2"),
        # A network really named "frontend" (name: or external:) wins over the prefixed one.
        ("frontend", {PROJECT: "shop"}, (("frontend", "10.3.0.2"), ("shop_frontend", "10.2.0.2")),
         "10.3.0.2"),
    ],
)
def test_compose_short_network_name(
    network: str, labels: dict[str, str], networks: tuple[tuple[str, str], ...], host: str
) -> None:
    c = container("svc", {"gateway.path": "/", "gateway.network": network, **labels},
                  networks=networks)
    [upstream] = only_route(build_table([c])).upstreams
    assert upstream.host == host


@pytest.mark.parametrize("labels", [{}, {PROJECT: "other"}, {PROJECT: ""}])
def test_short_network_name_needs_the_containers_own_project(labels: dict[str, str]) -> None:
    c = container("svc", {"gateway.path": "/", "gateway.network": "frontend", **labels},
                  networks=SHOP_NETS)
    table = build_table([c])
    assert table.routes == ()
    assert decision(table, "svc").reason == (
        "no reachable network: not attached to network 'frontend' "
        "(attached: shop_backend, shop_frontend)")


def test_unreachable_replica_does_not_take_down_its_siblings() -> None:
    table = build_table([
        container("a", networks=(("app", "10.0.0.1"),)),
        container("b", networks=TWO_NETS),
    ])
    assert [u.name for u in only_route(table).upstreams] == ["a"]
    assert decision(table, "b").reason.startswith("no reachable network: attached to several networks")


# --- bad labels, not routed -------------------------------------------------------------------

def test_bad_labels_skip_one_container_only() -> None:
    table = build_table([
        container("good", {"gateway.path": "/orders"}),
        container("typo", {"gateway.path": "/users", "gateway.pth": "/x"}),
        container("badport", {"gateway.path": "/cart", "gateway.port": "http"}),
        container("plain", {"maintainer": "ops"}),
        container("off", {"gateway.enable": "false", "gateway.path": "/off"}),
    ])
    assert [r.name for r in table.routes] == ["good"]
    assert table.match("", "/users") is None
    assert table.match("", "/orders/1") is not None
    assert decision(table, "badport") == Decision(
        "badport", False, "invalid labels: gateway.port='http': a port number between 1 and 65535",
        errors=(LabelError("gateway.port", "http", "a port number between 1 and 65535"),),
    )
    typo = decision(table, "typo")
    assert not typo.routed
    assert typo.reason == "invalid labels: gateway.pth='/x': unknown key; did you mean 'path'?"
    assert [e.label for e in typo.errors] == ["gateway.pth"]
    assert decision(table, "plain") == Decision("plain", False, "no gateway.* labels")
    assert decision(table, "off") == Decision("off", False, "gateway.enable=false")
    assert decision(table, "good") == Decision("good", True, "routed", route="good")
    assert [d.container for d in table.decisions] == ["badport", "good", "off", "plain", "typo"]


def test_table_options_are_passed_to_label_parsing() -> None:
    containers = [
        container("opted-in", {"edge.path": "/a", "edge.enable": "true"}),
        container("not-opted-in", {"edge.path": "/b"}),
        container("other-prefix", {"gateway.path": "/c"}),
    ]
    table = build_table(containers, label_prefix="edge", exposed_by_default=False)
    assert [r.name for r in table.routes] == ["opted-in"]
    assert decision(table, "not-opted-in").reason == (
        "edge.enable=true is required (EDGEPROXY_EXPOSED_BY_DEFAULT=false)"
    )
    assert decision(table, "other-prefix").reason == "no edge.* labels"


def test_empty_table() -> None:
    table = build_table([])
    assert table.routes == ()
    assert table.match("example.com", "/") is None


# --- conflicts --------------------------------------------------------------------------------

def _conflicting() -> list[Container]:
    return [
        container("old", {"gateway.path": "/orders"}, networks=(("app", "10.0.0.1"),), created=100.0),
        container("new", {"gateway.path": "/orders", "gateway.strip_prefix": "true"},
                  networks=(("app", "10.0.0.2"),), created=200.0),
    ]


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_conflict_goes_to_the_oldest_container(order: tuple[int, int]) -> None:
    cs = _conflicting()
    table = build_table([cs[i] for i in order])
    route = only_route(table)
    assert route.name == "old"
    assert route.spec.strip_prefix is False
    assert [u.name for u in route.upstreams] == ["old"]
    assert table.match("", "/orders/1") == (route, "/orders")
    assert table.conflicts == (
        Skipped("new", "lost */orders to container old, which claimed it first with other settings"),
    )
    assert decision(table, "new") == Decision("new", False, "lost a conflict with container old")
    assert decision(table, "old") == Decision("old", True, "routed", route="old")


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_conflict_with_equal_created_goes_to_the_first_name(order: tuple[int, int]) -> None:
    cs = [
        container("zeta", {"gateway.path": "/x", "gateway.port": "1"}, created=5.0),
        container("alpha", {"gateway.path": "/x", "gateway.strip_prefix": "yes"}, created=5.0),
    ]
    table = build_table([cs[i] for i in order])
    assert [r.name for r in table.routes] == ["alpha"]
    assert [s.container for s in table.conflicts] == ["zeta"]


def test_conflict_on_a_host_names_host_and_path() -> None:
    table = build_table([
        container("old", {"gateway.host": "api.example.com", "gateway.path": "/v1"}, created=1),
        container("new", {"gateway.host": "api.example.com", "gateway.path": "/v1",
                           "gateway.strip_prefix": "true"}, created=2),
    ])
    assert table.conflicts == (
        Skipped("new", "lost api.example.com/v1 to container old, which claimed it first with "
                       "other settings"),
    )


def test_partial_conflict_keeps_the_paths_that_did_not_clash() -> None:
    table = build_table([
        container("old", {"gateway.path": "/a"}, created=1, networks=(("app", "10.0.0.1"),)),
        container("new", {"gateway.path": "/a,/b"}, created=2, networks=(("app", "10.0.0.2"),)),
    ])
    assert [r.name for r in table.routes] == ["new", "old"]
    assert table.match("", "/a")[0].name == "old"  # type: ignore[index]
    assert table.match("", "/b")[0].name == "new"  # type: ignore[index]
    assert [s.reason for s in table.conflicts] == [
        "lost */a to container old, which claimed it first with other settings"
    ]
    assert decision(table, "new").routed


def test_different_hosts_do_not_conflict() -> None:
    table = build_table([
        container("a", {"gateway.host": "a.example.com", "gateway.path": "/"}, created=1),
        container("b", {"gateway.host": "b.example.com", "gateway.path": "/"}, created=2),
        container("any", {"gateway.path": "/"}, created=3),
    ])
    assert [r.name for r in table.routes] == ["a", "any", "b"]
    assert table.conflicts == ()


def test_same_service_name_with_different_settings_gets_distinct_route_names() -> None:
    svc = {"com.docker.compose.service": "api"}
    table = build_table([
        container("p1", {**svc, "gateway.path": "/public"}, created=1),
        container("p2", {**svc, "gateway.path": "/private"}, created=2),
    ])
    assert [r.name for r in table.routes] == ["api", "api-2"]


# --- file routes ------------------------------------------------------------------------------

def _file_route(name: str = "static", path: str = "/orders") -> FileRoute:
    return FileRoute(name, RouteSpec(paths=(path,)),
                     (Upstream("http", "127.0.0.1", 9001, "http://127.0.0.1:9001"),))


def test_file_route_is_routed() -> None:
    table = build_table([], [_file_route()])
    route = only_route(table)
    assert (route.name, route.source, route.spec.paths) == ("static", "file", ("/orders",))
    assert Balancer().pick(route) == Upstream("http", "127.0.0.1", 9001, "http://127.0.0.1:9001")
    assert table.decisions == ()


def test_file_route_wins_over_an_older_container() -> None:
    table = build_table([container("orders-1", created=0.0)], [_file_route()])
    route = only_route(table)
    assert route.source == "file"
    assert table.match("", "/orders/1") == (route, "/orders")
    assert table.conflicts == (
        Skipped("orders-1", "lost */orders to file route static, which claimed it first with "
                            "other settings"),
    )
    assert not decision(table, "orders-1").routed


def test_losing_to_a_file_route_says_so() -> None:
    # The decision is shown in the admin API; a file route is not a container.
    table = build_table([container("orders-1", created=0.0)], [_file_route()])
    assert decision(table, "orders-1") == Decision(
        "orders-1", False, "lost a conflict with file route static"
    )


def test_file_routes_conflicting_with_each_other() -> None:
    table = build_table([], [_file_route("b", "/x"), _file_route("a", "/x")])
    assert [r.name for r in table.routes] == ["a"]
    assert table.conflicts == (
        Skipped("file route b", "lost */x to file route a, which claimed it first with other settings"),
    )


# --- matching ---------------------------------------------------------------------------------

def _routes(*specs: tuple[str, dict[str, str]]) -> RouteTable:
    return build_table([container(name, labels, created=i) for i, (name, labels) in enumerate(specs)])


def _matched(table: RouteTable, host: str, path: str) -> tuple[str, str] | None:
    found = table.match(host, path)
    return None if found is None else (found[0].name, found[1])


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/orders", ("orders", "/orders")),
        ("/orders/", ("orders", "/orders")),
        ("/orders/7", ("orders", "/orders")),
        ("/orders/7/items/", ("orders", "/orders")),
        ("/ordersx", None),
        ("/orders-archive", None),
        ("/order", None),
        ("/", None),
        ("/v1/orders", None),
    ],
)
def test_match_on_segment_boundaries(path: str, expected: tuple[str, str] | None) -> None:
    table = _routes(("orders", {"gateway.path": "/orders"}))
    assert _matched(table, "", path) == expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/", ("root", "/")),
        ("/anything", ("root", "/")),
        ("/api", ("api", "/api")),
        ("/api/users", ("api", "/api")),
        ("/api/v2", ("v2", "/api/v2")),
        ("/api/v2/users/1", ("v2", "/api/v2")),
        ("/api/v2x", ("api", "/api")),
        ("/apix", ("root", "/")),
    ],
)
def test_longest_prefix_wins(path: str, expected: tuple[str, str]) -> None:
    table = _routes(
        ("root", {"gateway.path": "/"}),
        ("api", {"gateway.path": "/api"}),
        ("v2", {"gateway.path": "/api/v2"}),
    )
    assert _matched(table, "", path) == expected


HOSTS = _routes(
    ("exact", {"gateway.host": "api.example.com", "gateway.path": "/"}),
    ("wild", {"gateway.host": "*.example.com", "gateway.path": "/"}),
    ("any", {"gateway.path": "/"}),
)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("api.example.com", "exact"),
        ("www.example.com", "wild"),
        ("a.example.com", "wild"),
        ("example.com", "any"),
        ("a.b.example.com", "any"),  # the wildcard covers one label only
        ("api.example.org", "any"),
        ("xexample.com", "any"),
        ("", "any"),
        ("localhost", "any"),
    ],
)
def test_host_precedence(host: str, expected: str) -> None:
    assert _matched(HOSTS, host, "/x") == (expected, "/")


def test_host_only_routes_do_not_match_other_hosts() -> None:
    table = _routes(("exact", {"gateway.host": "api.example.com"}),
                    ("wild", {"gateway.host": "*.example.com"}))
    assert _matched(table, "api.example.com", "/") == ("exact", "/")
    assert _matched(table, "shop.example.com", "/") == ("wild", "/")
    assert _matched(table, "example.com", "/") is None
    assert _matched(table, "", "/") is None
    assert _matched(table, "other.org", "/x") is None


def test_host_wins_over_a_longer_path_on_any_host() -> None:
    table = _routes(
        ("host-root", {"gateway.host": "api.example.com", "gateway.path": "/"}),
        ("any-deep", {"gateway.path": "/orders/7"}),
    )
    assert _matched(table, "api.example.com", "/orders/7") == ("host-root", "/")
    assert _matched(table, "www.example.com", "/orders/7") == ("any-deep", "/orders/7")


@pytest.mark.parametrize(
    ("host", "path", "expected"),
    [
        ("api.example.com", "/v1/users", ("exact-v1", "/v1")),
        ("api.example.com", "/v2/users", ("wild-v2", "/v2")),
        ("api.example.com", "/other", ("any", "/")),
        ("www.example.com", "/v1/users", ("any", "/")),
        ("www.example.com", "/v2", ("wild-v2", "/v2")),
        ("example.com", "/v2", ("any", "/")),
    ],
)
def test_host_route_falls_through_when_its_paths_do_not_match(
    host: str, path: str, expected: tuple[str, str]
) -> None:
    table = _routes(
        ("exact-v1", {"gateway.host": "api.example.com", "gateway.path": "/v1"}),
        ("wild-v2", {"gateway.host": "*.example.com", "gateway.path": "/v2"}),
        ("any", {"gateway.path": "/"}),
    )
    assert _matched(table, host, path) == expected


def test_route_with_several_hosts_and_paths() -> None:
    table = _routes(("shop", {"gateway.host": "shop.example.com,*.shop.example.org",
                              "gateway.path": "/cart,/orders"}))
    for host in ("shop.example.com", "eu.shop.example.org"):
        for path in ("/cart", "/orders/1"):
            assert _matched(table, host, path) is not None, (host, path)
    assert _matched(table, "shop.example.com", "/users") is None
    assert _matched(table, "shop.example.org", "/cart") is None


def test_tables_compare_by_routes() -> None:
    # The watcher skips a snapshot equal to the current one.
    cs = [container("a", created=1), container("b", {"gateway.path": "/b"}, created=2)]
    assert build_table(cs) == build_table(list(reversed(cs)))
    assert build_table(cs) != build_table(cs[:1])


def test_invalid_file_routes_are_decisions_and_a_held_one_is_served() -> None:
    err = LabelError("routes.static.strip_prefix", "maybe", "true or false")
    held = FileRoute("static", RouteSpec(paths=("/orders",)),
                     (Upstream("http", "10.0.0.9", 80, "http://10.0.0.9"),), errors=(err,))
    never = FileRoute.invalid("broken", (LabelError("routes.broken.path", "", "missing"),))
    table = build_table([], [held, never])
    assert [r.name for r in table.routes] == ["static"]
    assert table.match("", "/orders/1") is not None
    assert decision(table, "routes file: static") == Decision(
        "routes file: static", True,
        "invalid, serving its last good version: routes.static.strip_prefix='maybe': true or false",
        route="static", errors=(err,))
    assert decision(table, "routes file: broken").reason == (
        "invalid, not routed: routes.broken.path='': missing")
