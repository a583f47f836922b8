"""Swarm conversion (services + tasks -> observations -> table) on JSON captured from a real
one-node swarm (tests/swarm_engine.py, Docker 20.10), and the provider's API budget.

The capture (tests/unit/swarm_json/): services made with `docker service create` (cap_*) and a
`docker stack deploy` stack named `cap` (cap_api, cap_both on cap_backend/cap_front); taken
right after `service update --force cap_web` (stop-first) and `service scale cap_api=1`, so
it holds tasks running, starting (a HEALTHCHECK that never passes), ready, draining (desired
shutdown / remove), failed and shut down.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeproxy.control.providers.swarm import (
    SOURCE,
    SwarmModeError,
    SwarmProvider,
    choose_networks,
    mode_error,
    observe,
    probe,
    services_from_json,
    swarm_role,
)
from edgeproxy.control.watcher import SwarmAwareWatcher
from edgeproxy.core.settings import Settings
from edgeproxy.routes.model import Container
from edgeproxy.routes.table import RouteTable, build_table

JSON = Path(__file__).parent / "swarm_json"


def load(name: str) -> Any:
    return json.loads((JSON / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    return services_from_json(load("services"), load("networks"))


def by_service(items: list[Container]) -> dict[str, list[Container]]:
    out: dict[str, list[Container]] = {}
    for c in items:
        out.setdefault(c.service, []).append(c)
    return out


def reasons(table: RouteTable) -> dict[str, str]:
    return {d.container.split(".")[0].removesuffix(" (vip)"): d.reason for d in table.decisions}


# --- services ---------------------------------------------------------------------------------

def test_services_carry_their_deploy_labels_stack_and_endpoint(services: dict[str, Any]) -> None:
    named = {s.name: s for s in services.values()}
    assert named["cap_api"].labels["gateway.network"] == "backend"
    assert named["cap_api"].namespace == "cap"  # a stack: its networks are cap_<name>
    assert named["cap_web"].namespace is None
    vip = named["cap_vip"]
    assert vip.endpoint == "vip" and "gateway.swarm.endpoint" not in vip.labels
    assert vip.vips == (("capnet", "10.234.1.11"),)
    assert named["cap_dnsrr"].dnsrr and named["cap_dnsrr"].vips == ()
    assert named["cap_ingress"].vips == ()  # its only VIP is on the ingress: never used


def test_a_bad_endpoint_label_is_a_problem_that_names_it() -> None:
    item = {"ID": "s1", "Spec": {"Name": "web", "Labels": {"gateway.swarm.endpoint": "dns"}}}
    s = services_from_json([item], [])["s1"]
    assert s.problem is not None and "gateway.swarm.endpoint='dns'" in s.problem
    assert "vip or tasks" in s.problem


# --- tasks -> observations: table-driven over the captured states ------------------------------

# service -> [(state, health, stopping, networks)] for every task it keeps, from tasks_all.json
EXPECTED_ALL: dict[str, list[tuple[str, str | None, bool, tuple[tuple[str, str], ...]]]] = {
    # scaled 2 -> 1: slot 2's desired state is 'remove' while it still runs: draining
    "cap_api": [("running", None, False, (("backend", "10.234.3.3"),)),
                ("running", None, True, (("backend", "10.234.3.4"),))],
    # update --force, stop-first: the old task drains; the new one waits 'ready' (desired
    # 'ready' too) and is no replica yet
    "cap_web": [("running", None, True, (("capnet", "10.234.1.3"),))],
    # a HEALTHCHECK that has not passed: Swarm says 'starting'; the failed ones are gone
    "cap_slowhealth": [("running", "starting", False, (("capnet", "10.234.1.28"),))],
    "cap_two": [("running", None, False, (("capnet", "10.234.1.8"), ("capother", "10.234.2.3")))],
    "cap_global": [("running", None, False, (("capnet", "10.234.1.14"),))],
    "cap_ingress": [("running", None, False, ())],
    # vip mode: one observation, the virtual IP (the shut-down task of the update is ignored)
    "cap_vip": [("running", None, False, (("capnet", "10.234.1.11"),))],
}


@pytest.mark.parametrize("service", sorted(EXPECTED_ALL))
def test_observations_from_every_task_state(services: dict[str, Any], service: str) -> None:
    got = by_service(observe(services, load("tasks_all")))[service]
    assert [(c.state, c.health, c.stopping, c.networks) for c in got] == EXPECTED_ALL[service]


def test_task_observations_are_keyed_by_task_id_and_named_like_docker(
        services: dict[str, Any]) -> None:
    tasks = {t["ID"]: t for t in load("tasks_running")}
    for c in observe(services, tasks.values()):
        if c.name.endswith("(vip)"):
            continue
        assert c.id in tasks and c.name.endswith("." + c.id)
        assert c.labels["com.docker.swarm.task.id"] == c.id
        assert c.exposed_ports == ()  # Swarm does no port detection
    glob = by_service(observe(services, tasks.values()))["cap_global"][0]
    assert glob.name.startswith("cap_global.3sdfjwlcspcq17kzm55p8und3.")  # global: by node


# --- observations -> table: the "why not routed" reasons ------------------------------------------

WHY = {
    "cap_noport": "gateway.port is missing: Swarm does no port detection",
    "cap_two": "attached to several networks (capnet, capother); set the network label",
    "cap_both": "attached to several networks (cap_backend, cap_front)",
    "cap_ingress": "attached only to the ingress network",
    "cap_slowhealth": "routed, but gets no traffic: starting (health check has not passed yet)",
    "cap_api": "routed",
    "cap_vip": "routed",
}


@pytest.mark.parametrize("service", sorted(WHY))
def test_why_each_service_is_or_is_not_routed(services: dict[str, Any], service: str) -> None:
    table = build_table(observe(services, load("tasks_running")))
    assert WHY[service] in reasons(table)[service]


def test_routes_point_at_task_addresses_and_the_vip(services: dict[str, Any]) -> None:
    table = build_table(observe(services, load("tasks_running")))
    routes = {r.name: [u.address for u in r.upstreams] for r in table.routes}
    assert routes["cap_api"] == ["10.234.3.3:80"]  # gateway.network=backend -> cap_backend
    assert routes["cap_vip"] == ["10.234.1.11:80"]
    assert "cap_noport" not in routes and "cap_ingress" not in routes


def test_the_proxy_network_setting_matches_with_the_stack_prefix(
        services: dict[str, Any]) -> None:
    table = build_table(observe(services, load("tasks_running"), network="backend"),
                        network="backend")
    both = next(r for r in table.routes if r.name == "cap_both")
    assert [u.address for u in both.upstreams] == ["10.234.3.6:80"]  # on cap_backend


@pytest.mark.parametrize(("attached", "wanted", "default", "namespace", "expected"), [
    ([("a", "1"), ("b", "2")], None, None, None, (("a", "1"), ("b", "2"))),
    ([("a", "1"), ("b", "2")], "b", None, None, (("b", "2"),)),
    ([("st_a", "1"), ("st_b", "2")], "b", None, "st", (("b", "2"),)),
    ([("st_a", "1"), ("st_b", "2")], None, "a", "st", (("a", "1"),)),
    # a label naming a missing network never falls back to the setting: the table says why
    ([("a", "1"), ("b", "2")], "c", "a", None, (("a", "1"), ("b", "2"))),
    ([("a", "1")], None, "zz", None, (("a", "1"),)),
])
def test_choose_networks(attached: list[tuple[str, str]], wanted: str | None,
                         default: str | None, namespace: str | None,
                         expected: tuple[tuple[str, str], ...]) -> None:
    assert choose_networks(attached, wanted, default, namespace) == expected


def test_vip_mode_on_a_dnsrr_service_says_why() -> None:
    svc = {"ID": "s1", "Spec": {"Name": "web", "EndpointSpec": {"Mode": "dnsrr"},
                                "Labels": {"gateway.path": "/", "gateway.port": "80",
                                           "gateway.swarm.endpoint": "vip"}}}
    task = {"ID": "t1", "ServiceID": "s1", "DesiredState": "running",
            "Status": {"State": "running"}}
    table = build_table(observe(services_from_json([svc], []), [task]))
    assert "endpoint_mode dnsrr" in table.decisions[0].reason


def test_vip_mode_without_running_tasks_gives_no_observation() -> None:
    svc = {"ID": "s1", "Spec": {"Name": "web", "Labels": {"gateway.swarm.endpoint": "vip"}},
           "Endpoint": {"VirtualIPs": [{"NetworkID": "n1", "Addr": "10.0.0.2/24"}]}}
    task = {"ID": "t1", "ServiceID": "s1", "DesiredState": "running",
            "Status": {"State": "preparing"}}
    assert observe(services_from_json([svc], [{"Id": "n1", "Name": "net"}]), [task]) == []


# --- swarm role and EDGEPROXY_SWARM=true ------------------------------------------------------------

@pytest.mark.parametrize(("info", "role"), [
    (load("info_manager"), "manager"),
    ({"Swarm": {"LocalNodeState": "active", "ControlAvailable": False}}, "worker"),
    ({"Swarm": {"LocalNodeState": "inactive", "ControlAvailable": False}}, "off"),
    ({}, "off"),
])
def test_swarm_role(info: dict[str, Any], role: str) -> None:
    assert swarm_role(info) == role


class FakeApi:
    """The docker SDK's APIClient methods the provider calls, counting each."""

    def __init__(self, info: dict[str, Any] | None = None) -> None:
        self.info_doc = info or load("info_manager")
        self.services_doc: list[Any] = load("services")
        self.tasks_doc: list[Any] = load("tasks_running")
        self.calls: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def info(self) -> dict[str, Any]:
        self._count("info")
        return self.info_doc

    def services(self) -> list[Any]:
        self._count("services")
        return self.services_doc

    def networks(self, filters: dict[str, Any]) -> list[Any]:
        self._count("networks")
        assert filters == {"scope": "swarm"}
        return load("networks")

    def tasks(self, filters: dict[str, Any]) -> list[Any]:
        self._count("tasks")
        assert filters == {"desired-state": "running"}  # the daemon drops the history
        return self.tasks_doc

    def close(self) -> None:
        pass


