"""End to end: build the real images, bring up compose.example.yml, use it as a user would.

No container registry is reachable in CI, so everything is made here:

* the base image by ``scripts/make-base-image.sh`` (debootstrap bookworm + ``docker import``,
  the root filesystem cached in /var/cache/edgeproxy: seconds once cached, nothing at all
  while the image exists);
* the wheels on the host by ``scripts/make-wheelhouse.sh`` (the build containers do not trust
  this machine's package-index certificate);
* the proxy and whoami by ``compose build``, the way the README's "Building offline or pinned"
  tells a user: ``PYTHON_IMAGE`` and ``PIP_NO_INDEX=1`` in the environment, which
  ``compose.example.yml`` hands to the Dockerfiles as build arguments; Redis from
  ``tests/e2e/redis.Dockerfile`` (Debian's redis-server) instead of ``redis:7-alpine``.

``compose.example.yml`` is used as it is, plus ``tests/e2e/compose.override.yml``, which only
swaps the image names; the ports (127.0.0.1 and free ones) and the socket's group come from the
environment variables the example documents.  The stack gets a project name of its own and is
always taken down with ``down -v --remove-orphans``.

Nothing is skipped: a missing prerequisite fails with what to install.  Set
``EDGEPROXY_E2E_BASE_IMAGE=python:3.12-slim`` where a registry is reachable to build on the
official image instead, and ``EDGEPROXY_E2E_COMPOSE="docker compose"`` to use the Compose plugin.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import engine
import pytest
import requests
from helpers import ROOT, free_port, wait_for

pytestmark = pytest.mark.timeout(900)  # a cold run debootstraps; warm runs take about a minute

BASE_IMAGE = os.environ.get("EDGEPROXY_E2E_BASE_IMAGE", "edgeproxy-base/python:bookworm")
CACHE = Path(os.environ.get("EDGEPROXY_BASE_CACHE", "/var/cache/edgeproxy"))
COMPOSE = shlex.split(os.environ.get("EDGEPROXY_E2E_COMPOSE", "docker-compose"))
COMPOSE_FILES = (ROOT / "compose.example.yml", ROOT / "tests" / "e2e" / "compose.override.yml")
COMPOSE_ARGS = tuple(a for f in COMPOSE_FILES for a in ("-f", str(f)))
WHOAMI = ROOT / "examples" / "whoami"
# Built by `compose build` (service -> the override's tag), from the environment only:
COMPOSE_BUILT = {"proxy": "edgeproxy-e2e/proxy:latest", "hello": "edgeproxy-e2e/whoami:latest"}
BUILD_ENV = {"PYTHON_IMAGE": BASE_IMAGE, "PIP_NO_INDEX": "1"}  # README: "Building offline or pinned"
IMAGES = {  # tag -> (build context, Dockerfile, build args): the test's own Redis image
    "edgeproxy-e2e/redis:latest": (ROOT / "tests" / "e2e", ROOT / "tests" / "e2e" / "redis.Dockerfile",
                                   {"BASE_IMAGE": BASE_IMAGE, "PIP_NO_INDEX": "1"}),
}
WHEELHOUSES = {  # name -> (build context, requirements file; None: edgeproxy's setup.cfg)
    "edgeproxy": (ROOT, None),
    "whoami": (WHOAMI, WHOAMI / "requirements.txt"),
}
RATE_LIMIT = 10  # compose.example.yml: gateway.ratelimit=10/m on the api service
MINT = ROOT / "examples" / "mint-jwt.py"


def run(*cmd: str | Path, timeout: float = 600, env: dict[str, str] | None = None) -> str:
    """Run a command; its stdout, or fail with the tail of its output."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise AssertionError(f"{shlex.join(map(str, cmd))} exited {proc.returncode}:\n{tail}")
    return proc.stdout


def require(ok: bool, what: str) -> None:
    """Fail (never skip) when a prerequisite is missing."""
    if not ok:
        pytest.fail(f"e2e prerequisite missing: {what}", pytrace=False)


def mint(sub: str, *args: str) -> str:
    """A token from examples/mint-jwt.py, exactly as the walkthrough makes one."""
    return run(sys.executable, MINT, "--sub", sub, *args).strip()


