"""Live dashboard on the admin listener: one self-contained page fed by server-sent events."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from aiohttp import web
from prometheus_client import Metric

from edgeproxy import __version__
from edgeproxy import admin as admin_api  # the module, not names: admin may import us early
from edgeproxy.dataview import DataPlaneView
from edgeproxy.metrics import Metrics, multiprocess_dir
from edgeproxy.watcher import Watcher

PUSH_INTERVAL = 1.0
"""Seconds between snapshots when the table does not change (request rates move anyway)."""

RATE_WINDOW = 5.0
"""Seconds of counter history that request and error rates are averaged over."""

CHANGES_SHOWN = 30
"""Most recent route changes sent with each snapshot."""

_PAGE_RESOURCE = "static/dashboard.html"


@dataclass(frozen=True, slots=True)
class Traffic:
    """Requests answered for one route: running totals and rates over the window."""

    requests: float = 0.0
    errors: float = 0.0  # 5xx answers
    rps: float | None = None  # None until two samples exist
    errors_ps: float | None = None

    def as_json(self) -> dict[str, Any]:
        """The shape the page reads."""
        pct = None
        if self.rps and self.errors_ps is not None:
            pct = round(100.0 * self.errors_ps / self.rps, 2)
        return {
            "requests": int(self.requests),
            "errors": int(self.errors),
            "rps": None if self.rps is None else round(self.rps, 2),
            "error_pct": pct,
        }


Totals = dict[str, tuple[float, float]]  # route -> (requests, 5xx)


def request_totals(families: Iterable[Metric]) -> Totals:
    """Per-route (requests, 5xx) from collected `edgeproxy_requests` samples."""
    out: Totals = {}
    for family in families:
        if family.name != "edgeproxy_requests":
            continue
        for s in family.samples:
            if not s.name.endswith("_total"):
                continue
            route = s.labels.get("route", "")
            total, errors = out.get(route, (0.0, 0.0))
            out[route] = (total + s.value,
                          errors + (s.value if s.labels.get("status_class") == "5xx" else 0.0))
    return out


def collect_requests(metrics: Metrics) -> Callable[[], Totals]:
    """Reads this process's request counter, or every worker's when metrics are shared."""
    counter: Any = metrics.requests
    folder = multiprocess_dir()
    if not folder:
        return lambda: request_totals(counter.collect())
    from prometheus_client import multiprocess

    collector = multiprocess.MultiProcessCollector(None, path=folder)  # type: ignore[no-untyped-call]
    return lambda: request_totals(collector.collect())  # type: ignore[no-untyped-call]


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
        out: dict[str, Traffic] = {}
        for route, (total, errors) in last.items():
            if elapsed <= 0:
                out[route] = Traffic(total, errors)
                continue
            # A route missing from the base had not been counted yet: its base is zero.
            total0, errors0 = base.get(route, (0.0, 0.0))
            out[route] = Traffic(total, errors, max(0.0, total - total0) / elapsed,
                                 max(0.0, errors - errors0) / elapsed)
        return out


def _docker_state(watcher: Watcher) -> str:
    if not watcher.settings.docker:
        return "disabled"
    return {True: "connected", False: "disconnected", None: "connecting"}[watcher.docker_connected]


def snapshot(watcher: Watcher, proxy: DataPlaneView, meter: RateMeter) -> dict[str, Any]:
    """Everything the page shows, as one JSON document."""
    traffic = meter.traffic()
    known = 0.0 if meter.span > 0 else None  # not counted yet, but measured: 0 req/s
    idle = Traffic(rps=known, errors_ps=known)
    table = watcher.table
    routes = []
    for r in table.routes:
        doc = admin_api.route_json(r, proxy.balancer)
        doc["traffic"] = traffic.get(r.name, idle).as_json()
        routes.append(doc)
    total = Traffic(
        sum(t.requests for t in traffic.values()),
        sum(t.errors for t in traffic.values()),
        _sum_rates((t.rps for t in traffic.values()), known),
        _sum_rates((t.errors_ps for t in traffic.values()), known),
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
        "changes": changes,
        "problems": problems,
    }


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
    meter = RateMeter(collect_requests(proxy.metrics))
    closing = asyncio.Event()

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
            while not closing.is_set():
                seen = watcher.swaps
                await response.write(_event(snapshot(watcher, proxy, meter)))
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
    app.router.add_get("/", index)
    app.router.add_get("/events", events)
