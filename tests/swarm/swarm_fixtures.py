"""Helpers for the Swarm stage: a swarm-mode dockerd of its own, the proxy as a service in it.

Run as its own pytest invocation, after the main suite (scripts/test.sh):
    .venv/bin/python -m pytest -q tests/swarm

The main dockerd (live-restore) is only read from: `docker save` of the busybox and base
images. Everything else happens on the second daemon (tests/swarm_engine.py): the proxy image
is built there, offline, from this checkout, and runs as a Swarm service on an overlay network,
because task addresses on overlay networks are not reachable from the host. The tests reach
the proxy on 127.0.0.1 through ports published in `mode: host` (dockerd's userland proxy
serves them with --iptables=false).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import engine
import requests
import swarm_engine
from helpers import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = os.environ.get("EDGEPROXY_E2E_BASE_IMAGE", "edgeproxy-base/python:bookworm")
CACHE = Path(os.environ.get("EDGEPROXY_BASE_CACHE", "/var/cache/edgeproxy"))
PROXY_IMAGE = "edgeproxy-swarm/proxy:test"
BUSYBOX = engine.BUSYBOX_IMAGE
TEST_LABEL = "edgeproxy.test.swarm"  # on every service and network the tests make


def sw(*args: str, timeout: float = 120.0) -> str:
    """docker against the swarm daemon."""
    return swarm_engine.docker(*args, timeout=timeout)


class _UnixConnection(http.client.HTTPConnection):
    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(swarm_engine.SOCKET))


def api(path: str) -> Any:
    """GET the swarm daemon's API (what the proxy sees)."""
    conn = _UnixConnection("docker")
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        raise AssertionError(f"GET {path} on the swarm daemon: {resp.status} {body[:300]!r}")
    return json.loads(body)


def cleanup() -> None:
    """Remove every service and network a (previous) run of these tests made."""
    services = sw("service", "ls", "-q", "--filter", f"label={TEST_LABEL}").split()
    if services:
        sw("service", "rm", *services)
    # Networks go once their tasks' containers are gone.
    deadline = time.monotonic() + 60
    while True:
        nets = sw("network", "ls", "-q", "--filter", f"label={TEST_LABEL}").split()
        if not nets:
            return
        try:
            sw("network", "rm", *nets)
            return
        except engine.EngineError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def build_proxy_image() -> None:
    """The proxy image from this checkout, built on the swarm daemon without any registry."""
    if BASE_IMAGE.startswith("edgeproxy-base/") and swarm_engine.image_id(BASE_IMAGE,
                                                                          on_swarm=False) is None:
        subprocess.run(["bash", str(ROOT / "scripts" / "make-base-image.sh"), BASE_IMAGE],
                       check=True, cwd=ROOT, timeout=1800)
    swarm_engine.copy_image(BASE_IMAGE)
    safe = BASE_IMAGE.replace("/", "_").replace(":", "_")
    wheelhouse = CACHE / f"wheelhouse-{safe}" / "edgeproxy"
    subprocess.run(["bash", str(ROOT / "scripts" / "make-wheelhouse.sh"), BASE_IMAGE,
                    str(wheelhouse)], check=True, cwd=ROOT, timeout=1800, capture_output=True)
    dest = ROOT / ".cache" / "wheelhouse"
    dest.mkdir(parents=True, exist_ok=True)
    wanted = {p.name for p in wheelhouse.glob("*.whl")}
    for p in dest.iterdir():
        if p.name not in wanted:
            p.unlink()
    for name in wanted - {p.name for p in dest.iterdir()}:
        shutil.copy2(wheelhouse / name, dest / name)
    sw("build", "--quiet", "--force-rm", "--tag", PROXY_IMAGE,
       f"--build-arg=PYTHON_IMAGE={BASE_IMAGE}", "--build-arg=PIP_NO_INDEX=1", str(ROOT),
       timeout=900)


@dataclass
class Proxy:
    """The proxy running as a one-replica service on `network`, reachable on 127.0.0.1."""

    network: str
    env: dict[str, str] = field(default_factory=dict)
    name: str = field(default_factory=lambda: f"ept-proxy-{uuid.uuid4().hex[:6]}")
    http_port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)

    def deploy(self) -> None:
        env = {"EDGEPROXY_SWARM": "true", "EDGEPROXY_WORKERS": "1",
               "EDGEPROXY_NETWORK": self.network, "EDGEPROXY_LOG_LEVEL": "info", **self.env}
        sw("service", "create", "--detach", "--name", self.name, "--label", TEST_LABEL,
           "--network", self.network, "--user", "0:0",
           "--mount", f"type=bind,src={swarm_engine.SOCKET},dst=/var/run/docker.sock",
           "--publish", f"mode=host,target=8080,published={self.http_port}",
           "--publish", f"mode=host,target=8081,published={self.admin_port}",
           *(a for k, v in env.items() for a in ("--env", f"{k}={v}")), PROXY_IMAGE)
        wait_for(lambda: self.admin("/healthz") is not None, timeout=60,
                 what=f"proxy service {self.name} answering /healthz")

    def get(self, path: str, timeout: float = 10) -> requests.Response:
        return requests.get(f"http://127.0.0.1:{self.http_port}{path}", timeout=timeout)

    def admin(self, path: str) -> Any:
        r = requests.get(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5)
        r.raise_for_status()
        return r.json()

    def route(self, name: str) -> dict[str, Any] | None:
        return next((r for r in self.admin("/routes")["routes"] if r["name"] == name), None)

    def decisions(self) -> dict[str, dict[str, Any]]:
        return {c["container"]: c for c in self.admin("/containers")["containers"]}

    def logs(self) -> str:
        try:
            return sw("service", "logs", "--raw", "--tail", "60", self.name, timeout=30)
        except engine.EngineError as exc:
            return str(exc)


def service(name: str, network: str, labels: dict[str, str], replicas: int = 1,
            *extra: str) -> str:
    """Create a busybox service (detached); its name."""
    sw("service", "create", "--detach", "--name", name, "--label", TEST_LABEL,
       "--network", network, "--replicas", str(replicas), "--init",
       *(a for k, v in labels.items() for a in ("--label", f"{k}={v}")), *extra, BUSYBOX)
    return name


def running_tasks(name: str) -> dict[str, dict[str, Any]]:
    """Task id -> task, for the service's tasks running with desired state running."""
    filters = json.dumps({"service": [name], "desired-state": ["running"]})
    tasks = api(f"/tasks?filters={requests.utils.quote(filters)}")
    return {t["ID"]: t for t in tasks if t["Status"]["State"] == "running"}


def task_address(task: dict[str, Any], network: str) -> str:
    for att in task.get("NetworksAttachments") or ():
        if att["Network"]["Spec"]["Name"] == network:
            return str(att["Addresses"][0].split("/")[0])
    raise AssertionError(f"task {task['ID']} has no address on {network}")


def parse_time(text: str) -> float:
    """Docker's RFC 3339 nanosecond time -> epoch seconds (float)."""
    head, _, frac = text.rstrip("Z").partition(".")
    base = datetime.fromisoformat(head).replace(tzinfo=UTC).timestamp()
    return base + float("0." + (frac or "0"))
