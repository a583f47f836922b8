"""One control plane per proxy: with EDGEPROXY_WORKERS=N the workers share one prober and one
table publisher, agree on the table, and survive each other's deaths (routes file only; the
Docker side is in test_docker_control_plane.py)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import requests
from helpers import ProxyProcess, run_backend, run_proxy, wait_for, write_routes


def fresh_get(url: str) -> requests.Response:
    # A new connection each time, so the kernel spreads requests over the workers.
    return requests.get(url, headers={"Connection": "close"}, timeout=5)


def children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out.update(int(c) for c in f.read().split())
    return out


def workers(p: ProxyProcess) -> dict[int, dict[str, Any]]:
    return {w["worker"]: w for w in p.admin("/healthz")["workers"]}


def control_pid(p: ProxyProcess) -> int:
    others = children(p.proc.pid) - {w["pid"] for w in workers(p).values()}
    assert len(others) == 1, f"expected one control plane beside the workers: {others}"
    return others.pop()


def agreed(p: ProxyProcess, n: int) -> int | None:
    """The table generation every one of `n` workers serves, once they all serve the same."""
    ws = workers(p)
    generations = {w["table"] for w in ws.values()}
    return generations.pop() if len(ws) == n and len(generations) == 1 else None


def served_by(p: ProxyProcess, path: str, n: int) -> Counter[tuple[Any, int]]:
    """Who answered the `n` requests to `path`, once all `n` access lines are written (each
    worker writes its own log lines, so one worker's may land after the others')."""
    def count() -> Counter[tuple[Any, int]] | None:
        got = Counter((e.get("worker"), e["status"]) for e in p.events("access")
                      if e.get("path") == path)
        return got if sum(got.values()) >= n else None
    return wait_for(count, 5, what=f"{n} access lines for {path}")


def seen(backend: str) -> list[str]:
    return list(requests.get(backend + "/__seen", timeout=5).json()["seen"])


def test_each_replica_is_probed_once_per_interval_whatever_the_workers(tmp_path: Path) -> None:
    with run_backend("probed") as backend:
        routes = write_routes(tmp_path / "routes.toml", {
            "probed": {"path": "/p", "upstreams": [backend],
                       "health.path": "/hc", "health.interval": "200ms",
                       "health.timeout": "100ms"},
        })
        with run_proxy(tmp_path, docker="false", routes_file=str(routes), workers="3"):
            start = seen(backend).count("GET /hc")
            began = time.monotonic()
            wait_for(lambda: time.monotonic() - began > 3.0, 5, what="3 s of probing")
            probes = seen(backend).count("GET /hc") - start
            # One prober: about 15 probes in 3 s. Three (one per worker) would send about 45.
            assert 10 <= probes <= 20, f"{probes} probes in 3 s at a 200 ms interval"


def test_workers_agree_on_the_table_after_each_change(tmp_path: Path) -> None:
    with run_backend("agree") as backend:
        path = tmp_path / "routes.toml"
        write_routes(path, {"base": {"path": "/base", "upstreams": [backend]}})
        with run_proxy(tmp_path, docker="false", routes_file=str(path), workers="3",
                       routes_file_poll="50ms") as p:
            first = wait_for(lambda: agreed(p, 3), 10, what="3 workers on one table")
            write_routes(path, {"base": {"path": "/base", "upstreams": [backend]},
                                "new": {"path": "/new", "upstreams": [backend]}})
            wait_for(lambda: "new" in p.routes(), 5, what="route 'new' in /routes")
            second = wait_for(lambda: (g := agreed(p, 3)) and g > first and g, 5,
                              what="every worker on the new table")
            codes = Counter(fresh_get(p.url("/new/x")).status_code for _ in range(60))
            assert codes == {200: 60}
            by_worker = served_by(p, "/new/x", 60)
            assert {w for w, _ in by_worker} == {0, 1, 2}, by_worker

            write_routes(path, {"base": {"path": "/base", "upstreams": [backend]}})
            wait_for(lambda: "new" not in p.routes(), 5, what="route 'new' gone from /routes")
            wait_for(lambda: (g := agreed(p, 3)) and g > second, 5,
                     what="every worker on the table without 'new'")
            codes = Counter(fresh_get(p.url("/new/y")).status_code for _ in range(60))
            assert codes == {404: 60}
            assert {w for w, _ in served_by(p, "/new/y", 60)} == {0, 1, 2}


class Loop:
    """Fresh-connection GETs in a thread, counting answers (connection errors apart)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.codes: Counter[int] = Counter()
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.codes[fresh_get(self.url).status_code] += 1
            except requests.RequestException:
                self.errors += 1  # a connection queued on a killed worker's socket is reset

    def __enter__(self) -> Loop:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)