# --- images ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def images() -> dict[str, float]:
    """Build every image the stack needs; seconds per step (printed, see -s)."""
    require(shutil.which("docker") is not None, "the docker CLI (apt-get install docker.io)")
    require(shutil.which(COMPOSE[0]) is not None,
            f"{COMPOSE[0]} (apt-get install docker-compose, or set EDGEPROXY_E2E_COMPOSE)")
    engine.ensure_dockerd()
    timings: dict[str, float] = {}

    start = time.monotonic()
    if BASE_IMAGE.startswith("edgeproxy-base/"):
        require(shutil.which("debootstrap") is not None or any(CACHE.glob("python-*.tar"))
                or _image_exists(BASE_IMAGE),
                "debootstrap, to make the base image (apt-get install debootstrap)")
        run("bash", ROOT / "scripts" / "make-base-image.sh", BASE_IMAGE)
    elif not _image_exists(BASE_IMAGE):
        run("docker", "pull", BASE_IMAGE)
    timings["base image"] = time.monotonic() - start

    start = time.monotonic()
    safe = BASE_IMAGE.replace("/", "_").replace(":", "_")
    for name, (context, requirements) in WHEELHOUSES.items():
        # One wheelhouse per image, so that new proxy dependencies do not rebuild whoami.
        wheelhouse = CACHE / f"wheelhouse-{safe}" / name
        run("bash", ROOT / "scripts" / "make-wheelhouse.sh", BASE_IMAGE, wheelhouse,
            *([requirements] if requirements else []))
        _sync(wheelhouse, context / ".cache" / "wheelhouse")
    timings["wheelhouse"] = time.monotonic() - start

    for service, tag in COMPOSE_BUILT.items():  # api shares hello's image
        start = time.monotonic()
        old = _image_id(tag)
        run(*COMPOSE, *COMPOSE_ARGS, "build", "--force-rm", service,
            env={**compose_env(), **BUILD_ENV})
        _forget(tag, old)
        timings[f"compose build {service}"] = time.monotonic() - start
    for tag, (context, dockerfile, args) in IMAGES.items():
        start = time.monotonic()
        old = _image_id(tag)
        build_args = [f"--build-arg={k}={v}" for k, v in args.items()]
        run("docker", "build", "--quiet", "--force-rm", "--tag", tag, "--file", dockerfile,
            *build_args, context)
        _forget(tag, old)
        timings[f"build {tag}"] = time.monotonic() - start
    print("e2e timings:", ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()), file=sys.stderr)
    return timings


def _forget(tag: str, old: str | None) -> None:
    if old and old != _image_id(tag):
        with contextlib.suppress(engine.EngineError):  # the previous build, now untagged
            engine.docker("image", "rm", old)


def compose_env() -> dict[str, str]:
    """What compose.example.yml needs from the environment for any command (DOCKER_GID)."""
    return {**os.environ, "DOCKER_GID": str(os.stat("/var/run/docker.sock").st_gid)}


def _image_id(tag: str) -> str | None:
    try:
        return engine.docker("image", "inspect", "--format", "{{.Id}}", tag).strip()
    except engine.EngineError:
        return None


def _image_exists(tag: str) -> bool:
    return _image_id(tag) is not None


def _sync(src: Path, dest: Path) -> None:
    """Mirror the wheelhouse into a build context (gitignored .cache/): what is stale goes."""
    dest.mkdir(parents=True, exist_ok=True)
    wanted = {p.name for p in src.iterdir() if p.suffix == ".whl"}
    for p in dest.iterdir():
        if p.name not in wanted:
            p.unlink()
    for name in wanted - {p.name for p in dest.iterdir()}:
        shutil.copy2(src / name, dest / name)


# --- the stack ------------------------------------------------------------------------------

