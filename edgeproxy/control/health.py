"""Active health checks: probe replicas of routes with gateway.health.path, report flips."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import ssl
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from edgeproxy.core.logs import get_logger
from edgeproxy.routes.model import HealthSpec, RouteSpec, Upstream
from edgeproxy.routes.table import RouteTable

Target = tuple[str, str, int, HealthSpec]  # (upstream key, host, port, spec)
Report = Callable[[str, "str | None"], None]


@dataclass(frozen=True, slots=True)
class ProbeEndpoint:
    """How a probe reaches a replica: the scheme and TLS settings that forwarding uses."""

    scheme: str = "http"
    tls_verify: bool = True
    tls_ca: str | None = None
    tls_server_name: str | None = None

    @classmethod
    def of(cls, u: Upstream, spec: RouteSpec) -> ProbeEndpoint:
        """The endpoint settings of replica `u` of a route with `spec` (as forward.py uses)."""
        if u.scheme != "https":
            return cls()
        return cls("https", spec.tls_verify, spec.tls_ca, spec.tls_server_name)


Probe = tuple[Target, ProbeEndpoint]


def probe_plan(table: RouteTable) -> set[Probe]:
    """Every replica an active check should watch, with how to reach it (failing ones too, so
    they can return)."""
    out: set[Probe] = set()
    for route in table.routes:
        spec = route.spec.health
        if spec is None:
            continue
        for u in route.upstreams:
            if u.host and u.state in ("running", "healthy", "unhealthy"):
                out.add(((u.key, u.host, u.port, spec), ProbeEndpoint.of(u, route.spec)))
    return out


def probe_targets(table: RouteTable) -> set[Target]:
    """Every replica that an active check should watch (failing ones too, so they can return)."""
    return {target for target, _ in probe_plan(table)}


@functools.lru_cache(maxsize=32)
def probe_tls_context(verify: bool, ca: str | None) -> ssl.SSLContext:
    """Client TLS for https replicas, built like forwarding's (system or `ca` roots, hostname
    checked unless `verify` is off); raises OSError or ssl.SSLError for an unreadable CA."""
    ctx = ssl.create_default_context(cafile=ca)
    ctx.set_alpn_protocols(["http/1.1"])
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def judge(status: int | None, error: str | None, spec: HealthSpec) -> str | None:
    """None when a probe passed, else why it failed."""
    if error is not None:
        return error
    if status is None or not spec.status_min <= status <= spec.status_max:
        return f"GET {spec.path} answered {status}, expected {spec.status_min}-{spec.status_max}"
    return None


class HealthMonitor:
    """One probe task per target; reconciled after each table swap."""

    def __init__(self, session: aiohttp.ClientSession, report: Report) -> None:
        self._session = session
        self._report = report
        self._tasks: dict[Probe, asyncio.Task[None]] = {}
        self._log = get_logger("health")

    def reconcile(self, table: RouteTable) -> None:
        """Start probes for new targets, stop those that left the table."""
        wanted = probe_plan(table)
        for probe in list(self._tasks):
            if probe not in wanted:
                self._tasks.pop(probe).cancel()
                self._report(probe[0][0], None)  # forget: a replica that returns starts clean
        for probe in wanted - self._tasks.keys():
            self._tasks[probe] = asyncio.create_task(self._probe_loop(*probe),
                                                     name=f"health {probe[0][0]}")

    @property
    def probing(self) -> int:
        """Replicas probed now (one task each)."""
        return len(self._tasks)

    async def close(self) -> None:
        """Stop every probe."""
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def _probe_once(self, host: str, port: int, spec: HealthSpec,
                          endpoint: ProbeEndpoint = ProbeEndpoint()) -> str | None:
        u = Upstream(endpoint.scheme, host, port, "")
        url = f"{endpoint.scheme}://{u.address}{spec.path}"
        timeout = aiohttp.ClientTimeout(total=spec.timeout)
        tls: ssl.SSLContext | bool = True
        server_name: str | None = None
        if endpoint.scheme == "https":
            try:
                tls = probe_tls_context(endpoint.tls_verify, endpoint.tls_ca)
            except (OSError, ssl.SSLError) as exc:
                return f"cannot load gateway.tls.ca={endpoint.tls_ca!r}: {exc}"
            server_name = endpoint.tls_server_name or host
        try:
            async with self._session.get(url, timeout=timeout, allow_redirects=False, ssl=tls,
                                         server_hostname=server_name) as resp:
                await resp.read()
                return judge(resp.status, None, spec)
        except TimeoutError:
            return judge(None, f"GET {spec.path} timed out after {spec.timeout:g}s", spec)
        except aiohttp.ClientError as exc:
            return judge(None, f"GET {spec.path} failed: {type(exc).__name__}", spec)

    async def _probe_loop(self, target: Target, endpoint: ProbeEndpoint) -> None:
        key, host, port, spec = target
        healthy = True  # optimistic: passive checks and retries cover a replica not yet up
        fails = passes = 0
        # Spread probes of many replicas over the interval instead of firing them together.
        await asyncio.sleep(random.uniform(0, min(spec.interval, 1.0)))  # noqa: S311
        while True:
            reason = await self._probe_once(host, port, spec, endpoint)
            if reason is None:
                passes, fails = passes + 1, 0
                if not healthy and passes >= spec.passes:
                    healthy = True
                    self._log.info("replica_healthy", replica=key, passes=passes)
                    self._report(key, None)
            else:
                fails, passes = fails + 1, 0
                if healthy and fails >= spec.fails:
                    healthy = False
                    self._log.warning("replica_unhealthy", replica=key, fails=fails,
                                      reason=reason)
                    self._report(key, reason)
            await asyncio.sleep(spec.interval)
