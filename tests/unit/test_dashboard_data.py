"""The numbers and words behind the dashboard: 4xx and 5xx apart, p99 from histogram buckets,
the bounded sparkline ring, what a change record says, and changes kept across a restart."""

from __future__ import annotations

import json
import os
from collections import deque
from pathlib import Path

import pytest

from edgeproxy.control.watcher import Watcher, describe_change
from edgeproxy.core.settings import Settings
from edgeproxy.ops.dashboard import (
    ChangeStore,
    Counts,
    History,
    RateMeter,
    Traffic,
    collect_requests,
    quantile,
    restore_changes,
    traffic_between,
)
from edgeproxy.routes.model import Route, RouteSpec, Upstream
from edgeproxy.routes.table import RouteTable
from edgeproxy.telemetry.metrics import Metrics

BOUNDS = (0.01, 0.1, 1.0, float("inf"))


def counts(requests: float, c4: float = 0.0, c5: float = 0.0,
           buckets: tuple[float, ...] = ()) -> Counts:
    return Counts(requests, c4, c5, tuple(zip(BOUNDS, buckets, strict=True)) if buckets else ())


def test_4xx_and_5xx_are_counted_apart_from_the_real_metrics() -> None:
    metrics = Metrics(RouteTable)
    for status in (200, 401, 429, 429, 502):
        metrics.observe_request("a", "GET", status, 0.02)
    read = collect_requests(metrics)()
    assert (read["a"].requests, read["a"].c4xx, read["a"].c5xx) == (5.0, 3.0, 1.0)
    assert read["a"].buckets[-1] == (float("inf"), 5.0)
    # 0.02 s falls in the (0.01, 0.025] bucket: p99 is inside it.
    p99 = quantile(0.99, read["a"].buckets)
    assert p99 is not None and 0.01 < p99 <= 0.025


def test_a_route_refusing_almost_everything_does_not_show_zero_errors() -> None:
    t = traffic_between(counts(0), counts(100, c4=90), 10.0).as_json()
    assert t["rps"] == 10.0
    assert t["pct_4xx"] == 90.0 and t["pct_5xx"] == 0.0


def test_no_requests_in_the_window_shows_no_share() -> None:
    t = Traffic(rps=0.0, rate_4xx=0.0, rate_5xx=0.0).as_json()
    assert t["pct_4xx"] is None and t["pct_5xx"] is None and t["p99_ms"] is None


@pytest.mark.parametrize(("buckets", "expected"), [
    ((100, 100, 100, 100), 0.0099),  # all under 10 ms: interpolated in the first bucket
    ((0, 0, 100, 100), 0.1 + 0.9 * 0.99),  # all between 100 ms and 1 s
    ((50, 98, 99, 100), 1.0),  # the 99th request is the one at the top of (0.1, 1]
    ((0, 0, 0, 10), 1.0),  # beyond the last finite bound: that bound
    ((0, 0, 0, 0), None),
])
def test_quantile_interpolates_like_prometheus(buckets: tuple[float, ...],
                                               expected: float | None) -> None:
    got = quantile(0.99, tuple(zip(BOUNDS, buckets, strict=True)))
    assert got == (None if expected is None else pytest.approx(expected))


def test_rates_from_counter_deltas() -> None:
    """req/s, 4xx and 5xx over a sliding window; idle gaps; routes seen late."""
    now, totals = [0.0], {"a": counts(0)}
    meter = RateMeter(lambda: dict(totals), window=5.0, clock=lambda: now[0])
    assert meter.traffic()["a"].rps is None  # one sample: no rate yet
    now[0], totals["a"] = 1.0, counts(10, c4=3, c5=2)
    a = meter.traffic()["a"].as_json()
    assert (a["rps"], a["pct_4xx"], a["pct_5xx"]) == (10.0, 30.0, 20.0)
    now[0] = 7.0  # quiet since: the window moves past the burst
    assert meter.traffic()["a"].rps == 0.0
    now[0], totals["a"] = 100.0, counts(40, c5=2)  # nobody watched for a while
    assert meter.traffic()["a"].rps is None
    now[0], totals["a"], totals["b"] = 102.0, counts(50, c5=2), counts(3, c5=3)
    traffic = meter.traffic()
    assert traffic["a"].rps == 5.0
    assert traffic["b"].rps == 1.5 and traffic["b"].as_json()["pct_5xx"] == 100.0


def test_history_ring_is_bounded_per_route_and_in_routes() -> None:
    history = History(step=5.0, points=3, max_routes=2)
    assert not history.record(0.0, {"a": counts(0)})  # the first reading is only a base
    assert not history.record(2.0, {"a": counts(5)})  # less than a step: no point
    for i in range(1, 6):
        assert history.record(5.0 * i, {"a": counts(50 * i, c4=5 * i, c5=0,
                                                    buckets=(0, 10 * i, 10 * i, 50 * i)),
                                        "b": counts(i), "c": counts(i), "": counts(i)})
    a = history.series("a")
    assert a["t"] == [15.0, 20.0, 25.0]  # only the newest `points`
    assert a["rps"] == [10.0, 10.0, 10.0]
    assert a["pct_4xx"] == [10.0, 10.0, 10.0] and a["pct_5xx"] == [0.0, 0.0, 0.0]
    assert a["p99_ms"][-1] == pytest.approx(1000.0)  # 80 % of the step's requests took > 1 s
    assert history.series("b")["rps"] == [0.2, 0.2, 0.2]
    assert history.series("c")["t"] == []  # max_routes: a third route gets no ring
    assert history.series("")["t"] == []  # unmatched requests are no route's
    assert history.seq == 5
    history.record(30.0, {"a": counts(300)}, keep=["b"])
    assert history.series("a")["t"] == [] and len(history.series("b")["t"]) == 3


