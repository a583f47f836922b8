"""Live dashboard on the admin listener: one self-contained page fed by server-sent events."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import Metric

from edgeproxy import __version__
from edgeproxy.control.watcher import Watcher
from edgeproxy.core.logs import get_logger
from edgeproxy.ops.views import route_json
from edgeproxy.telemetry.dataview import DataPlaneView
from edgeproxy.telemetry.metrics import Metrics, multiprocess_dir

PUSH_INTERVAL = 1.0
"""Seconds between snapshots when the table does not change (request rates move anyway)."""

RATE_WINDOW = 5.0
"""Seconds of counter history that request and error rates are averaged over."""

CHANGES_SHOWN = 30
"""Most recent route changes sent with each snapshot."""

_PAGE_RESOURCE = "static/dashboard.html"


@dataclass(frozen=True, slots=True)
class Counts:
    """Running totals for one route: answers, 4xx, 5xx, and the latency histogram's
    cumulative buckets as (upper bound in seconds, count), the last bound +Inf."""

    requests: float = 0.0
    c4xx: float = 0.0
    c5xx: float = 0.0
    buckets: tuple[tuple[float, float], ...] = ()

    def minus(self, base: Counts) -> Counts:
        """The counts since `base` (a counter that went backwards counts from zero)."""
        def d(a: float, b: float) -> float:
            return a - b if a >= b else a

        buckets = self.buckets
        if base.buckets and [b for b, _ in base.buckets] == [b for b, _ in buckets]:
            buckets = tuple((bound, d(a, b)) for (bound, a), (_, b)
                            in zip(buckets, base.buckets, strict=True))
        return Counts(d(self.requests, base.requests), d(self.c4xx, base.c4xx),
                      d(self.c5xx, base.c5xx), buckets)


def quantile(q: float, buckets: tuple[tuple[float, float], ...]) -> float | None:
    """The q-quantile from cumulative (bound, count) buckets, interpolated inside its bucket
    as Prometheus' histogram_quantile does; None without observations."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower  # beyond the last finite bound: the best we can say
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, count
    return lower


@dataclass(frozen=True, slots=True)
class Traffic:
    """Requests answered for one route: running totals and rates over the window."""

    requests: float = 0.0
    errors_4xx: float = 0.0
    errors_5xx: float = 0.0
    rps: float | None = None  # None until two samples exist
    rate_4xx: float | None = None
    rate_5xx: float | None = None
    p99: float | None = None  # seconds, over the window; None without requests in it

    def as_json(self) -> dict[str, Any]:
        """The shape the page reads: 4xx and 5xx apart, as shares of the request rate."""
        def pct(rate: float | None) -> float | None:
            # No share without requests in the window: "0 %" of nothing would look healthy.
            return None if not self.rps or rate is None else round(100.0 * rate / self.rps, 2)

        return {
            "requests": int(self.requests),
            "errors_4xx": int(self.errors_4xx),
            "errors_5xx": int(self.errors_5xx),
            "rps": None if self.rps is None else round(self.rps, 2),
            "pct_4xx": pct(self.rate_4xx),
            "pct_5xx": pct(self.rate_5xx),
            "p99_ms": None if self.p99 is None else round(self.p99 * 1000, 1),
        }


Totals = dict[str, Counts]  # route -> counts ("" for requests no route matched)


def request_totals(families: Iterable[Metric]) -> Totals:
    """Per-route counts from collected `edgeproxy_requests` and
    `edgeproxy_request_duration_seconds` samples."""
    counts: dict[str, list[float]] = {}
    buckets: dict[str, dict[float, float]] = {}
    for family in families:
        if family.name == "edgeproxy_requests":
            for s in family.samples:
                if not s.name.endswith("_total"):
                    continue
                c = counts.setdefault(s.labels.get("route", ""), [0.0, 0.0, 0.0])
                c[0] += s.value
                cls = s.labels.get("status_class")
                if cls == "4xx":
                    c[1] += s.value
                elif cls == "5xx":
                    c[2] += s.value
        elif family.name == "edgeproxy_request_duration_seconds":
            for s in family.samples:
                if s.name.endswith("_bucket"):
                    le = float(s.labels["le"])
                    per = buckets.setdefault(s.labels.get("route", ""), {})
                    per[le] = per.get(le, 0.0) + s.value  # workers' series add up
    out: Totals = {}
    for route, (total, c4, c5) in counts.items():
        per = buckets.get(route, {})
        out[route] = Counts(total, c4, c5, tuple(sorted(per.items())))
    return out


