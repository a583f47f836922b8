"""Plain immutable data shared by providers, table building and the request path."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

ReplicaState = Literal["healthy", "running", "starting", "unhealthy", "draining", "stopped"]


@dataclass(frozen=True, slots=True)
class Container:
    """What Docker told us about one container (from the list, an inspect or an event)."""

    id: str
    name: str
    labels: Mapping[str, str]
    state: str  # running, exited, paused, created, restarting, dead, removing
    health: str | None  # healthy, unhealthy, starting; None without a HEALTHCHECK
    networks: tuple[tuple[str, str], ...]  # (network name, IPv4 or IPv6 address), sorted
    exposed_ports: tuple[int, ...]  # TCP ports the image exposes, sorted
    created: float
    stopping: bool = False  # a kill/stop event was seen: no new requests

    @property
    def service(self) -> str:
        """Compose or Swarm service name when there is one, else the container name."""
        labels = self.labels
        return (
            labels.get("com.docker.swarm.service.name")
            or labels.get("com.docker.compose.service")
            or self.name
        )


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """How a route matches and forwards: everything that replicas of a service share."""

    hosts: tuple[str, ...] = ()  # lower-case names or '*.suffix'; () means any host
    paths: tuple[str, ...] = ("/",)  # normalised prefixes, no trailing '/' except the root
    strip_prefix: bool = False


@dataclass(frozen=True, slots=True)
class Upstream:
    """One replica a route can send requests to."""

    scheme: str
    host: str
    port: int
    name: str  # container name or upstream URL
    container_id: str | None = None
    state: ReplicaState = "running"
    reason: str = ""

    @property
    def eligible(self) -> bool:
        """True when the replica may get new requests."""
        return self.state in ("healthy", "running")

    @property
    def address(self) -> str:
        """host:port, with IPv6 hosts bracketed."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Route:
    """A spec and the replicas behind it; the balancer counter is the only mutable part."""

    name: str
    source: str  # "docker" or "file"
    spec: RouteSpec
    upstreams: tuple[Upstream, ...]  # every replica, eligible or not, for visibility
    pool: tuple[Upstream, ...] = field(default=(), compare=False)  # eligible replicas only
    _counter: itertools.count[int] = field(default_factory=itertools.count, compare=False,
                                           repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pool", tuple(u for u in self.upstreams if u.eligible))

    def pick(self) -> Upstream | None:
        """Round robin over eligible replicas; None when the pool is empty."""
        pool = self.pool
        if not pool:
            return None
        if len(pool) == 1:
            return pool[0]
        return pool[next(self._counter) % len(pool)]


@dataclass(frozen=True, slots=True)
class Skipped:
    """Why a container is not (fully) routed; shown in logs and the admin API."""

    container: str
    reason: str
    label: str | None = None
    value: str | None = None
