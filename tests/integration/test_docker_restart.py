"""The Docker daemon restarts under the proxy: keep serving, reconnect, resync, route new work."""

from __future__ import annotations

import threading
from pathlib import Path

import engine
import requests
from docker_fixtures import run_container, unique
from helpers import run_proxy, wait_for


def test_dockerd_restart_keeps_serving_and_resyncs(docker_engine: None, tmp_path: Path) -> None:
    before, after = "/" + unique("before"), "/" + unique("after")
    run_container(unique("c"), {"gateway.path": before, "gateway.strip_prefix": "true"})
    with run_proxy(tmp_path, docker_backoff_max="500ms") as p:
        wait_for(lambda: requests.get(p.url(before + "/"), timeout=5).status_code == 200, 10,
                 what="route before the restart")
        statuses: list[int] = []
        stop = threading.Event()

        def load() -> None:
            with requests.Session() as s:
                while not stop.is_set() and len(statuses) < 5000:
                    statuses.append(s.get(p.url(before + "/"), timeout=5).status_code)

        t = threading.Thread(target=load)
        t.start()
        try:
            argv = engine.stop_dockerd()
            # The daemon is gone: the proxy notices and keeps serving the last table.
            wait_for(lambda: p.admin("/healthz", ok=(200, 503))["docker"] == "disconnected", 10,
                     what="proxy to notice the daemon is gone")
            served_while_down = len(statuses)
            wait_for(lambda: len(statuses) > served_while_down + 20, 10,
                     what="requests served while dockerd is down")
            engine.start_dockerd(argv)
            wait_for(lambda: p.admin("/healthz")["docker"] == "connected", 15,
                     what="proxy to reconnect")
        finally:
            stop.set()
            t.join(30)
        assert statuses and set(statuses) == {200}, sorted(set(statuses))
        assert p.events("docker_disconnected")
        assert p.events("docker_resynced")

        # A container started right after the restart is routed.
        run_container(unique("c"), {"gateway.path": after, "gateway.strip_prefix": "true"})
        wait_for(lambda: requests.get(p.url(after + "/"), timeout=5).status_code == 200, 5,
                 what="route of a container started after the restart")
        assert requests.get(p.url(before + "/"), timeout=5).status_code == 200
