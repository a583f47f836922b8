"""The admin's view of the data plane: one worker's Proxy, or the reports of every worker.

The admin API and the dashboard read worker-side facts (requests in flight, passive ejections,
JWKS and rate-limit health) through `DataPlaneView`. With one process that is the Proxy itself;
with several workers it is `WorkerReports`, which the control plane fills from the status each
worker sends over the control socket."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from edgeproxy.core.tls import Edge
from edgeproxy.routes.model import Upstream
from edgeproxy.telemetry.metrics import Metrics


class BalancerView(Protocol):
    """Replica bookkeeping the admin shows: in-flight counts and passive ejections."""

    @property
    def inflight(self) -> Mapping[str, int]: ...

    def is_ejected(self, u: Upstream) -> bool: ...

    def ejected_for(self, u: Upstream) -> float | None: ...


class VerifierView(Protocol):
    """JWT verification health."""

    @property
    def problem(self) -> str | None: ...

    @property
    def jwks_error(self) -> str | None: ...


class LimiterView(Protocol):
    """Rate-limit backend health."""

    @property
    def healthy(self) -> bool: ...

    @property
    def last_error(self) -> str | None: ...


class DataPlaneView(Protocol):
    """What the admin API and the dashboard read from the data plane."""

    @property
    def in_flight(self) -> int: ...

    @property
    def balancer(self) -> BalancerView: ...

    @property
    def verifier(self) -> VerifierView: ...

    @property
    def limiter(self) -> LimiterView: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def edge(self) -> Edge:
        """What /explain's decision needs besides the table (certificates, ACME, ports)."""
        ...

    def tls_status(self) -> dict[str, Any] | None: ...


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """What one worker reports about itself, about once a second."""

    worker: int
    pid: int
    in_flight: int = 0
    inflight: Mapping[str, int] = field(default_factory=dict)  # upstream key -> requests
    ejected: Mapping[str, float] = field(default_factory=dict)  # upstream key -> wall-clock end
    jwks_error: str | None = None
    ratelimit_healthy: bool = True
    ratelimit_error: str | None = None
    table: int = 0  # generation of the table the worker serves
    table_at: float = 0.0  # wall-clock time that table arrived
    listening: bool = False  # accepting connections


class _Merged:
    """BalancerView, VerifierView and LimiterView over every worker's last report."""

    def __init__(self, reports: WorkerReports) -> None:
        self._reports = reports

    @property
    def inflight(self) -> Mapping[str, int]:
        out: dict[str, int] = {}
        for r in self._reports.workers.values():
            for k, n in r.inflight.items():
                out[k] = out.get(k, 0) + n
        return out

    def ejected_for(self, u: Upstream) -> float | None:
        # Ejection is per worker: the replica is shown ejected while any worker sits it out.
        now = time.time()
        left = max((r.ejected.get(u.key, 0.0) - now for r in self._reports.workers.values()),
                   default=0.0)
        return round(left, 1) if left > 0 else None

    def is_ejected(self, u: Upstream) -> bool:
        return self.ejected_for(u) is not None

    @property
    def problem(self) -> str | None:
        return self._reports.jwt_problem

    @property
    def jwks_error(self) -> str | None:
        return next((r.jwks_error for r in self._reports.workers.values() if r.jwks_error),
                    None)

    @property
    def healthy(self) -> bool:
        return all(r.ratelimit_healthy for r in self._reports.workers.values())

    @property
    def last_error(self) -> str | None:
        return next((r.ratelimit_error for r in self._reports.workers.values()
                     if r.ratelimit_error), None)


class WorkerReports:
    """DataPlaneView for the control plane: every worker's latest status, summed or merged."""

    def __init__(self, metrics: Metrics, jwt_problem: str | None,
                 tls: Any = None) -> None:
        self.workers: dict[int, WorkerStatus] = {}
        self._metrics = metrics
        self.jwt_problem = jwt_problem
        self._merged = _Merged(self)
        self._tls = tls  # a callable returning the control plane's TLS status, or None
        self.edge = Edge()  # set by the control plane once its certificates are loaded

    def report(self, status: WorkerStatus) -> None:
        """A worker's newest status replaces its previous one."""
        self.workers[status.worker] = status

    def gone(self, worker: int, pid: int) -> None:
        """A worker's connection ended: its in-flight requests ended with it."""
        r = self.workers.get(worker)
        if r is not None and r.pid == pid:
            del self.workers[worker]

    @property
    def in_flight(self) -> int:
        return sum(r.in_flight for r in self.workers.values())

    @property
    def balancer(self) -> BalancerView:
        return self._merged

    @property
    def verifier(self) -> VerifierView:
        return self._merged

    @property
    def limiter(self) -> LimiterView:
        return self._merged

    @property
    def metrics(self) -> Metrics:
        return self._metrics

    def tls_status(self) -> dict[str, Any] | None:
        status: dict[str, Any] | None = self._tls() if self._tls is not None else None
        return status

    def workers_json(self) -> list[dict[str, Any]]:
        """Per worker: pid, requests in flight, and the table generation it serves."""
        return [{"worker": r.worker, "pid": r.pid, "in_flight": r.in_flight,
                 "table": r.table, "table_at": r.table_at or None}
                for r in sorted(self.workers.values(), key=lambda r: r.worker)]