def collect_requests(metrics: Metrics) -> Callable[[], Totals]:
    """Reads this process's request metrics, or every worker's when metrics are shared."""
    counter: Any = metrics.requests
    duration: Any = metrics.duration
    folder = multiprocess_dir()
    if not folder:
        if counter is duration:  # one collector holds both
            return lambda: request_totals(counter.collect())
        return lambda: request_totals([*counter.collect(), *duration.collect()])
    from prometheus_client import multiprocess

    collector = multiprocess.MultiProcessCollector(None, path=folder)  # type: ignore[no-untyped-call]
    return lambda: request_totals(collector.collect())  # type: ignore[no-untyped-call]


def traffic_between(base: Counts, last: Counts, elapsed: float) -> Traffic:
    """Rates and p99 of what happened between two readings `elapsed` seconds apart."""
    if elapsed <= 0:
        return Traffic(last.requests, last.c4xx, last.c5xx)
    d = last.minus(base)
    return Traffic(last.requests, last.c4xx, last.c5xx, d.requests / elapsed, d.c4xx / elapsed,
                   d.c5xx / elapsed, quantile(0.99, d.buckets))


class RateMeter:
    """Rates from counter deltas over a sliding window; shared by every connected page."""

    def __init__(self, read: Callable[[], Totals], window: float = RATE_WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._read = read
        self._window = window
        self._clock = clock
        self._samples: deque[tuple[float, Totals]] = deque()
        self.span = 0.0  # seconds the last rates were measured over; 0 while unknown

    def traffic(self) -> dict[str, Traffic]:
        """Per-route totals and rates now; pages polling together share one sample."""
        now = self._clock()
        samples = self._samples
        # Several pages push every second: one read per quarter second is plenty.
        if not samples or now - samples[-1][0] >= 0.25:
            samples.append((now, self._read()))
        # A base from before nobody was watching would average over that idle time: drop it.
        while len(samples) > 1 and samples[0][0] < now - 2 * self._window:
            samples.popleft()
        # Keep one sample at or before the window's start as the base of the deltas.
        while len(samples) > 2 and samples[1][0] <= now - self._window:
            samples.popleft()
        base_time, base = samples[0]
        last_time, last = samples[-1]
        elapsed = self.span = last_time - base_time
        # A route missing from the base had not been counted yet: its base is zero.
        return {route: traffic_between(base.get(route, Counts()), counts, elapsed)
                for route, counts in last.items()}


HISTORY_STEP = 5.0
"""Seconds per sparkline point."""

HISTORY_POINTS = 120
"""Points kept per route: ten minutes at one point per HISTORY_STEP."""

HISTORY_MAX_ROUTES = 2000
"""Routes with a history at most; the ring of a route no longer in the table is dropped."""


class History:
    """Per-route sparkline points (request rate, p99, 4xx and 5xx shares), one per step, in a
    bounded ring per route; sampled on its own clock so the picture has no gaps while nobody
    watches."""

    def __init__(self, step: float = HISTORY_STEP, points: int = HISTORY_POINTS,
                 max_routes: int = HISTORY_MAX_ROUTES) -> None:
        self.step = step
        self.points = points
        self.max_routes = max_routes
        self.seq = 0  # bumped with every new point: pages re-draw only then
        self._last: tuple[float, Totals] | None = None
        self._rings: dict[str, deque[tuple[float, float, float | None, float, float]]] = {}

    def due(self, now: float) -> bool:
        """True when `record` would add a point (or take its first reading) at `now`."""
        return self._last is None or now - self._last[0] >= self.step * 0.9

    def record(self, now: float, totals: Totals, keep: Iterable[str] | None = None) -> bool:
        """Add a point per route when a step has passed since the last; True when added.
        `keep` names the routes still in the table; other rings are dropped."""
        if self._last is None:
            self._last = (now, totals)
            return False
        then, base = self._last
        elapsed = now - then
        if elapsed < self.step * 0.9:
            return False
        self._last = (now, totals)
        for route, counts in totals.items():
            if not route:
                continue  # unmatched requests belong to no route card
            t = traffic_between(base.get(route, Counts()), counts, elapsed)
            ring = self._rings.get(route)
            if ring is None:
                if len(self._rings) >= self.max_routes:
                    continue
                ring = self._rings[route] = deque(maxlen=self.points)
            rps = t.rps or 0.0
            ring.append((now, rps, None if t.p99 is None else t.p99 * 1000,
                         100.0 * (t.rate_4xx or 0.0) / rps if rps else 0.0,
                         100.0 * (t.rate_5xx or 0.0) / rps if rps else 0.0))
        if keep is not None:
            wanted = set(keep)
            for route in [r for r in self._rings if r not in wanted]:
                del self._rings[route]
        self.seq += 1
        return True

    def series(self, route: str) -> dict[str, list[Any]]:
        """The route's points as columns: time (epoch s), rps, p99_ms, pct_4xx, pct_5xx."""
        ring = self._rings.get(route, ())
        return {
            "t": [round(p[0], 1) for p in ring],
            "rps": [round(p[1], 2) for p in ring],
            "p99_ms": [None if p[2] is None else round(p[2], 1) for p in ring],
            "pct_4xx": [round(p[3], 1) for p in ring],
            "pct_5xx": [round(p[4], 1) for p in ring],
        }


def _docker_state(watcher: Watcher) -> str:
    if not watcher.settings.docker:
        return "disabled"
    return {True: "connected", False: "disconnected", None: "connecting"}[watcher.docker_connected]


def snapshot(watcher: Watcher, proxy: DataPlaneView, meter: RateMeter,
             history: History | None = None) -> dict[str, Any]:
    """Everything the page shows, as one JSON document; with `history`, each route's
    sparkline points too (sent only when they moved: they change once per step)."""
    traffic = meter.traffic()
    known = 0.0 if meter.span > 0 else None  # not counted yet, but measured: 0 req/s
    idle = Traffic(rps=known, rate_4xx=known, rate_5xx=known)
    table = watcher.table
    routes = []
    for r in table.routes:
        doc = route_json(r, proxy.balancer)
        doc["traffic"] = traffic.get(r.name, idle).as_json()
        if history is not None:
            doc["history"] = history.series(r.name)
        routes.append(doc)
    total = Traffic(
        sum(t.requests for t in traffic.values()),
        sum(t.errors_4xx for t in traffic.values()),
        sum(t.errors_5xx for t in traffic.values()),
        _sum_rates((t.rps for t in traffic.values()), known),
        _sum_rates((t.rate_4xx for t in traffic.values()), known),
        _sum_rates((t.rate_5xx for t in traffic.values()), known),
    )
    changes = list(watcher.changes)[-CHANGES_SHOWN:]
    changes.reverse()
    problems = [{"container": c.container, "reason": c.reason} for c in table.conflicts]
    problems += [{"container": d.container, "reason": d.reason} for d in table.decisions
                 if d.errors]
    return {
        "version": __version__,
        "time": time.time(),
        "docker": _docker_state(watcher),
        "swaps": watcher.swaps,
        "last_swap": watcher.last_swap or None,
        "in_flight": proxy.in_flight,
        "traffic": total.as_json(),
        "unrouted": traffic.get("", idle).as_json(),
        "routes": routes,
        "history_step_s": HISTORY_STEP,
        "changes": changes,
        "problems": problems,
    }


CHANGES_FILE = "dashboard-changes.json"
"""Recent changes kept across restarts, in EDGEPROXY_STATE_DIR."""

CHANGES_SAVE_INTERVAL = 1.0
"""Seconds between writes of the changes file, at most."""


class ChangeStore:
    """Recent changes in a small JSON file, so a restart does not wipe "what changed".

    Cheap or nothing: written at most once per CHANGES_SAVE_INTERVAL and only when the list
    moved; a folder that is missing or not writable turns it off (one log event)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / CHANGES_FILE
        self.enabled = folder.is_dir() and os.access(folder, os.W_OK)
        self._saved: object = None
        self._log = get_logger("dashboard")

    def load(self) -> list[dict[str, Any]]:
        """The changes saved by the last run; [] when there are none or the file is bad."""
        if not self.enabled:
            return []
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            self._log.warning("changes_file_unreadable", path=str(self.path), error=str(exc))
            return []
        if not isinstance(doc, list):
            return []
        return [c for c in doc if isinstance(c, dict) and isinstance(c.get("time"), (int, float))
                and isinstance(c.get("event"), str) and isinstance(c.get("route"), str)]

    def save(self, changes: list[dict[str, Any]]) -> None:
        """Write the list when it differs from what was written last."""
        if not self.enabled:
            return
        marker = (len(changes), changes[-1]["time"] if changes else None)
        if marker == self._saved:
            return
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(changes, default=str), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as exc:
            self.enabled = False
            self._log.warning("changes_file_unwritable", path=str(self.path), error=str(exc))
            return
        self._saved = marker


def restore_changes(watcher: Watcher, saved: list[dict[str, Any]], now: float) -> None:
    """Put the last run's changes before this run's, with a marker where the proxy started."""
    if not saved:
        return
    mine = list(watcher.changes)
    marker = {"time": now, "event": "proxy_started", "route": "",
              "what": ["the changes listed below it are from before the restart"]}
    merged = [*sorted(saved, key=lambda c: float(c["time"])), marker, *mine]
    watcher.changes.clear()
    watcher.changes.extend(merged[-(watcher.changes.maxlen or len(merged)):])


def _sum_rates(rates: Iterable[float | None], empty: float | None) -> float | None:
    known = [r for r in rates if r is not None]
    return sum(known) if known else empty


def _hashes(page: str, tag: str) -> str:
    """CSP source expressions for the page's inline <script> or <style> blocks."""
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.DOTALL)
    return " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() + "'"
        for b in blocks
    )