def test_probe_refuses_a_worker_with_a_message_that_says_what_to_do() -> None:
    worker = FakeApi({"Swarm": {"LocalNodeState": "active", "ControlAvailable": False}})
    with pytest.raises(SwarmModeError) as exc:
        probe(Settings(swarm="true"), lambda: worker)
    text = str(exc.value)
    assert "EDGEPROXY_SWARM=true" in text and "worker" in text
    assert "node.role == manager" in text and "socket proxy" in text
    assert probe(Settings(swarm="auto"), lambda: worker) == "worker"  # auto: just off
    assert "not in an active Swarm" in str(mode_error("off"))


class Recorder:
    """A SwarmSink that keeps what it was told."""

    def __init__(self) -> None:
        self.snapshots: list[list[Container]] = []
        self.stops: list[str] = []
        self.states: list[bool] = []

    def resync(self, items: Any, source: str = "docker") -> None:
        assert source == SOURCE
        self.snapshots.append(list(items))

    def stopping(self, item_id: str) -> None:
        self.stops.append(item_id)

    def connected(self, up: bool, source: str = "docker") -> None:
        assert source == SOURCE
        self.states.append(up)


def run_now(fn: Callable[[], None]) -> None:
    fn()


def test_a_poll_costs_one_tasks_list_and_services_only_when_they_may_have_changed() -> None:
    api, sink = FakeApi(), Recorder()
    p = SwarmProvider(sink, run_now, Settings())
    for _ in range(5):
        p.poll_once(api)
    assert api.calls == {"services": 1, "networks": 1, "tasks": 5}
    assert len(sink.snapshots) == 1  # an unchanged snapshot is not posted again
    p._handle({"Type": "service", "Action": "update", "Actor": {"ID": "x"}})
    p.poll_once(api)
    assert api.calls["services"] == 2 and api.calls["tasks"] == 6


