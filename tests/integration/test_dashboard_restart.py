"""The dashboard's "recent changes" survive a proxy restart (EDGEPROXY_STATE_DIR), and say what
changed; no Docker needed: routes-file routes only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import requests
from helpers import ProxyProcess, free_port, run_proxy, wait_for, write_routes


def first_snapshot(proxy: ProxyProcess) -> dict[str, Any]:
    with requests.get(proxy.admin_base + "/events", stream=True, timeout=5) as r:
        line = next(x for x in r.iter_lines() if x.startswith(b"data: "))
    return json.loads(line[len(b"data: "):])  # type: ignore[no-any-return]


def test_recent_changes_are_kept_across_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    saved = state / "dashboard-changes.json"
    upstream = f"http://127.0.0.1:{free_port()}"
    routes = write_routes(tmp_path / "routes.toml", {"before": {"path": "/before",
                                                                "upstreams": [upstream]}})
    with run_proxy(tmp_path, docker="false", routes_file=str(routes), state_dir=str(state)) as p:
        changes = first_snapshot(p)["changes"]
        assert [(c["event"], c["route"]) for c in changes] == [("route_added", "before")]
        assert changes[0]["what"] == [f"replica {upstream} (running)"]
        # Written within about a second, without waiting for the shutdown.
        wait_for(lambda: saved.exists() and "before" in saved.read_text(), 5,
                 what="the changes file")

    write_routes(routes, {"after": {"path": "/after", "upstreams": [upstream]}})
    with run_proxy(tmp_path, docker="false", routes_file=str(routes), state_dir=str(state)) as p:
        changes = first_snapshot(p)["changes"]  # newest first
        assert [(c["event"], c["route"]) for c in changes] == [
            ("route_added", "after"), ("proxy_started", ""), ("route_added", "before")]


def test_a_state_dir_that_does_not_exist_is_no_problem(tmp_path: Path) -> None:
    routes = write_routes(tmp_path / "routes.toml", {
        "a": {"path": "/a", "upstreams": [f"http://127.0.0.1:{free_port()}"]}})
    with run_proxy(tmp_path, docker="false", routes_file=str(routes),
                   state_dir=str(tmp_path / "missing")) as p:
        assert [c["route"] for c in first_snapshot(p)["changes"]] == ["a"]
    assert not (tmp_path / "missing").exists()
