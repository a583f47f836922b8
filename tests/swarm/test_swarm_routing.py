"""The proxy, as a Swarm service, routes to the tasks of services it finds by their labels."""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from typing import Any

import pytest
import requests
from helpers import wait_for
from swarm_fixtures import Proxy, parse_time, running_tasks, service, sw, task_address


def hostnames(proxy: Proxy, path: str, n: int) -> Counter[str]:
    """Which task answered each of n GETs (busybox's index.html is its hostname)."""
    out: Counter[str] = Counter()
    for _ in range(n):
        r = proxy.get(path)
        assert r.status_code == 200, (r.status_code, r.text)
        out[r.text.strip()] += 1
    return out


def routable(proxy: Proxy, name: str, addresses: set[str]) -> bool:
    route = proxy.route(name)
    eligible = {r["address"] for r in route["replicas"] if r["eligible"]} if route else set()
    return eligible == addresses


def test_routes_to_each_task_of_a_service_with_deploy_labels(proxy: Proxy) -> None:
    name = service("ept-web", proxy.network, {"gateway.path": "/web", "gateway.port": "80",
                                              "gateway.strip_prefix": "true"}, 3)
    tasks = wait_for(lambda: len(running_tasks(name)) == 3 and running_tasks(name), timeout=60,
                     what="3 running tasks")
    addresses = {f"{task_address(t, proxy.network)}:80" for t in tasks.values()}
    wait_for(lambda: routable(proxy, name, addresses), timeout=10, what="3 task addresses")
    containers = {t["Status"]["ContainerStatus"]["ContainerID"][:12] for t in tasks.values()}
    seen = hostnames(proxy, "/web/", 30)
    assert set(seen) == containers and all(v == 10 for v in seen.values())


def test_scale_3_5_0_2_routable_within_2s_and_503_at_zero(proxy: Proxy) -> None:
    name = service("ept-scale", proxy.network, {"gateway.path": "/scale", "gateway.port": "80",
                                                "gateway.strip_prefix": "true"}, 3)
    lags: list[float] = []

    def scale_and_measure(n: int) -> None:
        sw("service", "scale", "--detach", f"{name}={n}")
        tasks = wait_for(lambda: len(running_tasks(name)) == n and running_tasks(name),
                         timeout=60, interval=0.02, what=f"{n} running tasks")
        addresses = {f"{task_address(t, proxy.network)}:80" for t in tasks.values()}
        wait_for(lambda: routable(proxy, name, addresses), timeout=10, interval=0.02,
                 what=f"{n} replicas in /routes")
        now = time.time()
        # From Docker's own "running" time of the newest task to an eligible replica here.
        newest = max(parse_time(t["Status"]["Timestamp"]) for t in tasks.values())
        lags.append(now - newest)
        assert now - newest < 2.0, f"scale to {n}: routable {now - newest:.2f}s after running"

    wait_for(lambda: len(running_tasks(name)) == 3, timeout=60, what="3 running tasks")
    scale_and_measure(5)
    sw("service", "scale", "--detach", f"{name}=0")
    # A Response is falsy unless 2xx: poll for the status, then look at one answer.
    wait_for(lambda: proxy.get("/scale/").status_code == 503, timeout=10,
             what="503 at scale zero")
    r = proxy.get("/scale/")
    assert r.headers.get("Retry-After") and r.json()["error"]["status"] == 503
    assert proxy.get("/scale/").status_code == 503  # not 404: the route is held
    scale_and_measure(2)
    print(f"scale: routable {', '.join(f'{x:.2f}s' for x in lags)} after the newest task "
          "ran", file=sys.stderr)


def test_services_that_cannot_be_routed_say_why(proxy: Proxy) -> None:
    service("ept-noport", proxy.network, {"gateway.path": "/noport"})
    service("ept-badlabel", proxy.network, {"gateway.path": "/bad", "gateway.port": "80",
                                            "gateway.lb": "fastest"})

    def reasons() -> dict[str, str] | None:
        found = {c.split(".")[0]: d["reason"] for c, d in proxy.decisions().items()
                 if c.startswith(("ept-noport.", "ept-badlabel."))}
        return found if len(found) == 2 else None

    found = wait_for(reasons, timeout=60, what="both services in /containers")
    assert "gateway.port is missing: Swarm does no port detection" in found["ept-noport"]
    assert found["ept-badlabel"].startswith("invalid labels: gateway.lb")
    assert proxy.get("/noport").status_code == 404


@pytest.mark.parametrize("order", ["stop-first", "start-first"])
def test_rolling_update_under_load_fails_no_request(proxy: Proxy, order: str) -> None:
    name = service(f"ept-roll-{order}", proxy.network,
                   {"gateway.path": f"/{order}", "gateway.port": "80",
                    "gateway.strip_prefix": "true"}, 3,
                   "--update-order", order, "--update-parallelism", "1",
                   "--update-delay", "1s")
    before = wait_for(lambda: len(running_tasks(name)) == 3 and running_tasks(name),
                      timeout=60, what="3 running tasks")
    addresses = {f"{task_address(t, proxy.network)}:80" for t in before.values()}
    wait_for(lambda: routable(proxy, name, addresses), timeout=10, what="3 replicas")
    results: Counter[Any] = Counter()
    stop = threading.Event()

    def load() -> None:
        session = requests.Session()
        while not stop.is_set():
            try:
                r = session.get(f"http://127.0.0.1:{proxy.http_port}/{order}/", timeout=10)
                results[r.status_code] += 1
            except requests.RequestException as exc:
                results[type(exc).__name__] += 1

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1)
        started = time.monotonic()
        sw("service", "update", "--detach", "--force", name)

        def replaced() -> bool:
            now = running_tasks(name)
            return len(now) == 3 and not (now.keys() & before.keys())

        wait_for(replaced, timeout=120, interval=0.2, what="every task replaced")
        took = time.monotonic() - started
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    print(f"rolling update {order}: {dict(results)} in {took:.1f}s", file=sys.stderr)
    assert set(results) == {200}, dict(results)
    assert results[200] > 100