def test_history_with_no_traffic_draws_a_flat_line() -> None:
    history = History(step=1.0)
    history.record(0.0, {"a": counts(5)})
    history.record(1.0, {"a": counts(5)})
    assert history.series("a") == {"t": [1.0], "rps": [0.0], "p99_ms": [None],
                                   "pct_4xx": [0.0], "pct_5xx": [0.0]}


# --- change descriptions -------------------------------------------------------------------------

def up(name: str, host: str = "10.0.0.2", state: str = "running", reason: str = "",
       weight: int = 1) -> Upstream:
    return Upstream("http", host, 80, name, state=state, reason=reason,  # type: ignore[arg-type]
                    weight=weight)


def route(*upstreams: Upstream, source: str = "docker", **spec: object) -> Route:
    spec.setdefault("paths", ("/api",))
    return Route("api", source, RouteSpec(**spec), tuple(upstreams))  # type: ignore[arg-type]


def test_change_says_which_replica_and_which_setting() -> None:
    old = route(up("api-1"), up("api-2", "10.0.0.3"))
    new = route(up("api-1", state="unhealthy", reason="GET /healthz: 503"),
                up("api-3", "10.0.0.4", weight=5), strip_prefix=True, retries=0)
    assert describe_change(old, new) == [
        "strip_prefix false -> true",
        "retries unset -> 0",
        "replica api-1 running -> unhealthy (GET /healthz: 503)",
        "replica api-3 at 10.0.0.4:80 added (running)",
        "replica api-2 removed",
    ]


def test_change_descriptions_for_moves_weights_sources_and_structured_settings() -> None:
    from edgeproxy.routes.model import HealthSpec

    old = route(up("api-1"))
    new = route(up("api-1", "10.0.0.9", weight=3), source="held", paths=("/api", "/v2"),
                health=HealthSpec("/healthz"))
    assert describe_change(old, new) == [
        "source docker -> held",
        "path /api -> /api,/v2",
        "health.* changed",
        "replica api-1 moved 10.0.0.2:80 -> 10.0.0.9:80",
        "replica api-1 weight 1 -> 3",
    ]
    assert describe_change(None, old) == ["replica api-1 at 10.0.0.2:80 (running)"]
    stopped = route(up("api-1", "", state="stopped", reason="container is exited"))
    assert describe_change(old, stopped) == [
        "replica api-1 running -> stopped (container is exited)"]
    assert describe_change(None, stopped) == ["replica api-1 (stopped)"]
    assert describe_change(old, None) == ["last replica gone: api-1"]


def test_watcher_records_what_changed(tmp_path: Path) -> None:
    watcher = Watcher(Settings(docker=False, state_dir=tmp_path))
    one, two = RouteTable(routes=(route(up("api-1")),)), RouteTable(
        routes=(route(up("api-1", state="draining")),))
    watcher._log_diff(RouteTable(), one)
    watcher._log_diff(one, two)
    watcher._log_diff(two, RouteTable())
    assert [(c["event"], c["what"]) for c in watcher.changes] == [
        ("route_added", ["replica api-1 at 10.0.0.2:80 (running)"]),
        ("route_changed", ["replica api-1 running -> draining"]),
        ("route_removed", ["last replica gone: api-1"]),
    ]


# --- changes across a restart ---------------------------------------------------------------------

def test_changes_are_saved_only_when_they_moved_and_restored_before_new_ones(
        tmp_path: Path) -> None:
    store = ChangeStore(tmp_path)
    assert store.enabled
    earlier = [{"time": 10.0, "event": "route_added", "route": "api", "what": ["x"]}]
    store.save(earlier)
    path = tmp_path / "dashboard-changes.json"
    assert json.loads(path.read_text()) == earlier
    path.write_text("[]")
    store.save(list(earlier))  # unchanged since the last write: not written again
    assert path.read_text() == "[]"
    path.write_text(json.dumps([*earlier, {"junk": 1}, "x",
                                {"time": "no", "event": "e", "route": "r"}]))
    loaded = ChangeStore(tmp_path).load()
    assert loaded == earlier  # malformed entries are skipped

    watcher = Watcher(Settings(docker=False, state_dir=tmp_path))
    watcher.changes.append({"time": 20.0, "event": "route_added", "route": "web"})
    restore_changes(watcher, loaded, 15.0)
    assert [c["event"] for c in watcher.changes] == ["route_added", "proxy_started",
                                                      "route_added"]
    assert watcher.changes[0]["route"] == "api" and watcher.changes[2]["route"] == "web"


def test_restore_keeps_the_newest_within_the_bound(tmp_path: Path) -> None:
    watcher = Watcher(Settings(docker=False, state_dir=tmp_path))
    watcher.changes = deque(maxlen=3)
    watcher.changes.append({"time": 50.0, "event": "route_added", "route": "new"})
    restore_changes(watcher, [{"time": float(i), "event": "route_added", "route": f"r{i}"}
                              for i in range(5)], 40.0)
    assert [c["route"] for c in watcher.changes] == ["r4", "", "new"]


def test_a_missing_or_unwritable_folder_turns_saving_off(tmp_path: Path) -> None:
    assert not ChangeStore(tmp_path / "missing").enabled
    assert ChangeStore(tmp_path / "missing").load() == []
    store = ChangeStore(tmp_path)
    (tmp_path / f"dashboard-changes.{os.getpid()}.tmp").mkdir()  # the write fails: saving
    # stops, without raising
    store.save([{"time": 1.0, "event": "route_added", "route": "a"}])
    assert not store.enabled

