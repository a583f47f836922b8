"""Prometheus metrics: request counters live per process (summed across workers), table gauges
are computed at scrape time from the live RouteTable."""

from __future__ import annotations

import bisect
import os
import platform
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

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

from edgeproxy.telemetry.tracing import DROP_REASONS

if TYPE_CHECKING:
    from edgeproxy.core.tls import CertInfo

from edgeproxy import __version__
from edgeproxy.routes.table import RouteTable

_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
# The protocol label's values (bounded): any other version a front reports counts as "other".
PROTOCOLS = ("HTTP/1.0", "HTTP/1.1", "HTTP/2", "other")
_PROTOCOL_INDEX = {p: i for i, p in enumerate(PROTOCOLS)}
_OTHER_PROTOCOL = len(PROTOCOLS) - 1
# The grpc_status label's values: the 17 codes gRPC defines (0 OK .. 16 UNAUTHENTICATED), else
# "other" (a replica may send any number).
GRPC_STATUSES = tuple(str(code) for code in range(17))
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
                                    ["route", "method", "status_class", "code"], registry=r)
            self.duration = Histogram("edgeproxy_request_duration_seconds",
                                      "Time from request to the end of the response", ["route"],
                                      buckets=_BUCKETS, registry=r)
            self.request_bytes = Counter("edgeproxy_request_bytes", _REQUEST_BYTES_HELP,
                                         ["route"], registry=r)
            self.response_bytes = Counter("edgeproxy_response_bytes", _RESPONSE_BYTES_HELP,
                                          ["route"], registry=r)
            self.by_protocol = Counter("edgeproxy_requests_by_protocol", _BY_PROTOCOL_HELP,
                                       ["route", "protocol"], registry=r)
            self.grpc_responses = Counter("edgeproxy_grpc_responses", _GRPC_HELP,
                                          ["route", "grpc_status"], registry=r)
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
        dropped = Counter("edgeproxy_trace_spans_dropped",
                          "Spans that never reached the trace collector (queue full, or the "
                          "export failed)", ["reason"], registry=r)
        # Both reasons exist from the start: a dashboard sees 0, not an absent series.
        self._dropped = {reason: dropped.labels(reason) for reason in DROP_REASONS}
        self._children: dict[tuple[str, str, int, str], tuple[Any, Any, Any, Any, Any]] = {}
        # Called once per request: straight to the one-process counters when they are used.
        self.observe_request: Callable[..., None] = (
            self._fast.observe if self._fast is not None else self._observe_shared)

    def trace_spans_dropped(self, reason: str, count: int) -> None:
        """Count spans the tracing exporter lost (called from its thread, too)."""
        self._dropped[reason].inc(count)

    @staticmethod
    def method_label(method: str) -> str:
        """Bound the method label's cardinality."""
        return method if method in _METHODS else "OTHER"

    def _observe_shared(self, route: str | None, method: str, status: int,
                        seconds: float, request_bytes: int = 0, response_bytes: int = 0,
                        protocol: str = "HTTP/1.1", grpc_status: int | None = None) -> None:
        """`observe_request` with several workers (prometheus_client's multiprocess files):
        label children cached, since labels() costs a lock and more."""
        name = route or ""
        key = (name, method, status, protocol)
        children = self._children.get(key)
        if children is None:
            if len(self._children) > 10_000:  # routes come and go: keep the cache bounded
                self._children.clear()
            children = self._children[key] = (
                self.requests.labels(name, self.method_label(method), f"{status // 100}xx",
                                     str(status)),
                self.duration.labels(name), self.request_bytes.labels(name),
                self.response_bytes.labels(name),
                self.by_protocol.labels(name, PROTOCOLS[_PROTOCOL_INDEX.get(protocol,
                                                                            _OTHER_PROTOCOL)]))
        children[0].inc()
        children[1].observe(seconds)
        if request_bytes:
            children[2].inc(request_bytes)
        if response_bytes:
            children[3].inc(response_bytes)
        children[4].inc()
        if grpc_status is not None:
            self.grpc_responses.labels(name, grpc_label(grpc_status)).inc()


def grpc_label(code: int) -> str:
    """The grpc_status label of a gRPC status code: "0".."16", or "other"."""
    return GRPC_STATUSES[code] if 0 <= code < len(GRPC_STATUSES) else "other"


_REQUEST_BYTES_HELP = "Request body bytes read from clients"
_RESPONSE_BYTES_HELP = "Response body bytes sent to clients"
_BY_PROTOCOL_HELP = "Requests answered, by the protocol the client spoke (HTTP/1.1, HTTP/2)"
_GRPC_HELP = "gRPC calls answered, by grpc-status (the replica's, or the proxy's own refusal)"
# Per route in _RequestStats: bucket counts..., then the sum of seconds, request bytes,
# response bytes, then a request count per protocol (PROTOCOLS' order).
_SUM, _REQ_BYTES, _RESP_BYTES = len(_BUCKETS) + 1, len(_BUCKETS) + 2, len(_BUCKETS) + 3
_PROTO = _RESP_BYTES + 1


