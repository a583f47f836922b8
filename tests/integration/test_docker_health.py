"""Healthy replicas and zero-downtime changes, on the real Docker Engine."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import engine
import pytest
import requests
from docker_fixtures import run_container, unique
from helpers import ProxyProcess, run_proxy, wait_for

HTTPD = ("sh", "-c", "hostname > /www/index.html && echo ok > /www/healthz && "
                     "exec httpd -f -p 80 -h /www")


@pytest.fixture(scope="module")
def proxy(docker_engine: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    with run_proxy(tmp_path_factory.mktemp("health"), hold_period="3s", read_timeout="5s",
                   connect_timeout="1s") as p:
        wait_for(lambda: p.admin("/healthz")["docker"] == "connected", 15, what="docker")
        yield p


def route_of(p: ProxyProcess, path: str) -> dict[str, Any] | None:
    for r in p.admin("/routes")["routes"]:
        if path in r["paths"]:
            return r  # type: ignore[no-any-return]
    return None


def replica_states(p: ProxyProcess, path: str) -> dict[str, str]:
    r = route_of(p, path)
    return {u["name"]: u["state"] for u in r["replicas"]} if r else {}


def hit(p: ProxyProcess, path: str, n: int) -> Counter[str]:
    """n GETs; count who answered (5xx counted under their status)."""
    seen: Counter[str] = Counter()
    with requests.Session() as s:
        for _ in range(n):
            r = s.get(p.url(path + "/"), timeout=10)
            seen[r.text.strip() if r.status_code == 200 else str(r.status_code)] += 1
    return seen


def labels(path: str, **more: str) -> dict[str, str]:
    return {"gateway.path": path, "gateway.strip_prefix": "true", **more}


def test_rolling_changes_under_load_lose_no_request(proxy: ProxyProcess) -> None:
    path = "/" + unique("roll")
    names = [unique("r") for _ in range(3)]
    for n in names:
        run_container(n, labels(path), command=HTTPD)
    wait_for(lambda: (route_of(proxy, path) or {}).get("healthy") == 3, 10, what="3 replicas")
    statuses: list[int] = []
    done = threading.Event()

    def load() -> None:
        with requests.Session() as s:
            for _ in range(1500):
                statuses.append(s.get(proxy.url(path + "/"), timeout=10).status_code)
        done.set()

    def all_three() -> bool:
        return (route_of(proxy, path) or {}).get("healthy") == 3

    t = threading.Thread(target=load)
    t.start()
    wait_for(lambda: len(statuses) > 30, 10, what="load to start")
    # A rolling restart: each replica in turn, the others keep serving.
    engine.docker("stop", "-t", "5", names[0])
    engine.docker("start", names[0])
    wait_for(all_three, 10, what="replica 0 back")
    engine.docker("kill", "-s", "KILL", names[1])
    engine.docker("start", names[1])
    wait_for(all_three, 10, what="replica 1 back")
    engine.docker("rm", "-f", names[2])  # recreate: remove it and start a fresh one
    run_container(unique("r"), labels(path), command=HTTPD)
    wait_for(all_three, 10, what="replica 2 recreated")
    t.join(120)
    assert done.is_set() and len(statuses) == 1500
    assert Counter(statuses) == Counter({200: 1500})


def test_failing_docker_healthcheck_gets_no_traffic_until_healthy(proxy: ProxyProcess) -> None:
    path = "/" + unique("hc")
    steady, sick = unique("steady"), unique("sick")
    run_container(steady, labels(path), command=HTTPD)
    run_container(sick, labels(path), "--health-cmd", "test -f /www/ready",
                  "--health-interval", "1s", "--health-retries", "1", command=HTTPD)
    wait_for(lambda: replica_states(proxy, path).get(sick) in ("starting", "unhealthy"), 10,
             what="sick replica known")
    wait_for(lambda: replica_states(proxy, path).get(sick) == "unhealthy", 15,
             what="sick replica unhealthy")
    seen = hit(proxy, path, 20)
    assert len(seen) == 1 and sum(seen.values()) == 20, seen  # only the steady one answers
    engine.docker("exec", sick, "touch", "/www/ready")
    wait_for(lambda: replica_states(proxy, path).get(sick) == "healthy", 15,
             what="sick replica healthy")
    seen = hit(proxy, path, 20)
    assert len(seen) == 2 and set(seen.values()) == {10}, seen


def test_active_check_takes_replica_out_and_back(proxy: ProxyProcess) -> None:
    path = "/" + unique("active")
    a, b = unique("a"), unique("b")
    check = {"gateway.health.path": "/healthz", "gateway.health.interval": "200ms",
             "gateway.health.timeout": "150ms", "gateway.health.fails": "2",
             "gateway.health.passes": "2"}
    run_container(a, labels(path, **check), command=HTTPD)
    run_container(b, labels(path, **check), command=HTTPD)
    wait_for(lambda: (route_of(proxy, path) or {}).get("healthy") == 2, 10, what="2 replicas")
    engine.docker("exec", b, "rm", "/www/healthz")  # health path now answers 404
    wait_for(lambda: replica_states(proxy, path).get(b) == "unhealthy", 10,
             what="b taken out by the active check")
    reason = next(u["reason"] for u in route_of(proxy, path)["replicas"] if u["name"] == b)
    assert "active health check" in reason and "404" in reason
    assert len(hit(proxy, path, 10)) == 1
    assert proxy.events("replica_unhealthy")
    engine.docker("exec", b, "sh", "-c", "echo ok > /www/healthz")
    wait_for(lambda: replica_states(proxy, path).get(b) == "running", 10, what="b back")
    assert len(hit(proxy, path, 10)) == 2


def test_closed_port_is_ejected_and_costs_no_client_request(proxy: ProxyProcess) -> None:
    path = "/" + unique("eject")
    good, bad = unique("good"), unique("bad")
    run_container(good, labels(path), command=HTTPD)
    # httpd in the background: killing it leaves the container running with its port closed.
    run_container(bad, labels(path), command=("sh", "-c", "hostname > /www/index.html && "
                                              "httpd -p 80 -h /www && exec sleep 3600"))
    wait_for(lambda: len(hit(proxy, path, 4)) == 2, 10, what="both replicas answering")
    engine.docker("exec", bad, "killall", "httpd")
    seen = hit(proxy, path, 30)
    assert set(seen) == {seen.most_common(1)[0][0]} and sum(seen.values()) == 30, seen
    state = next(u for u in route_of(proxy, path)["replicas"] if u["name"] == bad)
    assert state["state"] == "ejected" and state["ejected_for_s"] > 0
    ejections = [e for e in proxy.events("replica_ejected") if e.get("replica") == bad]
    assert 1 <= len(ejections) <= 3


def test_all_replicas_gone_503_during_hold_then_404(proxy: ProxyProcess) -> None:
    path = "/" + unique("held")
    name = unique("c")
    run_container(name, labels(path), command=HTTPD)
    wait_for(lambda: requests.get(proxy.url(path + "/"), timeout=5).status_code == 200, 10,
             what="route")
    engine.docker("rm", "-f", name)

    def status() -> int:
        return requests.get(proxy.url(path + "/"), timeout=5).status_code

    wait_for(lambda: (route_of(proxy, path) or {}).get("source") == "held", 5,
             what="route held after its only container was removed")
    r = requests.get(proxy.url(path + "/"), timeout=5)
    assert r.status_code == 503 and r.headers["Retry-After"].isdigit()
    assert proxy.events("route_held")
    wait_for(lambda: status() == 404, 10, what="404 after the hold period")
