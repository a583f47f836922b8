"""Swarm discovery: the cost of one poll with many services, and `service scale` -> routable.

Measures issue #17's benchmark on the swarm-mode test daemon (tests/swarm_engine.py, a second
dockerd beside the main one; started if needed):

- S services (default 50) of T busybox tasks (default 4) on one overlay network, labelled
  `gateway.path=/sN` and `gateway.port=80`, run before edgeproxy starts;
- start-up: how long from edgeproxy's spawn until `GET /routes` lists every task as an eligible
  replica of its service's route;
- poll cost: over a quiet window (default 10 s), the Docker API calls per poll cycle (the goal:
  one filtered `GET /tasks`, never an inspect per task or a node lookup), and each `GET /tasks`
  answer's milliseconds and bytes as the proxy saw them;
- scale: `docker service scale` of K services (default 10) from T to T + 2 tasks at once. For
  each new task, the time from Docker's own "running" timestamp to `GET /routes` listing its
  address as eligible (goal: < 1.5 s, against Traefik's 15 s default poll), and from the
  scale command to the last new task routable.

    .venv/bin/python bench/discovery_swarm.py [--services 50] [--tasks 4] [--scale 10]

edgeproxy runs on the host (not as a service: routes are read from its admin API, nothing is
proxied) with EDGEPROXY_SWARM=true and reaches the swarm daemon through bench/discovery.py's
counting forwarder. Every service and the network carry `edgeproxy-bench.run=<token>` and are
removed at the end, also on Ctrl-C and errors. Writes OUT/discovery-swarm.json. The goals are
printed for reading, never as a pass/fail exit code. Like every bench script it saturates the
CPUs of a small machine: not a test.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import docker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
import engine  # noqa: E402
import swarm_engine  # noqa: E402 - the swarm-mode test daemon
from discovery import (  # noqa: E402
    POLL,
    BenchError,
    DockerApiCounter,
    EdgeProxy,
    _interrupt,
    iso_time,
    parallel,
)
from run import log  # noqa: E402

BENCH_LABEL = "edgeproxy-bench"
RUN_LABEL = "edgeproxy-bench.run"


def sw(*args: str, timeout: float = 120.0) -> str:
    """docker against the swarm daemon."""
    return swarm_engine.docker(*args, timeout=timeout)


class Services:
    """This run's services and their overlay network on the swarm daemon."""

    def __init__(self, api: Any, token: str, workers: int) -> None:
        self.api = api
        self.token = token
        self.workers = workers
        self.network = f"epb-{token}"
        self.names: dict[int, str] = {}

    def path(self, i: int) -> str:
        return f"/s{i}"

    def create(self, indexes: list[int], tasks: int) -> None:
        # A /20: the default /24 holds 50 services x 4 tasks plus their VIPs, and no more
        # (the scaled tasks then wait for an address for ever).
        sw("network", "create", "--driver", "overlay", "--subnet", "10.235.0.0/20",
           "--label", f"{RUN_LABEL}={self.token}", self.network)

        def one(i: int) -> None:
            name = f"epb-{self.token}-s{i}"
            sw("service", "create", "--detach", "--name", name, "--network", self.network,
               "--replicas", str(tasks), "--init", "--label", f"{BENCH_LABEL}=1",
               "--label", f"{RUN_LABEL}={self.token}", "--label", f"gateway.path={self.path(i)}",
               "--label", "gateway.port=80", engine.BUSYBOX_IMAGE)
            self.names[i] = name

        parallel(one, indexes, self.workers)

    def running_tasks(self) -> dict[str, list[dict[str, Any]]]:
        """Service name -> its tasks running with desired state running."""
        tasks = self.api.tasks(filters={"desired-state": "running"})
        by_id = {s["ID"]: s["Spec"]["Name"] for s in self.api.services(
            filters={"label": f"{RUN_LABEL}={self.token}"})}
        out: dict[str, list[dict[str, Any]]] = {}
        for t in tasks:
            name = by_id.get(t["ServiceID"])
            if name is not None and t["Status"]["State"] == "running":
                out.setdefault(name, []).append(t)
        return out

    def address(self, task: dict[str, Any]) -> str | None:
        """The task's address:port on this run's network."""
        for att in task.get("NetworksAttachments") or ():
            if att["Network"]["Spec"]["Name"] == self.network and att.get("Addresses"):
                return f"{att['Addresses'][0].split('/')[0]}:80"  # as /routes shows it
        return None

    def wait_running(self, want: dict[str, int], timeout: float = 300.0
                     ) -> dict[str, list[dict[str, Any]]]:
        deadline = time.monotonic() + timeout
        while True:
            tasks = self.running_tasks()
            short = {n: k - len(tasks.get(n, ())) for n, k in want.items()}
            if all(v <= 0 for v in short.values()):
                return tasks
            if time.monotonic() > deadline:
                raise BenchError(f"{sum(v for v in short.values() if v > 0)} tasks not running "
                                 f"after {timeout}s")
            time.sleep(0.5)

    def remove_all(self) -> None:
        ids = sw("service", "ls", "-q", "--filter", f"label={RUN_LABEL}={self.token}").split()
        if ids:
            sw("service", "rm", *ids)
        deadline = time.monotonic() + 120
        while True:
            try:
                nets = sw("network", "ls", "-q", "--filter",
                          f"label={RUN_LABEL}={self.token}").split()
                if nets:
                    sw("network", "rm", *nets)
                return
            except engine.EngineError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)