class _RequestStats(Collector):
    """edgeproxy_requests, edgeproxy_request_duration_seconds, the byte counters and the
    protocol and gRPC status counters for a single process."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str, int], int] = {}  # (route, method, status) -> n
        self._routes: dict[str, list[float]] = {}
        self._grpc: dict[tuple[str, str], int] = {}  # (route, grpc_status label) -> n

    def observe(self, route: str | None, method: str, status: int, seconds: float,
                request_bytes: int = 0, response_bytes: int = 0, protocol: str = "HTTP/1.1",
                grpc_status: int | None = None) -> None:
        """`observe_request` in one process: count one answered request, its body bytes, its
        protocol (HTTP/1.1, HTTP/2) and, for gRPC, its grpc-status."""
        if route is None:
            route = ""
        key = (route, method if method in _METHODS else "OTHER", status)
        self._counts[key] = self._counts.get(key, 0) + 1
        h = self._routes.get(route)
        if h is None:
            h = self._routes[route] = [0.0] * (_PROTO + len(PROTOCOLS))
        h[bisect.bisect_left(_BUCKETS, seconds)] += 1
        h[_SUM] += seconds
        h[_REQ_BYTES] += request_bytes
        h[_RESP_BYTES] += response_bytes
        # The protocol's count sits in the route's list: one dict lookup, no new key object.
        h[_PROTO + _PROTOCOL_INDEX.get(protocol, _OTHER_PROTOCOL)] += 1
        if grpc_status is not None:
            gkey = (route, grpc_label(grpc_status))
            self._grpc[gkey] = self._grpc.get(gkey, 0) + 1

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("edgeproxy_requests", "Requests answered",
                                       labels=["route", "method", "status_class", "code"])
        for (route, method, status), n in sorted(self._counts.items()):
            requests.add_metric([route, method, f"{status // 100}xx", str(status)], n)
        yield requests
        duration = HistogramMetricFamily("edgeproxy_request_duration_seconds",
                                         "Time from request to the end of the response",
                                         labels=["route"])
        received = CounterMetricFamily("edgeproxy_request_bytes", _REQUEST_BYTES_HELP,
                                       labels=["route"])
        sent = CounterMetricFamily("edgeproxy_response_bytes", _RESPONSE_BYTES_HELP,
                                   labels=["route"])
        by_protocol = CounterMetricFamily("edgeproxy_requests_by_protocol", _BY_PROTOCOL_HELP,
                                          labels=["route", "protocol"])
        for route, h in sorted(self._routes.items()):
            cumulative = 0.0
            buckets: list[tuple[str, float]] = []
            for bound, count in zip((*_BUCKETS, float("inf")), h[:_SUM], strict=True):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))  # type: ignore[no-untyped-call]
            duration.add_metric([route], buckets, h[_SUM])
            received.add_metric([route], h[_REQ_BYTES])
            sent.add_metric([route], h[_RESP_BYTES])
            for i, protocol in enumerate(PROTOCOLS):
                if h[_PROTO + i]:  # a series per protocol seen, as labels() would make
                    by_protocol.add_metric([route, protocol], h[_PROTO + i])
        yield duration
        yield received
        yield sent
        yield by_protocol
        grpc = CounterMetricFamily("edgeproxy_grpc_responses", _GRPC_HELP,
                                   labels=["route", "grpc_status"])
        for (route, code), n in sorted(self._grpc.items()):
            grpc.add_metric([route, code], n)
        yield grpc


class TableCollector(Collector):
    """Gauges computed when scraped, never stale labels: routes and replicas from the live
    table, certificates from the CertStore (`certificates`, set once TLS is on), build info."""

    def __init__(self, table: Callable[[], RouteTable]) -> None:
        self._table = table
        self.certificates: Callable[[], tuple[CertInfo, ...]] | None = None

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
        up = GaugeMetricFamily("edgeproxy_replica_up",
                               "1 while the replica may get new requests (running or healthy), "
                               "else 0", labels=["route", "replica"])
        for r in table.routes:
            seen: set[str] = set()
            for u in r.upstreams:
                if u.name not in seen:  # one series per name, even if two replicas share it
                    seen.add(u.name)
                    up.add_metric([r.name, u.name], 1.0 if any(
                        p.eligible for p in r.upstreams if p.name == u.name) else 0.0)
        yield up
        expiry = GaugeMetricFamily("edgeproxy_tls_certificate_not_after_timestamp_seconds",
                                   "Expiry (notAfter) of each certificate served, as a Unix time",
                                   labels=["name", "serial"])
        if self.certificates is not None:
            for cert in self.certificates():
                expiry.add_metric([cert.names[0] if cert.names else "", f"{cert.serial:x}"],
                                  cert.not_after.timestamp())
        yield expiry
        info = GaugeMetricFamily("edgeproxy_build_info", "The running edgeproxy's version",
                                 labels=["version", "python"])
        info.add_metric([__version__, platform.python_version()], 1.0)
        yield info


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
