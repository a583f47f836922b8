"""edgeproxy.control.health: which replicas an active check watches, and how one probe is judged."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import web

from edgeproxy.control.health import HealthMonitor, ProbeEndpoint, judge, probe_plan, probe_targets
from edgeproxy.routes.model import Container, HealthSpec, RouteSpec, Upstream
from edgeproxy.routes.table import FileRoute, build_table

SPEC = HealthSpec("/healthz")


# --- judge ------------------------------------------------------------------------------------

@pytest.mark.parametrize("status", [200, 201, 204, 301, 302, 399])
def test_judge_passes_statuses_in_range(status: int) -> None:
    assert judge(status, None, SPEC) is None


@pytest.mark.parametrize("status", [100, 199, 400, 404, 500, 503])
def test_judge_fails_statuses_out_of_range(status: int) -> None:
    assert judge(status, None, SPEC) == f"GET /healthz answered {status}, expected 200-399"


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (204, None),
        (200, "GET /ready?deep=1 answered 200, expected 204-204"),
        (205, "GET /ready?deep=1 answered 205, expected 204-204"),
    ],
)
def test_judge_uses_the_spec_range_and_path(status: int, reason: str | None) -> None:
    spec = HealthSpec("/ready?deep=1", status_min=204, status_max=204)
    assert judge(status, None, spec) == reason


@pytest.mark.parametrize("status", [None, 200, 500])
def test_judge_reports_a_transport_error_as_is(status: int | None) -> None:
    error = "GET /healthz timed out after 2s"
    assert judge(status, error, SPEC) == error


# --- probe_targets ------------------------------------------------------------------------------

HEALTH = {"gateway.path": "/orders", "gateway.health.path": "/healthz",
          "gateway.health.interval": "10s", "com.docker.compose.service": "orders"}


def container(name: str, ip: str, labels: dict[str, str] = HEALTH, **kwargs: object) -> Container:
    fields: dict[str, object] = {"state": "running", "health": None, "created": 1.0}
    fields.update(kwargs)
    return Container(id=name * 8, name=name, labels=labels, networks=(("app", ip),),
                     exposed_ports=(8080,), **fields)  # type: ignore[arg-type]


def test_probe_targets_of_a_route_with_a_health_check() -> None:
    table = build_table([container("a", "10.0.0.1"), container("b", "10.0.0.2", health="healthy")])
    spec = HealthSpec("/healthz", interval=10.0)
    assert probe_targets(table) == {
        ("aaaaaaaa@10.0.0.1:8080", "10.0.0.1", 8080, spec),
        ("bbbbbbbb@10.0.0.2:8080", "10.0.0.2", 8080, spec),
    }


def test_routes_without_a_health_check_are_not_probed() -> None:
    plain = {"gateway.path": "/plain"}
    table = build_table([container("a", "10.0.0.1", plain), container("b", "10.0.0.2")])
    assert [t[0] for t in probe_targets(table)] == ["bbbbbbbb@10.0.0.2:8080"]


def test_failing_replicas_stay_probed_so_they_can_return() -> None:
    a = container("a", "10.0.0.1")
    table = build_table([a], failing={"aaaaaaaa@10.0.0.1:8080": "GET /healthz answered 500"})
    assert table.routes[0].upstreams[0].state == "unhealthy"
    assert [t[0] for t in probe_targets(table)] == ["aaaaaaaa@10.0.0.1:8080"]


@pytest.mark.parametrize(
    ("kwargs", "probed"),
    [
        ({}, True),
        ({"health": "healthy"}, True),
        ({"health": "unhealthy"}, True),
        ({"health": "starting"}, False),  # Docker's own check has not passed yet
        ({"stopping": True}, False),
        ({"state": "exited"}, False),
        ({"state": "paused"}, False),
    ],
)
def test_probe_targets_by_replica_state(kwargs: dict[str, object], probed: bool) -> None:
    table = build_table([container("a", "10.0.0.1", **kwargs)])
    assert bool(probe_targets(table)) is probed


def test_held_routes_have_nothing_to_probe() -> None:
    spec = RouteSpec(paths=("/orders",), health=SPEC)
    assert probe_targets(build_table([], held=[("orders", spec)])) == set()


def test_file_route_replicas_are_probed() -> None:
    spec = RouteSpec(paths=("/legacy",), health=SPEC)
    ups = (Upstream("http", "10.0.0.5", 8080, "http://10.0.0.5:8080"),
           Upstream("http", "fd00::5", 80, "http://[fd00::5]"))
    table = build_table([], [FileRoute("legacy", spec, ups)])
    assert probe_targets(table) == {
        ("http://10.0.0.5:8080@10.0.0.5:8080", "10.0.0.5", 8080, SPEC),
        ("http://[fd00::5]@fd00::5:80", "fd00::5", 80, SPEC),
    }


def test_a_new_spec_is_a_new_target() -> None:
    # Changing the check restarts its probe with fresh counters (the spec is part of the target).
    before = probe_targets(build_table([container("a", "10.0.0.1")]))
    after = probe_targets(build_table([container("a", "10.0.0.1",
                                                 {**HEALTH, "gateway.health.fails": "5"})]))
    assert [t[0] for t in before] == [t[0] for t in after]
    assert before != after


def test_empty_table_has_no_targets() -> None:
    assert probe_targets(build_table([])) == set()


# --- a failing check takes a routes-file replica out -------------------------------------------

def test_a_failing_check_takes_a_routes_file_replica_out() -> None:
    spec = RouteSpec(paths=("/legacy",), health=SPEC)
    ups = (Upstream("http", "10.0.0.5", 8080, "http://10.0.0.5:8080"),
           Upstream("http", "10.0.0.6", 8080, "http://10.0.0.6:8080"))
    table = build_table([], [FileRoute("legacy", spec, ups)],
                        failing={ups[0].key: "GET /healthz answered 500, expected 200-399"})
    [route] = table.routes
    bad, good = route.upstreams
    assert (bad.state, bad.reason) == (
        "unhealthy", "active health check: GET /healthz answered 500, expected 200-399")
    assert route.pool == (good,)
    # still probed, so it can come back
    assert bad.key in {t[0] for t in probe_targets(table)}


def test_a_failing_key_is_ignored_on_a_route_without_a_check() -> None:
    ups = (Upstream("http", "10.0.0.5", 8080, "http://10.0.0.5:8080"),)
    table = build_table([], [FileRoute("plain", RouteSpec(paths=("/p",)), ups)],
                        failing={ups[0].key: "stale"})
    assert table.routes[0].upstreams[0].state == "running"


# --- probes use the forwarding endpoint settings -----------------------------------------------

def test_an_https_replica_is_probed_with_the_routes_tls_settings() -> None:
    spec = RouteSpec(paths=("/s",), health=SPEC, scheme="https", tls_verify=True,
                     tls_ca="/etc/ca.pem", tls_server_name="orders.internal")
    ups = (Upstream("https", "10.0.0.5", 8443, "https://10.0.0.5:8443"),)
    [(_, endpoint)] = probe_plan(build_table([], [FileRoute("s", spec, ups)]))
    assert endpoint == ProbeEndpoint("https", True, "/etc/ca.pem", "orders.internal")
    plain = build_table([container("a", "10.0.0.1")])
    assert {e for _, e in probe_plan(plain)} == {ProbeEndpoint()}


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


class _TlsBackend:
    """An HTTPS server answering 200 on any path and counting hits."""

    def __init__(self, ca: trustme.CA, name: str) -> None:
        self.hits = 0
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(name).configure_cert(self.ctx)

    async def __aenter__(self) -> int:
        async def handle(_: web.Request) -> web.Response:
            self.hits += 1
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_get("/{tail:.*}", handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.ctx)
        await site.start()
        return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    async def __aexit__(self, *_: object) -> None:
        await self.runner.cleanup()


def test_probe_once_speaks_tls_with_the_routes_ca_and_server_name(
        ca: trustme.CA, tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))

    async def main() -> tuple[str | None, str | None, str | None, int]:
        backend = _TlsBackend(ca, "orders.internal")
        async with backend as port, aiohttp.ClientSession() as session:
            monitor = HealthMonitor(session, lambda *_: None)
            good = await monitor._probe_once(
                "127.0.0.1", port, SPEC,
                ProbeEndpoint("https", True, str(ca_file), "orders.internal"))
            # the wrong name fails verification, as forwarding would
            wrong = await monitor._probe_once(
                "127.0.0.1", port, SPEC, ProbeEndpoint("https", True, str(ca_file), "other"))
            unverified = await monitor._probe_once(
                "127.0.0.1", port, SPEC, ProbeEndpoint("https", False))
            return good, wrong, unverified, backend.hits

    good, wrong, unverified, hits = asyncio.run(main())
    assert good is None and unverified is None
    assert wrong is not None and wrong.startswith("GET /healthz failed")
    assert hits == 2