def test_workers_keep_serving_while_the_control_plane_is_killed(tmp_path: Path) -> None:
    with run_backend("steady") as backend:
        path = tmp_path / "routes.toml"
        write_routes(path, {"steady": {"path": "/steady", "upstreams": [backend]}})
        with run_proxy(tmp_path, docker="false", routes_file=str(path), workers="2",
                       routes_file_poll="50ms") as p:
            wait_for(lambda: agreed(p, 2), 10, what="2 workers on one table")
            old = control_pid(p)
            with Loop(p.url("/steady/x")) as loop:
                wait_for(lambda: sum(loop.codes.values()) > 20, 10, what="traffic")
                os.kill(old, signal.SIGKILL)
                before = sum(loop.codes.values())
                wait_for(lambda: sum(loop.codes.values()) > before + 50, 10,
                         what="traffic while the control plane restarts")
                wait_for(lambda: control_pid(p) != old and agreed(p, 2), 15,
                         what="a new control plane, and the workers reconnected")
                # The new control plane reads the routes file afresh and republishes.
                write_routes(path, {"steady": {"path": "/steady", "upstreams": [backend]},
                                    "later": {"path": "/later", "upstreams": [backend]}})
                wait_for(lambda: fresh_get(p.url("/later/x")).status_code == 200, 10,
                         what="a route added after the restart")
            assert set(loop.codes) == {200}, loop.codes
            assert loop.errors == 0
            assert any(e.get("event") == "control_died" for e in p.events())


def test_a_killed_worker_serves_the_table_before_it_accepts(tmp_path: Path) -> None:
    with run_backend("restart") as backend:
        path = tmp_path / "routes.toml"
        write_routes(path, {"r": {"path": "/r", "upstreams": [backend]}})
        with run_proxy(tmp_path, docker="false", routes_file=str(path), workers="2") as p:
            wait_for(lambda: agreed(p, 2), 10, what="2 workers on one table")
            victim = workers(p)[1]["pid"]
            control = control_pid(p)
            with Loop(p.url("/r/x")) as loop:
                wait_for(lambda: sum(loop.codes.values()) > 20, 10, what="traffic")
                # A frozen control plane accepts the new worker's connection (the kernel does)
                # but sends no table: the new worker must not listen until it has one.
                os.kill(control, signal.SIGSTOP)
                try:
                    before = children(p.proc.pid)
                    os.kill(victim, signal.SIGKILL)
                    new = wait_for(lambda: children(p.proc.pid) - before, 15,
                                   what="worker 1 respawned").pop()
                    wait_for(lambda: any(e.get("event") == "control_waiting"
                                         and e.get("pid") == new for e in p.events())
                             or _listening(p, new), 15,
                             what="the new worker waiting for its table")
                    count = sum(loop.codes.values())
                    wait_for(lambda: sum(loop.codes.values()) > count + 100, 15,
                             what="traffic while the new worker waits")
                finally:
                    os.kill(control, signal.SIGCONT)
                wait_for(lambda: workers(p).get(1, {}).get("pid") == new, 15,
                         what="worker 1 restarted")

                def restarted() -> list[dict[str, Any]]:
                    died = _died_at(p)
                    return [e for e in p.events() if e.get("worker") == 1
                            and e.get("event") in ("access", "listening")
                            and e["timestamp"] > died]

                wait_for(lambda: sum(e["event"] == "access" for e in restarted()) >= 10, 10,
                         what="the new worker 1 serving")
            # Connections queued on the dead worker's socket may be reset; none may get a 404.
            assert set(loop.codes) == {200}, loop.codes
            events = restarted()
            # It listened with the current table in hand (generation 0 means none yet).
            assert events[0]["event"] == "listening" and events[0]["table"] >= 1, events[0]
            assert {e["status"] for e in events if e["event"] == "access"} == {200}


def _listening(p: ProxyProcess, pid: int) -> bool:
    return any(e.get("event") == "listening" and e.get("pid") == pid for e in p.events())


def _died_at(p: ProxyProcess) -> str:
    died = [e["timestamp"] for e in p.events() if e.get("event") == "worker_died"]
    return died[-1] if died else "9999"
