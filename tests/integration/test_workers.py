"""EDGEPROXY_WORKERS: several processes on one port share the table, the limits and the metrics."""

from __future__ import annotations

from pathlib import Path

import requests
from helpers import run_backend, run_proxy, wait_for, write_routes
from prometheus_client.parser import text_string_to_metric_families


def fresh_get(url: str) -> requests.Response:
    # A new connection each time, so the kernel spreads requests over the workers.
    return requests.get(url, headers={"Connection": "close"}, timeout=5)


def test_workers_share_limits_and_metrics(tmp_path: Path) -> None:
    with run_backend("w") as backend:
        routes = write_routes(tmp_path / "routes.toml", {
            "limited": {"path": "/limited", "upstreams": [backend], "ratelimit": "10/m"},
            "open": {"path": "/open", "upstreams": [backend]},
        })
        with run_proxy(tmp_path, docker="false", routes_file=str(routes), workers="2") as p:
            codes = [fresh_get(p.url("/limited/x")).status_code for _ in range(30)]
            assert codes.count(200) == 10 and codes.count(429) == 20
            for _ in range(40):
                assert fresh_get(p.url("/open/x")).status_code == 200
            # Each worker writes its access lines in batches: wait for all 70 to land.
            lines = wait_for(lambda: (ev := p.events("access")) and len(ev) >= 70 and ev, 5,
                             what="70 access lines")
            workers = {e.get("worker") for e in lines}
            assert workers == {0, 1}, "both workers should have served requests"
            text = requests.get(p.admin_base + "/metrics", timeout=5).text
            totals: dict[str, float] = {}
            for family in text_string_to_metric_families(text):
                if family.name == "edgeproxy_requests":
                    for s in family.samples:
                        if s.name.endswith("_total"):
                            route = s.labels["route"]
                            totals[route] = totals.get(route, 0) + s.value
            assert totals["limited"] == 30 and totals["open"] == 40
        assert p.proc.returncode == 0
