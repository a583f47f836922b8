"""Prometheus metrics: request counters live per process (summed across workers), table gauges
are computed at scrape time from the live RouteTable."""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from edgeproxy.table import RouteTable

_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST
# *_created series double the output and nobody graphs them
disable_created_metrics()  # type: ignore[no-untyped-call]


def multiprocess_dir() -> str | None:
    """The shared metrics folder when several workers run (set before prometheus_client loads)."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """Every metric the proxy exports; one instance per process."""

    def __init__(self, table: Callable[[], RouteTable]) -> None:
        r = CollectorRegistry(auto_describe=True)
        self.registry = r
        self.table_collector = TableCollector(table)
        r.register(self.table_collector)
        self.requests: Any
        self.duration: Any
        self._fast: _RequestStats | None = None
        if multiprocess_dir() is None:
            # One process: plain dicts, read at scrape time. prometheus_client's children
            # take a lock per update; per request that was a few percent of the proxy's CPU.
            self._fast = self.requests = self.duration = _RequestStats()
            r.register(self._fast)
        else:
            self.requests = Counter("edgeproxy_requests", "Requests answered",
                                    ["route", "method", "status_class"], registry=r)
            self.duration = Histogram("edgeproxy_request_duration_seconds",
                                      "Time from request to the end of the response", ["route"],
                                      buckets=_BUCKETS, registry=r)
        self.in_flight = Gauge("edgeproxy_in_flight_requests", "Requests being answered",
                               registry=r, multiprocess_mode="livesum")
        # One process: read the proxy's own counter at scrape time, nothing per request.
        self.count_in_flight = multiprocess_dir() is not None
        self.upstream_errors = Counter("edgeproxy_upstream_errors",
                                       "Failed tries against a replica", ["route", "kind"],
                                       registry=r)
        self.retries = Counter("edgeproxy_retries", "Requests tried again on another replica",
                               ["route"], registry=r)
        self.ejections = Counter("edgeproxy_ejections", "Replicas passively ejected",
                                 ["route"], registry=r)
        self.ratelimited = Counter("edgeproxy_ratelimit_rejections",
                                   "Requests refused with 429", ["route"], registry=r)
        self.auth_failures = Counter("edgeproxy_auth_failures", "Requests refused by JWT auth",
                                     ["route", "reason"], registry=r)
        # Every access refusal: kind is jwt, basic, forward or ip (the allow/deny lists);
        # auth_failures above keeps its JWT-only series for existing dashboards.
        self.access_refusals = Counter("edgeproxy_access_refusals",
                                       "Requests refused by an access policy (IP list or auth)",
                                       ["route", "kind", "reason"], registry=r)
        self.bcrypt_checks = Counter("edgeproxy_basic_auth_bcrypt_checks",
                                     "bcrypt password checks run (basic-auth cache misses)",
                                     registry=r)
        self.docker_reconnects = Counter("edgeproxy_docker_reconnects",
                                         "Times the Docker connection was lost and retried",
                                         registry=r)
        self.docker_event_lag = Histogram("edgeproxy_docker_event_lag_seconds",
                                          "Docker event time to its observation reaching the "
                                          "watcher", buckets=_BUCKETS, registry=r)
        self.table_swaps = Counter("edgeproxy_table_swaps", "Route tables swapped in",
                                   registry=r)
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    @staticmethod
    def method_label(method: str) -> str:
        """Bound the method label's cardinality."""
        return method if method in _METHODS else "OTHER"

    def observe_request(self, route: str | None, method: str, status: int,
                        seconds: float) -> None:
        """Count one answered request (label children cached: labels() costs a lock and more)."""
        name = route or ""
        fast = self._fast
        if fast is not None:
            fast.observe(name, self.method_label(method), status // 100, seconds)
            return
        key = (name, method, status // 100)
        pair = self._children.get(key)
        if pair is None:
            if len(self._children) > 10_000:  # routes come and go: keep the cache bounded
                self._children.clear()
            pair = self._children[key] = (
                self.requests.labels(name, self.method_label(method), f"{status // 100}xx"),
                self.duration.labels(name))
        pair[0].inc()
        pair[1].observe(seconds)


class _RequestStats(Collector):
    """edgeproxy_requests and edgeproxy_request_duration_seconds for a single process."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str, int], int] = {}
        self._hist: dict[str, list[float]] = {}  # route -> bucket counts..., then the sum

    def observe(self, route: str, method: str, status_class: int, seconds: float) -> None:
        key = (route, method, status_class)
        self._counts[key] = self._counts.get(key, 0) + 1
        h = self._hist.get(route)
        if h is None:
            h = self._hist[route] = [0.0] * (len(_BUCKETS) + 2)
        h[bisect.bisect_left(_BUCKETS, seconds)] += 1
        h[-1] += seconds

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("edgeproxy_requests", "Requests answered",
                                       labels=["route", "method", "status_class"])
        for (route, method, cls), n in sorted(self._counts.items()):
            requests.add_metric([route, method, f"{cls}xx"], n)
        yield requests
        duration = HistogramMetricFamily("edgeproxy_request_duration_seconds",
                                         "Time from request to the end of the response",
                                         labels=["route"])
        for route, h in sorted(self._hist.items()):
            cumulative = 0.0
            buckets: list[tuple[str, float]] = []
            for bound, count in zip((*_BUCKETS, float("inf")), h[:-1], strict=True):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))  # type: ignore[no-untyped-call]
            duration.add_metric([route], buckets, h[-1])
        yield duration


class TableCollector(Collector):
    """Route and replica gauges read from the live table when scraped (never stale labels)."""

    def __init__(self, table: Callable[[], RouteTable]) -> None:
        self._table = table

    def collect(self) -> Iterator[GaugeMetricFamily]:
        table = self._table()
        routes = GaugeMetricFamily("edgeproxy_routes", "Routes in the live table")
        routes.add_metric([], len(table.routes))
        yield routes
        healthy = GaugeMetricFamily("edgeproxy_route_healthy_replicas",
                                    "Replicas eligible for new requests", labels=["route"])
        total = GaugeMetricFamily("edgeproxy_route_replicas", "Replicas known", labels=["route"])
        for r in table.routes:
            healthy.add_metric([r.name], len(r.pool))
            total.add_metric([r.name], len(r.upstreams))
        yield healthy
        yield total


def render(metrics: Metrics) -> bytes:
    """The Prometheus text exposition: this process's (or all workers') counters + table gauges."""
    folder = multiprocess_dir()
    if not folder:
        return generate_latest(metrics.registry)
    from prometheus_client import multiprocess

    registry = CollectorRegistry(auto_describe=False)
    multiprocess.MultiProcessCollector(registry, path=folder)  # type: ignore[no-untyped-call]
    registry.register(metrics.table_collector)
    return generate_latest(registry)