@dataclass
class Stack:
    """compose.example.yml running under its own project name, on free 127.0.0.1 ports."""

    project: str = field(default_factory=lambda: f"edgeproxy-e2e-{uuid.uuid4().hex[:8]}")
    http_port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)

    @property
    def env(self) -> dict[str, str]:
        return {**compose_env(),
                "PROXY_HTTP_PORT": f"127.0.0.1:{self.http_port}",
                "PROXY_ADMIN_PORT": str(self.admin_port)}

    def compose(self, *args: str, timeout: float = 180) -> str:
        return run(*COMPOSE, "-p", self.project, *COMPOSE_ARGS, *args, timeout=timeout,
                   env=self.env)

    def containers(self, service: str, *, all_states: bool = False) -> list[str]:
        """Names of the service's containers, from Docker itself."""
        out = engine.docker("ps", *(["-a"] if all_states else []), "--format", "{{.Names}}",
                            "--filter", f"label=com.docker.compose.project={self.project}",
                            "--filter", f"label=com.docker.compose.service={service}")
        return sorted(out.split())

    def get(self, path: str, token: str | None = None) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.get(f"http://127.0.0.1:{self.http_port}{path}", headers=headers, timeout=10)

    def admin(self, path: str) -> Any:
        r = requests.get(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5)
        r.raise_for_status()
        return r.json()

    def route(self, path: str) -> dict[str, Any] | None:
        """The /routes entry that serves `path`, if any."""
        return next((r for r in self.admin("/routes")["routes"] if path in r["paths"]), None)

    def logs(self) -> str:
        try:
            return self.compose("logs", "--no-color", "--tail", "40", "proxy", timeout=30)
        except AssertionError as exc:
            return str(exc)

    def wait(self, check: Any, timeout: float, what: str) -> Any:
        """wait_for, with the proxy's logs in the failure."""
        try:
            return wait_for(check, timeout, interval=0.25, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nproxy logs:\n{self.logs()}") from None


def replica_names(route: dict[str, Any] | None) -> list[str]:
    return sorted(r["name"] for r in route["replicas"]) if route else []


def remove_stale_stacks() -> None:
    """Remove what an earlier run killed before its `down` left behind: its proxy and
    services would still be found by this run's proxy (a second /hello route, say)."""
    for kind in ("container", "network"):
        listed = run("docker", kind, "ls", *(["--all"] if kind == "container" else []),
                     "--filter", "label=com.docker.compose.project",
                     "--format", '{{.ID}} {{.Label "com.docker.compose.project"}}')
        stale = [line.split()[0] for line in listed.splitlines()
                 if line.split()[1:2] and line.split()[1].startswith("edgeproxy-e2e-")]
        if stale:
            print(f"e2e: removing {len(stale)} stale {kind}(s) of an earlier run",
                  file=sys.stderr)
            run("docker", kind, "rm", *(["--force"] if kind == "container" else []), *stale)


@pytest.fixture(scope="module")
def stack(images: dict[str, float]) -> Iterator[Stack]:
    remove_stale_stacks()
    s = Stack()
    try:
        start = time.monotonic()
        s.compose("up", "--detach", "--no-build")
        s.wait(lambda: s.admin("/healthz")["status"] == "ok", 60, "the proxy's /healthz")
        s.wait(lambda: replica_names(s.route("/hello")) == s.containers("hello"), 30,
               "/hello in /routes")
        print(f"e2e timings: compose up {time.monotonic() - start:.1f}s", file=sys.stderr)
        yield s
    finally:
        s.compose("down", "--volumes", "--remove-orphans", "--timeout", "10")


# --- what a user sees -----------------------------------------------------------------------

def test_hello_answers_from_the_example_service(stack: Stack) -> None:
    r = stack.get("/hello/greeting?lang=en")
    assert r.status_code == 200, r.text
    body = r.json()
    assert [body["container"]] == stack.containers("hello")  # whoami names its container
    assert body["path"] == "/greeting?lang=en"  # gateway.strip_prefix=true
    assert r.headers.get("X-Request-ID")


def test_routes_lists_the_three_api_replicas(stack: Stack) -> None:
    api = stack.containers("api")
    assert len(api) == 3  # deploy.replicas
    route = stack.wait(lambda: (r := stack.route("/api")) and r["healthy"] == 3 and r, 30,
                       "/api with 3 healthy replicas in /routes")
    assert replica_names(route) == api


def test_protected_route_refuses_requests_without_a_valid_token(stack: Stack) -> None:
    stack.wait(lambda: stack.route("/api"), 30, "/api in /routes")
    r = stack.get("/api/orders")
    assert r.status_code == 401, r.text
    assert r.headers.get("WWW-Authenticate", "").startswith("Bearer")
    assert "container" not in r.text  # answered by the proxy, the replica never saw it
    for bad in (mint("mallory", "--secret", "not-the-example-secret-0123456789abcdef"),
                mint("alice", "--ttl", "-120"),
                "not.a.jwt"):
        r = stack.get("/api/orders", token=bad)
        assert r.status_code == 401, (bad, r.text)
        assert 'error="invalid_token"' in r.headers.get("WWW-Authenticate", ""), r.headers


def test_protected_route_accepts_the_minted_token(stack: Stack) -> None:
    r = stack.get("/api/orders", token=mint("alice"))
    assert r.status_code == 200, r.text
    assert r.json()["container"] in stack.containers("api")
    assert r.json()["path"] == "/orders"


def test_requests_spread_over_the_replicas(stack: Stack) -> None:
    stack.wait(lambda: (r := stack.route("/api")) and r["healthy"] == 3, 30, "3 healthy replicas")
    seen = []
    for i in range(12):  # one subject each, so the per-subject rate limit stays out of the way
        r = stack.get("/api/", token=mint(f"spread-{i}"))
        assert r.status_code == 200, r.text
        seen.append(r.json()["container"])
    assert sorted(set(seen)) == stack.containers("api"), seen


def test_rate_limit_per_subject_shared_by_all_workers(stack: Stack) -> None:
    token = mint("limited")
    statuses = []
    for _ in range(3 * RATE_LIMIT):
        r = stack.get("/api/", token=token)
        statuses.append(r.status_code)
        if r.status_code == 429:
            break
    assert statuses[-1] == 429, statuses
    retry_after = r.headers.get("Retry-After", "")
    assert retry_after.isdigit() and int(retry_after) >= 1, r.headers
    # 10/m: the bucket holds 10; one more may have refilled meanwhile.  Many more would mean
    # each worker counts on its own instead of in Redis.
    assert set(statuses[:-1]) == {200} and RATE_LIMIT <= len(statuses) - 1 <= RATE_LIMIT + 1, statuses
    assert stack.get("/api/", token=mint("someone-else")).status_code == 200  # key=sub


def test_scaling_to_four_adds_a_replica_to_routes(stack: Stack) -> None:
    before = stack.containers("api")
    stack.compose("up", "--detach", "--no-build", "--no-recreate", "--no-deps", "--scale", "api=4", "api")
    after = stack.containers("api")
    assert len(after) == 4 and set(before) < set(after), (before, after)
    route = stack.wait(lambda: (r := stack.route("/api")) and r["healthy"] == 4 and r, 30,
                       "/api with 4 healthy replicas in /routes")
    assert replica_names(route) == after


def test_proxy_container_runs_unprivileged_and_healthy(stack: Stack) -> None:
    (proxy,) = stack.containers("proxy")
    assert engine.docker("inspect", "--format", "{{.Config.User}}", proxy).strip() == "10001:10001"
    ports = engine.docker("port", proxy, "8081/tcp").split()
    assert ports == [f"127.0.0.1:{stack.admin_port}"], ports  # the admin API stays local
    stack.wait(lambda: engine.docker("inspect", "--format", "{{.State.Health.Status}}", proxy)
               .strip() == "healthy", 40, "the image's HEALTHCHECK to pass")


def test_stop_drains_and_down_leaves_nothing(stack: Stack) -> None:
    (proxy,) = stack.containers("proxy")
    (hello,) = stack.containers("hello")
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(stack.get, "/hello/slow?wait=2")
        stack.wait(lambda: "/slow?wait=2" in engine.docker("logs", hello), 10, "the slow request")
        start = time.monotonic()
        stack.compose("stop", "proxy")
        took = time.monotonic() - start
        r = slow.result()
    assert r.status_code == 200 and r.json()["path"] == "/slow?wait=2", r.text  # drained, not cut
    code = engine.docker("inspect", "--format", "{{.State.ExitCode}}", proxy).strip()
    # SIGTERM handled, drained and exited inside the 10 s stop_grace_period (else: 137).
    assert code == "0" and took < 10, (
        f"exit code {code} after {took:.1f}s; proxy logs:\n{stack.logs()}")

    stack.compose("down", "--volumes", "--remove-orphans", "--timeout", "10")
    label = f"label=com.docker.compose.project={stack.project}"
    assert engine.docker("ps", "-a", "-q", "--filter", label).split() == []
    assert engine.docker("network", "ls", "-q", "--filter", label).split() == []
    assert engine.docker("volume", "ls", "-q", "--filter", label).split() == []