def eligible(proxy: EdgeProxy) -> dict[str, set[str]]:
    """GET /routes -> path -> addresses of its eligible replicas."""
    out: dict[str, set[str]] = {}
    for r in proxy.admin_json("/routes").get("routes", ()):
        addrs = {u["address"] for u in r.get("replicas", ()) if u.get("eligible")}
        for p in r.get("paths", ()):
            out.setdefault(p, set()).update(addrs)
    return out


def wait_addresses(proxy: EdgeProxy, want: dict[str, set[str]], timeout: float = 60.0
                   ) -> dict[str, float]:
    """Poll GET /routes until every wanted address is eligible on its path; address -> when
    (epoch seconds) it was first seen eligible."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    total = sum(len(v) for v in want.values())
    while len(seen) < total:
        proxy.check_alive()
        if time.monotonic() > deadline:
            raise BenchError(f"{total - len(seen)} of {total} task addresses not routable after "
                             f"{timeout}s:\n{proxy.log.tail()}")
        try:
            table = eligible(proxy)
        except (OSError, ValueError, BenchError):
            time.sleep(POLL)
            continue
        now = time.time()
        for path, addrs in want.items():
            for a in addrs & table.get(path, set()):
                seen.setdefault(f"{path} {a}", now)
        time.sleep(POLL)
    return seen


class RouteWatch:
    """Polls GET /routes every POLL seconds in a thread from `start()` on: `path address` ->
    when (epoch seconds) it was first seen eligible. Started before `docker service scale`,
    so a task routed while others still start is timed when it was routed, not when the
    script got round to looking (waiting for every task to run first inflated the figure)."""

    def __init__(self, proxy: EdgeProxy) -> None:
        self.proxy = proxy
        self.first: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                table = eligible(self.proxy)
            except (OSError, ValueError, BenchError):
                table = {}
            now = time.time()
            for path, addrs in table.items():
                for a in addrs:
                    self.first.setdefault(f"{path} {a}", now)
            self._stop.wait(POLL)


def _addr_of(key: str) -> str:
    return key.split(" ", 1)[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--services", type=int, default=50)
    p.add_argument("--tasks", type=int, default=4, help="tasks per service at start")
    p.add_argument("--scale", type=int, default=10,
                   help="services scaled from --tasks to --tasks + 2 at once")
    p.add_argument("--window", type=float, default=10.0,
                   help="quiet seconds over which the poll cost is measured")
    p.add_argument("--poll", type=float, default=1.0, help="EDGEPROXY_SWARM_POLL")
    p.add_argument("--parallel", type=int, default=8)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    if args.services < 1 or args.tasks < 1 or not 0 <= args.scale <= args.services:
        p.error("--services and --tasks at least 1, --scale between 0 and --services")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run it; 1 on a failure, 130 on Ctrl-C, else 0."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        swarm_engine.ensure()
    except (engine.EngineError, subprocess.SubprocessError, OSError) as exc:
        log(f"no swarm daemon: {exc}")
        return 1
    api = docker.APIClient(base_url=swarm_engine.HOST, version="auto", timeout=60)
    token = secrets.token_hex(3)
    work = Path(tempfile.mkdtemp(prefix="edgeproxy-discovery-swarm-"))
    services = Services(api, token, args.parallel)
    counter = DockerApiCounter(str(swarm_engine.SOCKET))
    proxy: EdgeProxy | None = None
    started = time.time()
    idx = list(range(args.services))
    try:
        t = time.monotonic()
        services.create(idx, args.tasks)
        tasks = services.wait_running({services.names[i]: args.tasks for i in idx})
        setup_s = round(time.monotonic() - t, 1)
        log(f"{args.services} services x {args.tasks} tasks running in {setup_s}s")

        counter.start()
        proxy = EdgeProxy(work, counter.port, 1, {
            "EDGEPROXY_SWARM": "true", "EDGEPROXY_SWARM_POLL": str(args.poll),
            "EDGEPROXY_NETWORK": services.network, "EDGEPROXY_ACCESS_LOG": "false"})
        want = {services.path(i): {a for tk in tasks[services.names[i]]
                                   if (a := services.address(tk))} for i in idx}
        seen = wait_addresses(proxy, want, timeout=120)
        startup = {"tasks": len(seen),
                   "spawn_to_all_routable_s": round(max(seen.values()) - proxy.t_spawn, 2)}
        log(f"start-up: {startup['tasks']} tasks routable "
            f"{startup['spawn_to_all_routable_s']}s after spawn")

        time.sleep(2.5)  # past the fast polls that follow start-up
        first = len(counter.calls)
        t0 = time.time()
        time.sleep(args.window)
        window = [c for c in counter.calls[first:] if c.t <= t0 + args.window]
        by_path = Counter(f"{c.method} {c.path}" for c in window)
        task_calls = [c for c in window if c.path == "/tasks"]
        ms = [((c.last_byte or c.t) - c.t) * 1000 for c in task_calls]
        polls = len(task_calls)
        cost = {
            "window_s": args.window, "polls": polls,
            "calls": dict(sorted(by_path.items())),
            "calls_per_poll": round(len(window) / polls, 2) if polls else None,
            "inspects": sum(1 for c in window if c.kind == "inspect"),
            "node_lookups": sum(1 for c in window if c.path.startswith("/nodes")),
            "tasks_ms_median": round(statistics.median(ms), 1) if ms else None,
            "tasks_ms_max": round(max(ms), 1) if ms else None,
            "tasks_bytes_median": (int(statistics.median(c.bytes for c in task_calls))
                                   if task_calls else None),
        }
        log(f"poll cost: {cost}")

        scale = None
        if args.scale:
            names = [services.names[i] for i in idx[:args.scale]]
            before = {n: {tk["ID"] for tk in tasks[n]} for n in names}
            watch = RouteWatch(proxy)
            watch.start()
            try:
                t_cmd = time.time()
                sw("service", "scale", "--detach",
                   *(f"{n}={args.tasks + 2}" for n in names))
                now_tasks = services.wait_running({n: args.tasks + 2 for n in names},
                                                  timeout=600)
                new = {n: [tk for tk in now_tasks[n] if tk["ID"] not in before[n]]
                       for n in names}
                want_new = {services.path(i): {a for tk in new[services.names[i]]
                                               if (a := services.address(tk))}
                            for i in idx[:args.scale]}
                wait_addresses(proxy, want_new, timeout=60)
            finally:
                watch.stop()
            seen_new = {f"{p} {a}": watch.first[f"{p} {a}"]
                        for p, addrs in want_new.items() for a in addrs
                        if f"{p} {a}" in watch.first}
            running_at = {services.address(tk): iso_time(tk["Status"]["Timestamp"])
                          for n in names for tk in new[n]}
            lat = sorted(seen_new[k] - running_at[_addr_of(k)] for k in seen_new)
            scale = {
                "services": len(names), "new_tasks": len(lat),
                "running_to_routable_s_median": round(statistics.median(lat), 3),
                "running_to_routable_s_max": round(lat[-1], 3),
                "command_to_last_routable_s": round(max(seen_new.values()) - t_cmd, 2),
                "note": "routable is when this script's 20 ms poll of GET /routes saw it",
            }
            log(f"scale: {scale}")
    except KeyboardInterrupt:
        log("interrupted; removing everything started")
        return 130
    except (BenchError, docker.errors.DockerException, engine.EngineError, OSError) as exc:
        log(f"failed: {exc}")
        if proxy is not None:
            log(proxy.log.tail())
        return 1
    finally:
        if proxy is not None:
            proxy.stop()
        counter.stop()
        try:
            services.remove_all()
            log(f"removed the services and network of run {token}")
        except (engine.EngineError, OSError) as exc:
            log(f"could not remove run {token}'s services ({exc}); run: DOCKER_HOST="
                f"{swarm_engine.HOST} docker service rm $(docker service ls -q --filter "
                f"label={RUN_LABEL}={token})")
        shutil.rmtree(work, ignore_errors=True)

    report = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "settings": {"services": args.services, "tasks": args.tasks, "scale": args.scale,
                     "swarm_poll_s": args.poll, "setup_s": setup_s},
        "startup": startup, "poll_cost": cost, "scale": scale,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "discovery-swarm.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    if scale is not None:
        verdict = "met" if scale["running_to_routable_s_max"] < 1.5 else "not met"
        print(f"goal  task running -> routable < 1.5 s: max {scale['running_to_routable_s_max']}"
              f" s: {verdict}")
    print(f"json: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
