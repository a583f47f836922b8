"""The proxy explains itself: /containers reasons on real Docker, /metrics, explain and check."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import engine
import pytest
import requests
from docker_fixtures import run_container, unique
from helpers import ProxyProcess, run_proxy, wait_for
from prometheus_client.parser import text_string_to_metric_families


@pytest.fixture(scope="module")
def proxy(docker_engine: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    with run_proxy(tmp_path_factory.mktemp("explain"), network="bridge") as p:
        wait_for(lambda: p.admin("/healthz")["docker"] == "connected", 15, what="docker")
        yield p


def decision(p: ProxyProcess, name: str) -> dict | None:
    for c in p.admin("/containers")["containers"]:
        if c["container"] == name:
            return c  # type: ignore[no-any-return]
    return None


def test_containers_explains_every_kind_of_not_routed(proxy: ProxyProcess) -> None:
    net = unique("net")
    engine.docker("network", "create", "--label", "edgeproxy-test=1", net)
    try:
        names = {k: unique(k) for k in ("plain", "off", "bad", "nonet", "sick", "older",
                                        "newer", "ok")}
        path = "/" + unique("p")
        run_container(names["plain"], {})
        run_container(names["off"], {"gateway.path": "/off", "gateway.enable": "false"})
        run_container(names["bad"], {"gateway.path": "/bad", "gateway.port": "http"})
        run_container(names["nonet"], {"gateway.path": "/nonet", "gateway.network": "backend"})
        run_container(names["sick"], {"gateway.path": "/" + unique("s")},
                      "--health-cmd", "false", "--health-interval", "1s",
                      "--health-retries", "1")
        run_container(names["older"], {"gateway.path": path})
        wait_for(lambda: decision(proxy, names["older"]), 10, what="older routed")
        run_container(names["newer"], {"gateway.path": path, "gateway.strip_prefix": "true"})
        run_container(names["ok"], {"gateway.path": "/" + unique("ok")})

        def reasons() -> dict[str, str] | None:
            got = {k: decision(proxy, n) for k, n in names.items()}
            if any(v is None for v in got.values()):
                return None
            if "unhealthy" not in got["sick"]["reason"]:  # type: ignore[index]
                return None
            return {k: v["reason"] for k, v in got.items()}  # type: ignore[index]

        r = wait_for(reasons, 20, what="a decision for every container")
        assert r["plain"] == "no gateway.* labels"
        assert r["off"] == "gateway.enable=false"
        assert r["bad"].startswith("invalid labels: gateway.port='http'")
        assert r["nonet"].startswith("no reachable network: not attached to network 'backend'")
        assert r["sick"].startswith("routed, but gets no traffic: unhealthy")
        assert r["newer"] == f"lost a conflict with container {names['older']}"
        assert r["ok"] == "routed"
        assert decision(proxy, names["ok"])["routed"] is True  # type: ignore[index]
    finally:
        subprocess.run(["docker", "rm", "-f", names["nonet"]], capture_output=True, check=False)
        subprocess.run(["docker", "network", "rm", net], capture_output=True, check=False)


def test_metrics_parse_and_move(proxy: ProxyProcess) -> None:
    path = "/" + unique("m")
    run_container(unique("c"), {"gateway.path": path, "gateway.strip_prefix": "true"})
    wait_for(lambda: requests.get(proxy.url(path + "/"), timeout=5).status_code == 200, 10,
             what="route")

    def count() -> float:
        text = requests.get(proxy.admin_base + "/metrics", timeout=5).text
        total = 0.0
        for fam in text_string_to_metric_families(text):
            if fam.name == "edgeproxy_requests":
                total += sum(s.value for s in fam.samples if s.name.endswith("_total")
                             and s.labels.get("status_class") == "2xx"
                             and s.labels["route"] != "")
        return total

    before = count()
    for _ in range(5):
        assert requests.get(proxy.url(path + "/"), timeout=5).status_code == 200
    assert count() == before + 5
    text = requests.get(proxy.admin_base + "/metrics", timeout=5).text
    names = {fam.name for fam in text_string_to_metric_families(text)}
    for wanted in ("edgeproxy_request_duration_seconds", "edgeproxy_in_flight_requests",
                   "edgeproxy_routes", "edgeproxy_route_healthy_replicas",
                   "edgeproxy_table_swaps", "edgeproxy_docker_event_lag_seconds",
                   "edgeproxy_docker_reconnects", "edgeproxy_upstream_errors",
                   "edgeproxy_retries", "edgeproxy_ejections", "edgeproxy_ratelimit_rejections",
                   "edgeproxy_auth_failures"):
        assert wanted in names, wanted


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeproxy", *args], capture_output=True,
                          text=True, timeout=30, env=env)


def test_explain_cli_names_route_prefix_and_replica(proxy: ProxyProcess) -> None:
    path = "/" + unique("x")
    name = unique("c")
    run_container(name, {"gateway.path": path, "gateway.strip_prefix": "true"})
    wait_for(lambda: requests.get(proxy.url(path + "/"), timeout=5).status_code == 200, 10,
             what="route")
    out = run_cli("explain", f"http://any.test{path}/a/b?q=1", "--admin",
                  f"127.0.0.1:{proxy.admin_port}")
    assert out.returncode == 0, out.stderr
    assert f"matched prefix {path} -> forwards /a/b?q=1" in out.stdout
    assert f"* {name}" in out.stdout
    out = run_cli("explain", "http://any.test/nowhere-" + unique(), "--admin",
                  f"127.0.0.1:{proxy.admin_port}")
    assert "decision: no route matches this host and path" in out.stdout
    out = run_cli("explain", "http://any.test/a/%2e%2e/%2e%2e/etc", "--admin",
                  f"127.0.0.1:{proxy.admin_port}")
    assert "decision: refused: the path climbs above the root with '..'" in out.stdout


def test_check_cli_exit_codes_and_messages(tmp_path: Path) -> None:
    good = tmp_path / "good.yml"
    good.write_text("services:\n  api:\n    image: x\n    labels:\n"
                    "      gateway.path: /api\n      gateway.port: 8080\n")
    out = run_cli("check", str(good))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines()[-1] == "ok: 1 service(s) routed, 0 not routed"
    bad = tmp_path / "bad.yml"
    bad.write_text("services:\n  api:\n    image: x\n    labels:\n"
                   "      - gateway.pth=/api\n      - gateway.port=eighty\n")
    out = run_cli("check", str(bad))
    assert out.returncode == 1
    assert (f"{bad}: service api: label gateway.port='eighty': a port number between 1 and "
            "65535") in out.stdout
    assert "did you mean 'path'" in out.stdout or "rename it to gateway.path" in out.stdout
    out = run_cli("check", str(tmp_path / "missing.yml"))
    assert out.returncode == 2
