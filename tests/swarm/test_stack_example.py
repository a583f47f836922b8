"""examples/stack.yml deployed with `docker stack deploy`, as a user would (plus the override)."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import engine
import pytest
import requests
import swarm_engine
from helpers import free_port, wait_for
from swarm_fixtures import BASE_IMAGE, PROXY_IMAGE, api, running_tasks, sw, task_address

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
WHOAMI = "edgeproxy-e2e/whoami:latest"  # built by tests/e2e (the compose example's images)
REDIS = "edgeproxy-e2e/redis:latest"
LIMIT = 10  # examples/stack.yml: gateway.ratelimit=10/m on api


class Stack:
    """The example stack under a fresh name, on free ports."""

    def __init__(self) -> None:
        self.name = f"edge{uuid.uuid4().hex[:4]}"
        self.http_port = free_port()
        self.admin_port = free_port()
        self.network = f"{self.name}_backend"

    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": swarm_engine.HOST, "BASE_IMAGE": BASE_IMAGE,
                "EDGEPROXY_IMAGE": PROXY_IMAGE, "WHOAMI_IMAGE": WHOAMI, "REDIS_IMAGE": REDIS,
                "PROXY_HTTP_PORT": str(self.http_port), "PROXY_ADMIN_PORT": str(self.admin_port),
                "SOCKET_FORWARD": str(HERE / "socket_forward.py"),
                "DOCKER_SOCKET": str(swarm_engine.SOCKET)}

    def deploy(self) -> None:
        import subprocess
        subprocess.run(["docker", "stack", "deploy", "--resolve-image", "never",
                        "-c", str(ROOT / "examples" / "stack.yml"),
                        "-c", str(HERE / "stack.override.yml"), self.name],
                       env=self.env(), check=True, capture_output=True, timeout=120)

    def logs(self) -> str:
        return sw("service", "logs", "--raw", f"{self.name}_proxy", timeout=30)

    def remove(self) -> None:
        if os.environ.get("EDGEPROXY_SWARM_TEST_LOGS"):
            print(self.logs())
        sw("stack", "rm", self.name)
        deadline = time.monotonic() + 60
        while any(n.startswith(self.name + "_")
                  for n in sw("network", "ls", "--format", "{{.Name}}").split()):
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)

    def get(self, path: str) -> requests.Response:
        return requests.get(f"http://127.0.0.1:{self.http_port}{path}", timeout=10)

    def admin(self, path: str) -> Any:
        r = requests.get(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5)
        r.raise_for_status()
        return r.json()

    def replicas(self, service: str) -> set[str] | None:
        route = next((r for r in self.admin("/routes")["routes"]
                      if r["name"] == f"{self.name}_{service}"), None)
        return {x["address"] for x in route["replicas"] if x["eligible"]} if route else None

    def task_addresses(self, service: str, port: int = 8000) -> set[str]:
        return {f"{task_address(t, self.network)}:{port}"
                for t in running_tasks(f"{self.name}_{service}").values()}

    def matches_docker(self, service: str) -> bool:
        return self.replicas(service) == self.task_addresses(service)


@pytest.fixture(scope="module")
def stack(swarm: None) -> Iterator[Stack]:
    for image in (WHOAMI, REDIS):
        if swarm_engine.image_id(image, on_swarm=False) is None:
            pytest.fail(f"{image} is built by tests/e2e/test_compose.py: run the main suite first",
                        pytrace=False)
        swarm_engine.copy_image(image)
    s = Stack()
    s.deploy()
    try:
        wait_for(lambda: s.matches_docker("hello") and s.matches_docker("api")
                 and len(s.task_addresses("api")) == 3, timeout=90, interval=0.2,
                 what="hello and api routed to every task")
        yield s
    finally:
        s.remove()


def test_the_example_routes_every_task_and_the_vip(stack: Stack) -> None:
    names = {stack.get("/hello/").json()["hostname"] for _ in range(10)}
    assert len(names) == 2  # both hello tasks answer
    # Every running api task is routed. Waited for, not read once: under load a task can
    # miss its HEALTHCHECK and Swarm start a replacement, which is rightly not routed until
    # it is healthy (seen once in CI: the proxy one task short for a moment).
    wait_for(lambda: stack.replicas("api") == stack.task_addresses("api"), timeout=30,
             interval=0.5, what="every running api task routed")
    legacy = stack.admin("/routes")["routes"]
    vip_route = next(r for r in legacy if r["name"] == f"{stack.name}_legacy")
    service = api(f"/services/{stack.name}_legacy")
    networks = {n["Id"]: n["Name"] for n in api("/networks")}
    vips = {networks.get(v["NetworkID"]): v["Addr"].split("/")[0]
            for v in service["Endpoint"]["VirtualIPs"]}
    # VIP mode: one upstream, the service's virtual IP on the backend network. (The VIP itself
    # does not answer on the test machine: no IPVS; so no request goes to it here.)
    assert [r["address"] for r in vip_route["replicas"]] == [f"{vips[stack.network]}:8000"]


def test_two_proxies_share_one_rate_limit_through_redis(stack: Stack) -> None:
    # A second proxy like the example's, without published ports: both are reached by task
    # address from a client container on the overlay network.
    second = f"{stack.name}_proxy2"
    spec = api(f"/services/{stack.name}_proxy")["Spec"]["TaskTemplate"]["ContainerSpec"]
    sw("service", "create", "--detach", "--name", second, "--label", "edgeproxy.test.swarm",
       "--network", stack.network, "--network", f"{stack.name}_docker-api",
       *(a for e in spec.get("Env", ()) for a in ("--env", e)), PROXY_IMAGE)
    try:
        addrs = wait_for(lambda: (t := running_tasks(second)) and [
            task_address(next(iter(running_tasks(f"{stack.name}_proxy").values())),
                         stack.network),
            task_address(next(iter(t.values())), stack.network)], timeout=60,
                         what="the second proxy running")
        # Its table must have the api route before the budget is spent.
        script = ("for a in " + " ".join(addrs) + "; do until wget -q -O /dev/null "
                  "http://$a:8081/healthz; do sleep 0.2; done; done; "
                  "i=0; while [ $i -lt 8 ]; do for a in " + " ".join(addrs) + "; do "
                  "if wget -q -O /dev/null http://$a:8080/api/; then echo ok; "
                  "else echo refused; fi; done; i=$((i+1)); done")
        wait_for(lambda: "api" in sw("run", "--rm", "--network", stack.network,
                                     engine.BUSYBOX_IMAGE, "wget", "-q", "-O", "-",
                                     f"http://{addrs[1]}:8081/routes"),
                 timeout=30, interval=0.5, what="the second proxy's table")
        out = sw("run", "--rm", "--network", stack.network, engine.BUSYBOX_IMAGE,
                 "sh", "-c", script, timeout=120).split()
        assert len(out) == 16 and out.count("ok") == LIMIT, out
    finally:
        sw("service", "rm", second)


def test_a_broken_api_connection_resyncs_to_what_docker_says(stack: Stack) -> None:
    # The socket proxy goes away (a placement no node satisfies), which cuts the proxy's event
    # stream and polls; meanwhile the tasks change. Once it is back, the table must match
    # Docker's running tasks again.
    api_service = f"{stack.name}_docker-api"
    nowhere = "node.labels.edgeproxy-test-nowhere==true"
    sw("service", "update", "--detach", "--constraint-add", nowhere, api_service)
    try:
        # Gone means no task running in any desired state (a stopping one still forwards).
        filters = requests.utils.quote(json.dumps({"service": [api_service]}))
        wait_for(lambda: all(t["Status"]["State"] != "running"
                             for t in api(f"/tasks?filters={filters}")),
                 timeout=60, what="the API gone")
        sw("service", "scale", "--detach", f"{stack.name}_hello=4")
        wait_for(lambda: len(stack.task_addresses("hello")) == 4, timeout=60,
                 what="4 hello tasks")
        # A poll hangs on the vanished peer until its 10 s timeout, then fails: the proxy says
        # so in its log, and keeps what it knew.
        wait_for(lambda: "swarm_disconnected" in stack.logs(), timeout=40, interval=1,
                 what="the proxy noticing the API is gone")
        assert len(stack.replicas("hello") or ()) == 2
    finally:
        sw("service", "update", "--detach", "--constraint-rm", nowhere, api_service)
    wait_for(lambda: stack.matches_docker("hello"), timeout=60, interval=0.2,
             what="the proxy's hello replicas = docker's running tasks")
    sw("service", "scale", "--detach", f"{stack.name}_hello=1")
    wait_for(lambda: stack.matches_docker("hello") and len(stack.replicas("hello") or ()) == 1,
             timeout=30, interval=0.2, what="one hello replica after scaling down")