def test_a_task_of_an_unknown_service_refetches_the_services() -> None:
    api, sink = FakeApi(), Recorder()
    p = SwarmProvider(sink, run_now, Settings())
    api.services_doc = []  # as if the create event was missed
    p.poll_once(api)
    api.services_doc = load("services")
    p.poll_once(api)
    assert api.calls["services"] == 3  # stale at start, then once per poll that saw strangers
    assert {c.service for c in sink.snapshots[-1]} >= {"cap_api", "cap_vip"}


def test_a_kill_of_a_task_container_drains_the_task_at_once() -> None:
    sink = Recorder()
    p = SwarmProvider(sink, run_now, Settings())
    attrs = {"com.docker.swarm.task.id": "t1", "signal": "15"}
    p._handle({"Type": "container", "Action": "kill", "Actor": {"ID": "c1", "Attributes": attrs}})
    p._handle({"Type": "container", "Action": "kill",
               "Actor": {"ID": "c1", "Attributes": {**attrs, "signal": "1"}}})  # a reload
    p._handle({"Type": "container", "Action": "exec_start: wget",
               "Actor": {"ID": "c1", "Attributes": attrs}})
    assert sink.stops == ["t1"]


# --- today's watcher: two sources, a task never routed twice -----------------------------------------

@pytest.fixture
def watcher() -> Iterator[SwarmAwareWatcher]:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        yield SwarmAwareWatcher(Settings(hold_period=0))
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def container(cid: str, labels: dict[str, str]) -> Container:
    return Container(cid, cid, labels, "running", None, (("net", "10.1.0.2"),), (80,), 1.0)


