"""Discovery against the real Docker Engine: labels -> live routes -> traffic."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import engine
import pytest
import requests
from docker_fixtures import run_container, unique
from helpers import ProxyProcess, run_proxy, wait_for


@pytest.fixture(scope="module")
def proxy(docker_engine: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    with run_proxy(tmp_path_factory.mktemp("proxy"), read_timeout="5s") as p:
        wait_for(lambda: p.admin("/healthz")["docker"] == "connected", 15, what="docker connected")
        yield p


def get(p: ProxyProcess, path: str, **kw: object) -> requests.Response:
    return requests.get(p.url(path), timeout=5, **kw)  # type: ignore[arg-type]


def get_until(p: ProxyProcess, path: str, status: int, timeout: float = 5, **kw: object
              ) -> requests.Response:
    """GET until the proxy answers `status`; return that response."""
    def attempt() -> tuple[requests.Response] | None:
        r = get(p, path, **kw)
        return (r,) if r.status_code == status else None  # a 5xx Response is falsy
    return wait_for(attempt, timeout, what=f"{path} -> {status}")[0]


def test_labelled_container_becomes_routable_quickly(proxy: ProxyProcess) -> None:
    path = "/" + unique("svc")
    run_container(unique("c"), {"gateway.path": path, "gateway.strip_prefix": "true"})
    r = get_until(proxy, path + "/", 200, 5)  # the deadline is the assertion
    assert r.text.strip()  # busybox writes its hostname into index.html
    route = next(rt for rt in proxy.admin("/routes")["routes"] if path in rt["paths"])
    replica = route["replicas"][0]
    assert replica["state"] == "running" and replica["address"].endswith(":80")
    assert any(e.get("event") == "route_added" and path in e.get("paths", [])
               for e in proxy.events())


def test_segment_boundaries_and_strip_prefix(proxy: ProxyProcess) -> None:
    path = "/" + unique("strip")
    run_container(unique("c"), {"gateway.path": path, "gateway.strip_prefix": "true"})
    r = get_until(proxy, path + "/cgi-bin/echo/x?a=1", 200, 5)
    echo = engine.parse_echo(r.text)
    assert echo["REQUEST_URI"] == "/cgi-bin/echo/x?a=1"
    assert echo["HTTP_X_FORWARDED_FOR"] == "127.0.0.1"
    assert get(proxy, path + "x/").status_code == 404


def test_host_label_and_port_label(proxy: ProxyProcess) -> None:
    host = unique("h") + ".example.test"
    cmd = ("sh", "-c", "mkdir -p /w && echo on8080 > /w/index.html && exec httpd -f -p 8080 -h /w")
    run_container(unique("c"), {"gateway.host": host, "gateway.port": "8080"}, command=cmd)
    r = get_until(proxy, "/", 200, 5, headers={"Host": host})
    assert r.text.strip() == "on8080"
    assert get(proxy, "/", headers={"Host": "other.example.test"}).status_code == 404


def test_replicas_share_load(proxy: ProxyProcess) -> None:
    path = "/" + unique("scale")
    labels = {"gateway.path": path, "gateway.strip_prefix": "true"}
    ids = [run_container(unique("r"), labels) for _ in range(3)]
    wait_for(lambda: len([rt for rt in proxy.admin("/routes")["routes"] if path in rt["paths"]
                          and rt["healthy"] == 3]) == 1, 5, what="3 replicas")
    seen = Counter(get(proxy, path + "/").text.strip() for _ in range(30))
    assert len(seen) == 3, seen
    assert set(seen.values()) == {10}, seen  # round robin: exactly even
    assert {i[:12] for i in ids} == set(seen)


def test_bad_label_skips_only_that_container(proxy: ProxyProcess) -> None:
    good, bad = "/" + unique("good"), "/" + unique("bad")
    bad_name = unique("bad")
    run_container(bad_name, {"gateway.path": bad, "gateway.port": "eighty"})
    run_container(unique("good"), {"gateway.path": good, "gateway.strip_prefix": "true"})
    wait_for(lambda: get(proxy, good + "/").status_code == 200, 5, what="good route")
    assert get(proxy, bad + "/").status_code == 404
    warnings = [e for e in proxy.events("label_invalid") if e.get("container") == bad_name]
    assert warnings and warnings[0]["label"] == "gateway.port"
    assert warnings[0]["value"] == "eighty"
    assert "port number" in warnings[0]["reason"]
    decision = next(c for c in proxy.admin("/containers")["containers"]
                    if c["container"] == bad_name)
    assert decision["routed"] is False and "gateway.port" in decision["reason"]


def test_stopped_route_answers_503_not_404(proxy: ProxyProcess) -> None:
    path = "/" + unique("gone")
    name = unique("c")
    run_container(name, {"gateway.path": path, "gateway.strip_prefix": "true"})
    wait_for(lambda: get(proxy, path + "/").status_code == 200, 5, what="route")
    engine.docker("stop", "-t", "1", name)
    r = get_until(proxy, path + "/", 503, 5)
    assert r.headers["Retry-After"].isdigit()
    assert r.json()["error"]["code"] == "no_replica"
    engine.docker("start", name)
    wait_for(lambda: get(proxy, path + "/").status_code == 200, 5, what="route back after start")


def test_stopping_a_replica_under_load_gives_no_5xx(proxy: ProxyProcess) -> None:
    path = "/" + unique("roll")
    names = [unique("r") for _ in range(3)]
    for n in names:
        run_container(n, {"gateway.path": path, "gateway.strip_prefix": "true"})
    wait_for(lambda: any(rt["healthy"] == 3 for rt in proxy.admin("/routes")["routes"]
                         if path in rt["paths"]), 5, what="3 replicas")
    statuses: list[int] = []
    done = threading.Event()

    def load() -> None:
        with requests.Session() as s:
            for _ in range(400):
                statuses.append(s.get(proxy.url(path + "/"), timeout=10).status_code)
        done.set()

    t = threading.Thread(target=load)
    t.start()
    wait_for(lambda: len(statuses) > 50, 10, what="load to start")
    engine.docker("stop", "-t", "3", names[0])  # SIGTERM first, then die
    engine.docker("kill", names[1])  # SIGKILL
    t.join(60)
    assert done.is_set()
    assert len(statuses) == 400
    assert [s for s in statuses if s >= 500] == []


def test_label_prefix_and_opt_in_mode(docker_engine: None, tmp_path: Path) -> None:
    path_in, path_out = "/" + unique("in"), "/" + unique("out")
    run_container(unique("c"), {"edge.path": path_in, "edge.enable": "true", "edge.strip_prefix": "1"})
    run_container(unique("c"), {"edge.path": path_out})
    with run_proxy(tmp_path, label_prefix="edge", exposed_by_default="false") as p:
        wait_for(lambda: requests.get(p.url(path_in + "/"), timeout=5).status_code == 200, 10,
                 what="opted-in route")
        assert requests.get(p.url(path_out + "/"), timeout=5).status_code == 404


def test_docker_unreachable_at_start_serves_file_routes(tmp_path: Path) -> None:
    from helpers import run_backend, write_routes

    with run_backend("filebackend") as base:
        routes = write_routes(tmp_path / "routes.toml", {"f": {"path": "/f", "upstreams": [base]}})
        with run_proxy(tmp_path, routes_file=str(routes),
                       DOCKER_HOST="unix:///nonexistent/docker.sock") as p:
            assert requests.get(p.url("/f/x"), timeout=5).json()["name"] == "filebackend"
            wait_for(lambda: p.admin("/healthz", ok=(503,))["docker"] == "disconnected", 10,
                     what="docker reported disconnected")
            assert p.events("docker_disconnected")