def page_headers(page: str) -> Mapping[str, str]:
    """Headers for the page: nothing but its own inline code may run, nothing remote loads."""
    csp = (f"default-src 'none'; script-src {_hashes(page, 'script')}; "
           f"style-src {_hashes(page, 'style')}; connect-src 'self'; img-src data:; "
           "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return {
        "Content-Security-Policy": csp,
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }


def _event(doc: Mapping[str, Any]) -> bytes:
    # Compact JSON has no newlines, so one `data:` line carries the whole snapshot.
    body = json.dumps(doc, separators=(",", ":"), default=str)
    return b"data: " + body.encode() + b"\n\n"


def add_dashboard(app: web.Application, watcher: Watcher, proxy: DataPlaneView) -> None:
    """Register `GET /` (the page) and `GET /events` (snapshots as server-sent events)."""
    page = files("edgeproxy").joinpath(_PAGE_RESOURCE).read_text(encoding="utf-8")
    headers = page_headers(page)
    read = collect_requests(proxy.metrics)
    meter = RateMeter(read)
    history = History()
    store = ChangeStore(watcher.settings.state_dir)
    if not watcher.quiet:
        restore_changes(watcher, store.load(), time.time())
    closing = asyncio.Event()

    async def keep_history_and_changes(_: web.Application) -> AsyncIterator[None]:
        """Sample the sparklines and save the changes on their own clocks, watched or not;
        only in the process that serves the page (every worker builds this app)."""
        if watcher.quiet:
            yield
            return

        async def loop() -> None:
            while True:
                now = time.time()
                if history.due(now):
                    history.record(now, read(), (r.name for r in watcher.table.routes))
                store.save(list(watcher.changes))
                await asyncio.sleep(CHANGES_SAVE_INTERVAL)

        task = asyncio.create_task(loop())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        store.save(list(watcher.changes))

    async def index(_: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html", charset="utf-8",
                             headers=headers)

    async def next_push(seen: int) -> None:
        """Return after a table swap newer than `seen`, at shutdown, or after the interval."""
        changed = watcher.changed
        async with changed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PUSH_INTERVAL):
                    await changed.wait_for(lambda: watcher.swaps != seen or closing.is_set())

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        })
        try:
            await response.prepare(request)
            await response.write(b"retry: 1000\n\n")  # reconnect after 1 s, not the default 3
            drawn = -1  # the history version this page has; sent again only when it moved
            while not closing.is_set():
                seen = watcher.swaps
                fresh = history if history.seq != drawn else None
                drawn = history.seq
                await response.write(_event(snapshot(watcher, proxy, meter, fresh)))
                await next_push(seen)
        except ConnectionResetError:
            pass  # the page went away; its EventSource reconnects by itself if it still can
        return response

    async def on_shutdown(_: web.Application) -> None:
        # End open streams now rather than have shutdown wait out its timeout on them.
        closing.set()
        async with watcher.changed:
            watcher.changed.notify_all()

    app.on_shutdown.append(on_shutdown)
    app.cleanup_ctx.append(keep_history_and_changes)
    app.router.add_get("/", index)
    app.router.add_get("/events", events)