def test_a_docker_resync_keeps_swarm_observations_and_drops_task_containers(
        watcher: SwarmAwareWatcher, services: dict[str, Any]) -> None:
    plain = container("plain", {"gateway.path": "/plain"})
    task_container = container("c-of-task", {"gateway.path": "/api",
                                             "com.docker.swarm.task.id": "x"})
    watcher.resync([plain, task_container])
    assert {r.name for r in watcher.build().routes} == {"plain", "c-of-task"}
    watcher.resync(observe(services, load("tasks_running")), SOURCE)
    watcher.resync([plain, task_container])  # the Docker provider reconnects
    names = {r.name for r in watcher.build().routes}
    assert "c-of-task" not in names  # the task is routed as a task, never twice
    assert {"plain", "cap_api", "cap_vip"} <= names
    watcher.resync([], SOURCE)  # every service gone: the Docker side stays
    assert {r.name for r in watcher.build().routes} == {"plain"}


def test_a_kill_of_a_task_container_drains_its_task(watcher: SwarmAwareWatcher,
                                                    services: dict[str, Any]) -> None:
    tasks = load("tasks_running")
    api = next(t for t in tasks if t["ID"].startswith("g2x93052"))
    watcher.task_of = {api["Status"]["ContainerStatus"]["ContainerID"]: api["ID"]}
    watcher.resync(observe(services, tasks), SOURCE)
    route = next(r for r in watcher.build().routes if r.name == "cap_api")
    assert [u.state for u in route.upstreams] == ["running"]
    watcher.stopping(api["Status"]["ContainerStatus"]["ContainerID"])  # Docker's kill event
    route = next(r for r in watcher.build().routes if r.name == "cap_api")
    assert [u.state for u in route.upstreams] == ["draining"] and route.pool == ()


def test_auto_on_a_daemon_outside_a_swarm_stops_after_one_info_call() -> None:
    plain = FakeApi({"Swarm": {"LocalNodeState": "inactive", "ControlAvailable": False}})
    sink = Recorder()
    p = SwarmProvider(sink, run_now, Settings(swarm="auto"), client_factory=lambda: plain)
    p.start()
    p._threads[0].join(timeout=5)
    assert not p._threads[0].is_alive() and not p._following  # no event stream either
    assert plain.calls == {"info": 1} and sink.snapshots == []


def test_on_a_manager_the_provider_polls_and_follows_events() -> None:
    manager = FakeApi()
    streams: list[int] = []

    def events(decode: bool, filters: dict[str, Any]) -> Iterator[dict[str, Any]]:
        assert filters == {"type": ["service", "container"]}
        streams.append(1)
        yield from ()

    manager.events = events  # type: ignore[attr-defined]
    sink = Recorder()
    p = SwarmProvider(sink, run_now, Settings(swarm="true", swarm_poll=0.05),
                      client_factory=lambda: manager)
    p.start()
    try:
        wait = __import__("helpers").wait_for
        wait(lambda: streams and manager.calls.get("tasks", 0) >= 3, timeout=5,
             what="polls and an event stream")
    finally:
        p.stop()
    assert len(sink.snapshots) == 1 and sink.states == [True]
