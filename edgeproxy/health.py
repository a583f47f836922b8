"""Active health checks: probe replicas of routes with gateway.health.path, report flips."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable

import aiohttp

from edgeproxy.logs import get_logger
from edgeproxy.model import HealthSpec, Upstream
from edgeproxy.table import RouteTable

Target = tuple[str, str, int, HealthSpec]  # (upstream key, host, port, spec)
Report = Callable[[str, "str | None"], None]


def probe_targets(table: RouteTable) -> set[Target]:
    """Every replica that an active check should watch (failing ones too, so they can return)."""
    out: set[Target] = set()
    for route in table.routes:
        spec = route.spec.health
        if spec is None:
            continue
        for u in route.upstreams:
            if u.host and u.state in ("running", "healthy", "unhealthy"):
                out.add((u.key, u.host, u.port, spec))
    return out


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
        self._tasks: dict[Target, asyncio.Task[None]] = {}
        self._log = get_logger("health")

    def reconcile(self, table: RouteTable) -> None:
        """Start probes for new targets, stop those that left the table."""
        wanted = probe_targets(table)
        for target in list(self._tasks):
            if target not in wanted:
                self._tasks.pop(target).cancel()
                self._report(target[0], None)  # forget: a replica that returns starts clean
        for target in wanted - self._tasks.keys():
            self._tasks[target] = asyncio.create_task(self._probe_loop(target),
                                                      name=f"health {target[0]}")

    async def close(self) -> None:
        """Stop every probe."""
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def _probe_once(self, host: str, port: int, spec: HealthSpec) -> str | None:
        u = Upstream("http", host, port, "")
        url = f"http://{u.address}{spec.path}"
        timeout = aiohttp.ClientTimeout(total=spec.timeout)
        try:
            async with self._session.get(url, timeout=timeout, allow_redirects=False) as resp:
                await resp.read()
                return judge(resp.status, None, spec)
        except TimeoutError:
            return judge(None, f"GET {spec.path} timed out after {spec.timeout:g}s", spec)
        except aiohttp.ClientError as exc:
            return judge(None, f"GET {spec.path} failed: {type(exc).__name__}", spec)

    async def _probe_loop(self, target: Target) -> None:
        key, host, port, spec = target
        healthy = True  # optimistic: passive checks and retries cover a replica not yet up
        fails = passes = 0
        # Spread probes of many replicas over the interval instead of firing them together.
        await asyncio.sleep(random.uniform(0, min(spec.interval, 1.0)))  # noqa: S311
        while True:
            reason = await self._probe_once(host, port, spec)
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
