"""Discovery scale: start-up sync of many labelled containers, a burst of starts, and memory.

Measures the issue's discovery goals against a real Docker Engine:

- start-up: N labelled containers (default 200) exist before edgeproxy starts. How many Docker
  API calls the sync costs (the goal: one list call), and how long after the list returns
  `GET /routes` shows every route (goal: < 1 s);
- burst: B more containers (default 50) are created, then started at once while edgeproxy runs
  (`--burst-run`: each created and started in one go, like `docker run`). How long after the
  last `start` event all B routes are in `GET /routes` (goal: < 2 s), with the table swaps and
  Docker API calls that took;
- memory: edgeproxy's RSS with N + B routes (one worker; the goal is < 100 MB with 1000 routes,
  which `bench/run.py --scale` measures with file routes); with `--workers`, the largest process;
- with `--workers N` (N > 1): the spread of each table swap's arrival across the workers (first
  to last worker, from their `table_received` events; goal: < 50 ms), and that the N workers
  still cost one list and one event stream.

    .venv/bin/python bench/discovery.py [--containers 200] [--burst 50] [--parallel 8] [--workers 1]

edgeproxy reaches Docker through a counting forwarder in this script (DOCKER_HOST=tcp://...),
which relays bytes to the Docker socket and notes every request line. Every container is
labelled `edgeproxy-bench=1` plus this run's `edgeproxy-bench.run=<token>`, and all of them
are removed at the end, also on Ctrl-C, SIGTERM and errors. Writes OUT/discovery.json. The goals
are printed for reading, never as a pass/fail exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import itertools
import json
import os
import platform
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import docker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import engine  # noqa: E402 - tests/engine.py starts dockerd and builds the busybox image
from run import free_port, log  # noqa: E402 - bench/run.py, beside this script

BENCH_LABEL = "edgeproxy-bench"  # every container of every run: edgeproxy-bench=1
RUN_LABEL = "edgeproxy-bench.run"  # this run's containers: edgeproxy-bench.run=<token>
POLL = 0.02  # seconds between two GET /routes
T = TypeVar("T")
R = TypeVar("R")


class BenchError(RuntimeError):
    """A step of the benchmark failed; the message says which and why."""


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """One GET to 127.0.0.1:port -> (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def parallel(fn: Callable[[T], R], items: Iterable[T], workers: int) -> list[R]:
    """fn over items in a thread pool; on Ctrl-C queued calls are dropped, running ones end."""
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        return list(pool.map(fn, items))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def iso_time(text: str) -> float:
    """structlog's ISO UTC timestamp -> epoch seconds."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# --- the counting Docker API forwarder ----------------------------------------------------------

_VERSIONED = re.compile(r"^/v\d+(\.\d+)?(?=/)")
_INSPECT = re.compile(r"^/containers/([^/]+)/json$")
_LENGTH = re.compile(rb"(?im)^content-length:\s*(\d+)\s*$")


@dataclass
class ApiCall:
    """One request edgeproxy sent to Docker, and when its answer's bytes came back."""

    t: float  # when its request head was read (epoch seconds)
    conn: int
    method: str
    path: str  # without the /v1.xx prefix and the query
    kind: str  # version, ping, events, list, inspect or other
    container: str | None = None  # the inspected id
    first_byte: float | None = None
    last_byte: float | None = None
    bytes: int = 0


def classify(method: str, target: str) -> tuple[str, str, str | None]:
    """A request line's target -> (path, kind, inspected container)."""
    path = _VERSIONED.sub("", urlsplit(target).path)
    if method != "GET":
        return path, "other", None
    m = _INSPECT.match(path)
    if m:
        return path, "inspect", m.group(1)
    kind = {"/containers/json": "list", "/events": "events", "/version": "version",
            "/_ping": "ping"}.get(path, "other")
    return path, kind, None


class DockerApiCounter:
    """A TCP listener on 127.0.0.1 that relays bytes to the Docker socket and notes each request.

    It parses only request heads (and skips request bodies by Content-Length); responses, the
    long-lived event stream included, are relayed untouched, with the time of their last byte
    noted on the request they answer (requests on one connection do not overlap)."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.port = free_port()
        self.calls: list[ApiCall] = []
        self._conns = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> None:
        """Listen in a thread with its own event loop."""
        self._thread = threading.Thread(target=self._run, name="docker-api-counter", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise BenchError(f"the Docker API forwarder did not start: {self._error}")

    def stop(self) -> None:
        """Close the listener and every relayed connection."""
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            server = loop.run_until_complete(
                asyncio.start_server(self._relay, "127.0.0.1", self.port))
        except OSError as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            server.close()
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.close()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        conn = next(self._conns)
        try:
            docker_r, docker_w = await asyncio.open_unix_connection(self.socket_path)
        except OSError:
            client_w.close()
            return
        current: list[ApiCall | None] = [None]

        async def upstream() -> None:
            buf, skip = b"", 0
            while data := await client_r.read(65536):
                docker_w.write(data)
                buf += data
                while buf:
                    if skip:
                        n = min(skip, len(buf))
                        buf, skip = buf[n:], skip - n
                        continue
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        buf = buf[-65536:]
                        break
                    head, buf = buf[:end], buf[end + 4:]
                    method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
                    path, kind, container = classify(method, rest.rpartition(" ")[0])
                    call = ApiCall(time.time(), conn, method, path, kind, container)
                    self.calls.append(call)
                    current[0] = call
                    length = _LENGTH.search(head)
                    skip = int(length.group(1)) if length else 0
                await docker_w.drain()

        async def downstream() -> None:
            while data := await docker_r.read(65536):
                now = time.time()
                call = current[0]
                if call is not None:
                    call.first_byte = call.first_byte or now
                    call.last_byte = now
                    call.bytes += len(data)
                client_w.write(data)
                await client_w.drain()

        tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for w in (client_w, docker_w):
                w.close()

    def since(self, index: int, until: float | None = None) -> list[ApiCall]:
        """The calls noted after the first `index` ones (and before `until`, if given)."""
        return [c for c in self.calls[index:] if until is None or c.t <= until]


def call_counts(calls: list[ApiCall], ours: set[str]) -> dict[str, int]:
    """Calls by kind; inspects split into our containers' and others'."""
    counts: Counter[str] = Counter()
    for c in calls:
        if c.kind == "inspect":
            mine = any(cid.startswith(c.container or "-") for cid in ours)
            counts["inspect" if mine else "inspect_other"] += 1
        else:
            counts[c.kind] += 1
    return dict(sorted(counts.items()))


# --- containers -----------------------------------------------------------------------------

class Fleet:
    """The busybox containers this run creates (labelled edgeproxy-bench=1 and with the run's
    token), and their removal."""

    def __init__(self, api: Any, image: str, token: str, workers: int) -> None:
        self.api = api
        self.image = image
        self.token = token
        self.workers = workers
        self.ids: dict[int, str] = {}  # index -> container id

    def path(self, index: int) -> str:
        """The gateway.path of container `index`."""
        return f"/d{index}"

    def _create(self, i: int) -> None:
        labels = {BENCH_LABEL: "1", RUN_LABEL: self.token, "gateway.path": self.path(i),
                  "gateway.strip_prefix": "true"}
        host_config = self.api.create_host_config(init=True)
        c = self.api.create_container(self.image, name=f"edgeproxy-bench-{self.token}-d{i}",
                                      labels=labels, host_config=host_config)
        self.ids[i] = c["Id"]

    def create(self, indexes: list[int]) -> None:
        """Create the containers (not started), in parallel."""
        parallel(self._create, indexes, self.workers)

    def start(self, indexes: list[int]) -> None:
        """Start created containers, in parallel."""
        parallel(lambda i: self.api.start(self.ids[i]), indexes, self.workers)

    def run(self, indexes: list[int]) -> None:
        """Create and start each container, like `docker run`, in parallel."""
        def one(i: int) -> None:
            self._create(i)
            self.api.start(self.ids[i])

        parallel(one, indexes, self.workers)

    def running(self) -> set[str]:
        """Ids of this run's running containers."""
        items = self.api.containers(filters={"label": f"{RUN_LABEL}={self.token}",
                                             "status": "running"})
        return {c["Id"] for c in items}

    def wait_running(self, indexes: list[int], timeout: float = 60.0) -> None:
        """Until every container of indexes runs."""
        want = {self.ids[i] for i in indexes}
        deadline = time.monotonic() + timeout
        while not want <= self.running():
            if time.monotonic() > deadline:
                raise BenchError(f"{len(want - self.running())} containers not running "
                                 f"after {timeout}s")
            time.sleep(0.2)

    def remove_all(self) -> int:
        """Remove every container of this run (those noted and any the label finds)."""
        found = {c["Id"] for c in self.api.containers(
            all=True, filters={"label": f"{RUN_LABEL}={self.token}"})}
        ids = sorted(found | set(self.ids.values()))

        def rm(cid: str) -> None:
            with contextlib.suppress(docker.errors.NotFound):
                self.api.remove_container(cid, force=True)

        parallel(rm, ids, self.workers)
        return len(ids)


# --- edgeproxy ------------------------------------------------------------------------------

class ProxyLog:
    """edgeproxy's JSON lines, read as the file grows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.events: list[dict[str, Any]] = []
        self._pos = 0
        self._partial = b""

    def read(self) -> None:
        """Parse the lines written since the last call."""
        with contextlib.suppress(OSError), self.path.open("rb") as f:
            f.seek(self._pos)
            data = f.read()
            self._pos += len(data)
            *lines, self._partial = (self._partial + data).split(b"\n")
            for line in lines:
                if line.startswith(b"{"):
                    with contextlib.suppress(ValueError):
                        self.events.append(json.loads(line))

    def find(self, event: str) -> list[dict[str, Any]]:
        """Every logged event of that name so far."""
        self.read()
        return [e for e in self.events if e.get("event") == event]

    def tail(self, n: int = 15) -> str:
        """The last lines, to say why something failed."""
        try:
            return "\n".join(self.path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def routable_times(log_: ProxyLog, paths: set[str], after: float) -> dict[str, float]:
    """When each of paths first got an eligible replica, from the route_added and route_changed
    events logged after `after`."""
    first: dict[str, float] = {}
    for e in log_.find("route_added") + log_.find("route_changed"):
        t = iso_time(e["timestamp"])
        if t < after or not e.get("healthy"):
            continue
        for p in set(e.get("paths") or ()) & paths:
            first[p] = min(first.get(p, t), t)
    return first


class EdgeProxy:
    """One edgeproxy process (one worker) that reaches Docker through the counter."""

    def __init__(self, work: Path, docker_port: int, workers: int = 1,
                 extra_env: dict[str, str] | None = None) -> None:
        self.port, self.admin = free_port(), free_port()
        self.workers = workers
        self.log = ProxyLog(work / "edgeproxy.out")
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("EDGEPROXY_", "DOCKER_"))}
        env.update({
            "DOCKER_HOST": f"tcp://127.0.0.1:{docker_port}",
            "EDGEPROXY_WORKERS": str(workers),
            "EDGEPROXY_LISTEN": f"127.0.0.1:{self.port}",
            "EDGEPROXY_ADMIN_LISTEN": f"127.0.0.1:{self.admin}",
            "EDGEPROXY_LOG_LEVEL": "debug",
            "EDGEPROXY_LOG_FORMAT": "json",
            "EDGEPROXY_ACCESS_LOG": "false",
            "EDGEPROXY_STATE_DIR": str(work / "state"),
            "PYTHONPATH": str(ROOT),
            **(extra_env or {}),
        })
        self.t_spawn = time.time()
        with self.log.path.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "edgeproxy"], cwd=ROOT, env=env,
                                         stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def check_alive(self) -> None:
        """Raise with the log's tail if the process has exited."""
        if self.proc.poll() is not None:
            raise BenchError(f"edgeproxy exited with {self.proc.returncode}:\n{self.log.tail()}")

    def admin_json(self, path: str) -> Any:
        """GET an admin path as JSON."""
        status, body = http_get(self.admin, path)
        if status != 200:
            raise BenchError(f"GET {path} on the admin listener: {status}")
        return json.loads(body)

    def metrics(self) -> dict[str, float]:
        """The unlabelled samples of GET /metrics."""
        _, body = http_get(self.admin, "/metrics")
        out = {}
        for line in body.decode(errors="replace").splitlines():
            name, _, value = line.partition(" ")
            if line and not line.startswith("#") and "{" not in name:
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
        return out

    def memory_mb(self) -> dict[str, float]:
        """VmRSS and VmHWM (peak RSS) in MB: of the process, or with workers the largest of the
        supervisor, the control plane and the workers."""
        pids = [self.proc.pid]
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
                pids += [int(c) for c in (task / "children").read_text().split()]
        out: dict[str, float] = {}
        for pid in pids:
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    key, _, value = line.partition(":")
                    if key in ("VmRSS", "VmHWM"):
                        out[key] = max(out.get(key, 0.0), int(value.split()[0]) * 1024 / 1e6)
        return out

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to its process group, SIGKILL after `timeout`."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def routed(routes: dict[str, Any]) -> dict[str, set[str]]:
    """GET /routes -> path -> short ids of the containers eligible for it."""
    out: dict[str, set[str]] = {}
    for r in routes.get("routes", ()):
        ids = {u["container_id"] for u in r.get("replicas", ()) if u.get("eligible")
               and u.get("container_id")}
        for p in r.get("paths", ()):
            out.setdefault(p, set()).update(ids)
    return out


@dataclass
class Seen:
    """When GET /routes first listed every wanted route, and what the polling took."""

    t: float  # epoch time the answer that had them all arrived
    polls: int
    poll_ms_median: float  # one GET /routes (the proxy renders every route as JSON)
    poll_ms_max: float


def wait_routes(proxy: EdgeProxy, want: dict[str, str], timeout: float = 60.0) -> Seen:
    """Poll GET /routes every POLL s until each path of want (path -> container id) has that
    container as an eligible replica."""
    deadline = time.monotonic() + timeout
    polls: list[float] = []
    missing = len(want)
    while time.monotonic() < deadline:
        proxy.check_alive()
        t0 = time.time()
        with contextlib.suppress(OSError, ValueError):  # admin listener not up yet
            table = routed(proxy.admin_json("/routes"))
            now = time.time()
            polls.append(now - t0)
            missing = sum(1 for p, cid in want.items() if cid[:12] not in table.get(p, ()))
            if not missing:
                ms = sorted(polls)
                return Seen(now, len(polls), round(ms[len(ms) // 2] * 1000, 1),
                            round(ms[-1] * 1000, 1))
        time.sleep(POLL)
    raise BenchError(f"{missing} of {len(want)} routes not in /routes after {timeout}s:\n"
                     f"{proxy.log.tail()}")


def check_routable(proxy: EdgeProxy, fleet: Fleet, indexes: list[int], timeout: float = 10.0
                   ) -> tuple[int, float]:
    """GET /dN/ through the proxy for each index until it answers 200 with that container's
    hostname (busybox serves it as /index.html). Returns (how many did, epoch time when all
    had)."""
    deadline = time.monotonic() + timeout
    todo = list(indexes)
    while todo and time.monotonic() < deadline:
        left = []
        for i in todo:
            try:
                status, body = http_get(proxy.port, fleet.path(i) + "/")
            except OSError:
                status, body = 0, b""
            if status != 200 or body.decode(errors="replace").strip() != fleet.ids[i][:12]:
                left.append(i)
        todo = left
        if todo:
            time.sleep(0.05)
    return len(indexes) - len(todo), time.time()


def swap_spread(log_: ProxyLog, workers: int, after: float) -> dict[str, Any]:
    """How far apart the workers received each table published after `after`: per generation
    that every worker received, last arrival minus first (ms); and publish -> arrival (ms)."""
    arrivals: dict[int, dict[Any, float]] = {}
    lags: list[float] = []
    for e in log_.find("table_received"):
        if e["at"] < after:
            continue
        arrivals.setdefault(e["generation"], {})[e.get("worker")] = e["at"]
        lags.append(e["lag_ms"])
    spreads = sorted((max(a.values()) - min(a.values())) * 1000
                     for a in arrivals.values() if len(a) == workers)
    lags.sort()
    return {
        "swaps_measured": len(spreads),
        "spread_ms_median": round(spreads[len(spreads) // 2], 2) if spreads else None,
        "spread_ms_max": round(spreads[-1], 2) if spreads else None,
        "publish_to_arrival_ms_median": round(lags[len(lags) // 2], 2) if lags else None,
        "publish_to_arrival_ms_max": round(lags[-1], 2) if lags else None,
    }


# --- phases -----------------------------------------------------------------------------------

def settle(counter: DockerApiCounter, quiet: float = 0.5, timeout: float = 10.0) -> None:
    """Wait until the proxy has sent no Docker request for `quiet` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = max((c.t for c in counter.calls if c.kind != "events"), default=0.0)
        if time.time() - last >= quiet:
            return
        time.sleep(0.05)


def measure_sync(proxy: EdgeProxy, counter: DockerApiCounter, fleet: Fleet, indexes: list[int],
                 start_index: int) -> dict[str, Any]:
    """Start-up: from spawn to docker_connected, and from the list's answer to every route."""
    want = {fleet.path(i): fleet.ids[i] for i in indexes}
    seen = wait_routes(proxy, want)
    t_routes = seen.t
    settle(counter)
    calls = counter.since(start_index)
    lists = [c for c in calls if c.kind == "list"]
    connected = proxy.log.find("docker_connected")
    listening = proxy.log.find("listening")
    if not connected:
        raise BenchError(f"no docker_connected event in the log:\n{proxy.log.tail()}")
    t_connected = iso_time(connected[0]["timestamp"])
    list_done = lists[0].last_byte if lists and lists[0].last_byte else t_connected
    logged = routable_times(proxy.log, set(want), proxy.t_spawn)
    t_logged = max(logged.values()) if len(logged) == len(want) else None
    t_ok0 = time.time()
    ok, t_ok = check_routable(proxy, fleet, indexes)
    swaps = proxy.admin_json("/routes")["swaps"]
    return {
        "containers": len(indexes),
        "containers_listed": connected[0].get("containers"),
        "process_start_to_listening_s": (round(iso_time(listening[0]["timestamp"])
                                              - proxy.t_spawn, 3) if listening else None),
        "process_start_to_docker_connected_s": round(t_connected - proxy.t_spawn, 3),
        "list_request_to_answer_s": (round(lists[0].last_byte - lists[0].t, 3)
                                     if lists and lists[0].last_byte else None),
        "list_answer_bytes": lists[0].bytes if lists else None,
        "list_answer_to_docker_connected_s": round(t_connected - list_done, 3),
        "list_answer_to_routes_s": round(t_routes - list_done, 3),
        "docker_connected_to_routes_s": round(t_routes - t_connected, 3),
        "list_answer_to_last_route_logged_s": (round(t_logged - list_done, 3)
                                               if t_logged else None),
        "routes_polls": seen.polls,
        "routes_poll_ms_median": seen.poll_ms_median,
        "routes_poll_ms_max": seen.poll_ms_max,
        "table_swaps": swaps,
        "api_calls": call_counts(calls, set(fleet.ids.values())),
        "api_calls_by_path": dict(Counter(f"{c.method} {c.path}" if c.kind != "inspect"
                                          else "GET /containers/{id}/json" for c in calls)),
        "routable": ok,
        "routable_check_s": round(t_ok - t_ok0, 3),
    }


def start_events(api: Any, ids: set[str], since: float, until: float
                 ) -> tuple[dict[str, list[float]], dict[str, dict[str, float]]]:
    """Docker's container and network events for ids between since and until: their times by
    action, and by container id and action."""
    out: dict[str, list[float]] = {}
    per: dict[str, dict[str, float]] = {}
    events = api.events(since=f"{since:.9f}", until=f"{until:.9f}", decode=True,
                        filters={"type": ["container", "network"]})
    for ev in events:
        actor = ev.get("Actor") or {}
        cid = (actor.get("Attributes") or {}).get("container") if ev.get("Type") == "network" \
            else actor.get("ID")
        if cid in ids:
            action = f"{ev.get('Type')} {ev.get('Action') or ev.get('status')}"
            out.setdefault(action, []).append(ev["timeNano"] / 1e9)
            per.setdefault(cid, {})[action] = ev["timeNano"] / 1e9
    return out, per


def measure_burst(proxy: EdgeProxy, counter: DockerApiCounter, fleet: Fleet,
                  indexes: list[int], run: bool) -> dict[str, Any]:
    """Start B containers at once and time until every one is routable in /routes. By default
    they are created first (the proxy sees the creates, then the burst is only starts); with
    `run` each is created and started in one go, like `docker run`."""
    create_s, create_calls = None, None
    if not run:
        t_create = time.time()
        created_index = len(counter.calls)
        fleet.create(indexes)
        create_s = round(time.time() - t_create, 3)
        settle(counter)
        create_calls = call_counts(counter.since(created_index), set(fleet.ids.values()))
    swaps_before = proxy.admin_json("/routes")["swaps"]
    metrics_before = proxy.metrics()
    index = len(counter.calls)
    t0 = time.time()
    if run:
        fleet.run(indexes)
    else:
        fleet.start(indexes)
    t_calls_done = time.time()
    ids = {fleet.ids[i] for i in indexes}
    want = {fleet.path(i): fleet.ids[i] for i in indexes}
    seen = wait_routes(proxy, want)
    t_routes = seen.t
    ok, t_ok = check_routable(proxy, fleet, indexes)
    settle(counter)
    t_settled = time.time()
    calls = counter.since(index)
    swaps_after = proxy.admin_json("/routes")["swaps"]
    metrics_after = proxy.metrics()
    events, per_container = start_events(fleet.api, ids, t0 - 0.001, time.time())
    starts = events.get("container start", [])
    if len(starts) != len(indexes):
        log(f"warning: {len(starts)} start events found for {len(indexes)} containers; "
            "using State.StartedAt")
        starts = [iso_time(fleet.api.inspect_container(cid)["State"]["StartedAt"][:26] + "Z")
                  for cid in ids]
    last_start = max(starts)
    logged = routable_times(proxy.log, set(want), t0)
    t_logged = max(logged.values()) if len(logged) == len(want) else None
    # Per container: its start event -> its route logged with an eligible replica.
    each = sorted(logged[fleet.path(i)] - per_container[fleet.ids[i]]["container start"]
                  for i in indexes if fleet.path(i) in logged
                  and "container start" in per_container.get(fleet.ids[i], {}))

    def delta(name: str) -> float | None:
        if name in metrics_before and name in metrics_after:
            return metrics_after[name] - metrics_before[name]
        return None

    lag_n, lag_sum = (delta("edgeproxy_docker_event_lag_seconds_count"),
                      delta("edgeproxy_docker_event_lag_seconds_sum"))
    counts = call_counts(calls, set(fleet.ids.values()))
    inspect_ms = sorted((c.last_byte - c.t) * 1000 for c in calls
                        if c.kind == "inspect" and c.last_byte)
    n_events = sum(len(v) for v in events.values())
    return {
        "containers": len(indexes),
        "mode": "run" if run else "create, then start",
        "create_s": create_s,
        "api_calls_after_create": create_calls,
        "start_calls_s": round(t_calls_done - t0, 3),
        "first_to_last_start_event_s": round(last_start - min(starts), 3),
        "last_start_event_to_routes_s": round(t_routes - last_start, 3),
        "start_event_to_route_logged_ms_median": round(each[len(each) // 2] * 1000, 1)
        if each else None,
        "start_event_to_route_logged_ms_max": round(each[-1] * 1000, 1) if each else None,
        "last_start_event_to_last_route_logged_s": (round(t_logged - last_start, 3)
                                                    if t_logged else None),
        "last_start_event_to_all_answer_200_s": round(t_ok - last_start, 3)
        if ok == len(indexes) else None,
        "routes_polls": seen.polls,
        "routes_poll_ms_median": seen.poll_ms_median,
        "routes_poll_ms_max": seen.poll_ms_max,
        "routable": ok,
        "table_swaps": swaps_after - swaps_before,
        "table_swaps_metric": delta("edgeproxy_table_swaps_total"),
        "docker_events": {k: len(v) for k, v in sorted(events.items())},
        "api_calls": counts,
        "inspects_per_started_container": round(counts.get("inspect", 0) / len(indexes), 2),
        "inspects_per_event": round(counts.get("inspect", 0) / n_events, 2) if n_events else None,
        "inspect_ms_median": round(inspect_ms[len(inspect_ms) // 2], 1) if inspect_ms else None,
        "inspect_ms_max": round(inspect_ms[-1], 1) if inspect_ms else None,
        "event_lag_mean_ms": round(lag_sum / lag_n * 1000, 1) if lag_n and lag_sum is not None
        else None,
        "settled_after_start_s": round(t_settled - t0, 3),
        # Each inspect: which container, when it was sent and answered, and when that
        # container's network connect and start events happened (s after the first start call).
        "inspect_calls": [
            {"container": (c.container or "")[:12], "sent_s": round(c.t - t0, 4),
             "answered_s": round(c.last_byte - t0, 4) if c.last_byte else None,
             **{k.replace(" ", "_") + "_s": round(v - t0, 4) for k, v in per_container.get(
                 next((i for i in ids if i.startswith(c.container or "-")), ""), {}).items()}}
            for c in calls if c.kind == "inspect"],
    }


# --- report -----------------------------------------------------------------------------------

def machine_info(api: Any) -> dict[str, Any]:
    """Cores, CPU model, kernel, memory and versions."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "edgeproxy"],
                           capture_output=True, text=True, check=False).stdout.strip()
    version = api.version()
    info: dict[str, Any] = {
        "cores": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
        "memory_gb": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "python": platform.python_version(),
        "docker_engine": version.get("Version"), "docker_api": version.get("ApiVersion"),
        "docker_sdk": docker.__version__,
        "edgeproxy_commit": (git or "unknown") + (" + uncommitted changes in edgeproxy/"
                                                  if dirty else ""),
    }
    for mod in ("aiohttp", "uvloop", "orjson"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = "not installed"
    return info


def goals(sync: dict[str, Any], burst: dict[str, Any] | None, memory: dict[str, Any],
          spread: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The issue's discovery goals, each with its value and whether it is met."""
    out = []

    def goal(name: str, value: float | None, op: str, target: float) -> None:
        met = None if value is None else (value <= target if op == "<=" else
                                          value < target if op == "<" else value == target)
        out.append({"goal": name, "value": value, "target": f"{op} {target:g}", "met": met})

    goal("sync: Docker list calls", sync["api_calls"].get("list", 0), "==", 1)
    goal(f"sync: s from list answer to {sync['containers']} routes",
         sync["list_answer_to_routes_s"], "<", 1)
    if burst is not None:
        goal(f"burst: s from last start to {burst['containers']} routes",
             burst["last_start_event_to_routes_s"], "<", 2)
    goal(f"RSS MB per worker with {memory['routes']} routes", memory["rss_mb"], "<", 100)
    if spread is not None:
        goal("workers: ms from first to last worker per swap (max)", spread["spread_ms_max"],
             "<", 50)
    return out


def table(sync: dict[str, Any], burst: dict[str, Any] | None, memory: dict[str, Any],
          spread: dict[str, Any] | None = None) -> str:
    """Two aligned columns: what and how much."""
    def calls(counts: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"

    n = sync["containers"]
    rows = [
        ("sync", "process start -> listening", f"{sync['process_start_to_listening_s']} s"),
        ("sync", "process start -> docker_connected",
         f"{sync['process_start_to_docker_connected_s']} s"),
        ("sync", "list request -> last byte of its answer",
         f"{sync['list_request_to_answer_s']} s ({sync['list_answer_bytes']:,} bytes, "
         f"{sync['containers_listed']} containers)"),
        ("sync", "list answer -> docker_connected", f"{sync['list_answer_to_docker_connected_s']} s"),
        ("sync", f"list answer -> last of {n} routes logged",
         f"{sync['list_answer_to_last_route_logged_s']} s"),
        ("sync", f"list answer -> /routes lists all {n}", f"{sync['list_answer_to_routes_s']} s"),
        ("sync", "docker_connected -> /routes lists all", f"{sync['docker_connected_to_routes_s']} s"),
        ("sync", "Docker API calls until then", calls(sync["api_calls"])),
        ("sync", "table swaps", str(sync["table_swaps"])),
        ("sync", "one GET /routes while polling: median, max",
         f"{sync['routes_poll_ms_median']} ms, {sync['routes_poll_ms_max']} ms"),
        ("sync", "answer 200 through the proxy", f"{sync['routable']}/{n}"),
    ]
    if burst is not None:
        b = burst["containers"]
        rows += [
            ("burst", f"{burst['mode']}: the start calls for {b}", f"{burst['start_calls_s']} s"),
            ("burst", "first -> last start event", f"{burst['first_to_last_start_event_s']} s"),
            ("burst", f"last start event -> last of {b} routes logged routable",
             f"{burst['last_start_event_to_last_route_logged_s']} s"),
            ("burst", "each start event -> its route logged: median, max",
             f"{burst['start_event_to_route_logged_ms_median']} ms, "
             f"{burst['start_event_to_route_logged_ms_max']} ms"),
            ("burst", f"last start event -> /routes lists all {b}",
             f"{burst['last_start_event_to_routes_s']} s"),
            ("burst", f"last start event -> all {b} answer 200",
             f"{burst['last_start_event_to_all_answer_200_s']} s"),
            ("burst", "table swaps", f"{burst['table_swaps']}"),
            ("burst", "Docker events seen (ours)", calls(burst["docker_events"])),
            ("burst", "Docker API calls", calls(burst["api_calls"])),
            ("burst", "inspects per started container", f"{burst['inspects_per_started_container']}"),
            ("burst", "mean event lag (event -> watcher)", f"{burst['event_lag_mean_ms']} ms"),
            ("burst", "one inspect call: median, max",
             f"{burst['inspect_ms_median']} ms, {burst['inspect_ms_max']} ms"),
            ("burst", "answer 200 through the proxy", f"{burst['routable']}/{b}"),
        ]
        if burst["api_calls_after_create"] is not None:
            rows.append(("burst", f"Docker API calls after the {b} creates (before the starts)",
                         calls(burst["api_calls_after_create"])))
    rows += [
        ("memory", f"RSS with {memory['routes']} routes", f"{memory['rss_mb']:.1f} MB"),
        ("memory", "peak RSS (VmHWM)", f"{memory['peak_rss_mb']:.1f} MB"),
        ("memory", f"RSS after the sync ({n} routes)", f"{memory['rss_after_sync_mb']:.1f} MB"),
    ]
    if spread is not None:
        rows += [
            ("workers", "table swaps received by every worker", str(spread["swaps_measured"])),
            ("workers", "first -> last worker per swap: median, max",
             f"{spread['spread_ms_median']} ms, {spread['spread_ms_max']} ms"),
            ("workers", "publish -> worker has it: median, max",
             f"{spread['publish_to_arrival_ms_median']} ms, "
             f"{spread['publish_to_arrival_ms_max']} ms"),
        ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows)


# --- main -------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--containers", type=int, default=200,
                   help="labelled containers running before edgeproxy starts")
    p.add_argument("--burst", type=int, default=50,
                   help="containers started at once while it runs (0: skip the burst)")
    p.add_argument("--burst-run", action="store_true",
                   help="create and start each burst container in one go, like `docker run` "
                        "(default: create them all first, then start them all at once)")
    p.add_argument("--parallel", type=int, default=8,
                   help="concurrent Docker calls when creating and starting containers")
    p.add_argument("--workers", type=int, default=1,
                   help="EDGEPROXY_WORKERS; above 1 the swap spread across workers is measured")
    p.add_argument("--docker-socket", default="/var/run/docker.sock",
                   help="the Docker socket the forwarder relays to")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results",
                   help="where discovery.json goes (default: bench/results)")
    p.add_argument("--keep", action="store_true",
                   help="keep the work directory (edgeproxy's log) and print its path")
    args = p.parse_args(argv)
    if args.containers < 1 or args.burst < 0 or args.parallel < 1:
        p.error("--containers and --parallel must be at least 1, --burst at least 0")
    return args


def _interrupt(signum: int, _frame: object) -> None:
    # SIGTERM takes the same path as Ctrl-C: the finally block removes everything.
    raise KeyboardInterrupt(signum)


def main(argv: list[str] | None = None) -> int:
    """Run it; 1 on a failure, 130 on Ctrl-C, else 0 (goals never change the exit code)."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        engine.ensure_dockerd()
        image = engine.ensure_busybox_image()
    except (engine.EngineError, subprocess.SubprocessError, OSError) as exc:
        log(f"no Docker Engine: {exc}")
        return 1
    api = docker.APIClient(base_url=f"unix://{args.docker_socket}", version="auto", timeout=60)
    stale = api.containers(all=True, filters={"label": f"{BENCH_LABEL}=1"})
    if stale:
        log(f"{len(stale)} containers labelled {BENCH_LABEL}=1 exist (another run, or one that "
            "was killed); their paths would conflict. Remove them with:\n"
            f"  docker rm -f $(docker ps -aq --filter label={BENCH_LABEL}=1)")
        return 2

    token = secrets.token_hex(3)
    work = Path(tempfile.mkdtemp(prefix="edgeproxy-discovery-"))
    fleet = Fleet(api, image, token, args.parallel)
    counter = DockerApiCounter(args.docker_socket)
    proxy: EdgeProxy | None = None
    started = time.time()
    sync_idx = list(range(args.containers))
    burst_idx = list(range(args.containers, args.containers + args.burst))
    try:
        info = machine_info(api)
        log(f"run {token}; work dir {work}; {info['cpu']}, {info['cores']} cores, "
            f"Docker {info['docker_engine']}, load {' '.join(info['loadavg_at_start'])}")
        t = time.monotonic()
        fleet.create(sync_idx)
        fleet.start(sync_idx)
        fleet.wait_running(sync_idx)
        setup_s = time.monotonic() - t
        log(f"{args.containers} containers created and running in {setup_s:.1f}s")

        counter.start()
        proxy = EdgeProxy(work, counter.port, args.workers)
        sync = measure_sync(proxy, counter, fleet, sync_idx, 0)
        rss_sync = proxy.memory_mb()["VmRSS"]
        log(f"sync: {sync['list_answer_to_routes_s']}s from the list's answer to "
            f"{args.containers} routes; calls {sync['api_calls']}")

        burst = None
        if burst_idx:
            burst = measure_burst(proxy, counter, fleet, burst_idx, args.burst_run)
            log(f"burst: {burst['last_start_event_to_routes_s']}s from the last start event to "
                f"{args.burst} routes; {burst['table_swaps']} swaps; calls {burst['api_calls']}")
        time.sleep(0.5)
        mem = proxy.memory_mb()
        memory = {"routes": len(sync_idx) + len(burst_idx), "rss_mb": round(mem["VmRSS"], 1),
                  "peak_rss_mb": round(mem["VmHWM"], 1), "rss_after_sync_mb": round(rss_sync, 1)}
        spread = (swap_spread(proxy.log, args.workers, proxy.t_spawn)
                  if args.workers > 1 else None)
        if spread is not None:
            log(f"workers: {spread['swaps_measured']} swaps, first to last worker "
                f"{spread['spread_ms_median']} ms median, {spread['spread_ms_max']} ms max")
        foreign = sum(1 for c in counter.calls if c.kind == "inspect"
                      and not any(cid.startswith(c.container or "-")
                                  for cid in fleet.ids.values()))
    except KeyboardInterrupt:
        log("interrupted; removing everything started")
        return 130
    except (BenchError, docker.errors.DockerException, OSError) as exc:
        log(f"failed: {exc}")
        if proxy is not None:
            log(proxy.log.tail())
        return 1
    finally:
        if proxy is not None:
            proxy.stop()
        counter.stop()
        try:
            removed = fleet.remove_all()
            log(f"removed {removed} containers of run {token}")
        except (docker.errors.DockerException, OSError) as exc:
            log(f"could not remove the containers ({exc}); run:\n  docker rm -f "
                f"$(docker ps -aq --filter label={RUN_LABEL}={token})")
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    goal_list = goals(sync, burst, memory, spread)
    report = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "machine": info,
        "settings": {"containers": args.containers, "burst": args.burst,
                     "burst_run": args.burst_run, "parallel": args.parallel, "poll_s": POLL,
                     "workers": args.workers,
                     "setup_s": round(setup_s, 1)},
        "sync": sync, "burst": burst, "memory": memory, "workers_spread": spread,
        "foreign_inspects": foreign,
        "goals": goal_list,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "discovery.json").write_text(json.dumps(report, indent=2) + "\n")
    print(table(sync, burst, memory, spread))
    print()
    for g in goal_list:
        verdict = {True: "met", False: "not met", None: "n/a"}[g["met"]]
        value = "-" if g["value"] is None else g["value"]
        print(f"goal  {g['goal']:<42} {value:>8}  (target {g['target']}): {verdict}")
    if foreign:
        print(f"\nnote: {foreign} inspects of containers not ours (other work on this Docker)")
    print(f"\njson: {args.out / 'discovery.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
