"""Plain immutable data shared by providers, table building and the request path."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from edgeproxy.core.state import fast_state
from edgeproxy.policies.basic import BasicAuthSpec
from edgeproxy.policies.forwardauth import ForwardAuthSpec
from edgeproxy.policies.iplist import IpRules
from edgeproxy.policies.ratelimit import RateLimitSpec
from edgeproxy.routes.transform import NO_HEADER_RULES, CorsSpec, HeaderRules, Rewrite

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
    seen: int = 0  # order in which the proxy first saw it: breaks ties within one second
    # Why the provider can't route it although its labels ask to be (e.g. a Swarm service
    # without gateway.port: Swarm does no port detection); None: nothing in the way.
    problem: str | None = None

    @property
    def service(self) -> str:
        """Compose or Swarm service name when there is one, else the container name."""
        labels = self.labels
        return (
            labels.get("com.docker.swarm.service.name")
            or labels.get("com.docker.compose.service")
            or self.name
        )


@fast_state
@dataclass(frozen=True, slots=True)
class HealthSpec:
    """An active health check: GET `path` every `interval`; `fails` in a row take a replica out,
    `passes` in a row bring it back."""

    path: str
    interval: float = 5.0
    timeout: float = 2.0
    status_min: int = 200
    status_max: int = 399
    fails: int = 3
    passes: int = 2


AuthKind = Literal["jwt", "basic", "forward"]


@fast_state
@dataclass(frozen=True, slots=True)
class AuthSpec:
    """gateway.auth: one kind per route. jwt: every scope in `scopes` is required, `audience`
    overrides the global; basic and forward carry their own spec."""

    scopes: tuple[str, ...] = ()
    audience: str | None = None
    kind: AuthKind = "jwt"
    basic: BasicAuthSpec | None = None
    forward: ForwardAuthSpec | None = None


@fast_state
@dataclass(frozen=True, slots=True)
class RouteSpec:
    """How a route matches and forwards: everything that replicas of a service share."""

    hosts: tuple[str, ...] = ()  # lower-case names or '*.suffix'; () means any host
    paths: tuple[str, ...] = ("/",)  # normalised prefixes, no trailing '/' except the root
    strip_prefix: bool = False
    lb: str = "round_robin"  # or least_conn
    retries: int | None = None  # None: EDGEPROXY_RETRIES
    connect_timeout: float | None = None  # None: EDGEPROXY_CONNECT_TIMEOUT
    read_timeout: float | None = None  # None: EDGEPROXY_READ_TIMEOUT
    health: HealthSpec | None = None
    auth: AuthSpec | None = None
    ip: IpRules | None = None  # gateway.ip.allow / gateway.ip.deny, compiled
    ratelimit: RateLimitSpec | None = None
    request_headers: HeaderRules = NO_HEADER_RULES
    response_headers: HeaderRules = NO_HEADER_RULES
    rewrite: Rewrite | None = None
    add_prefix: str | None = None
    cors: CorsSpec | None = None
    compress: bool = False
    scheme: str = "http"  # to the replicas: http or https
    tls_verify: bool = True
    tls_ca: str | None = None
    tls_server_name: str | None = None
    max_body: int | None = None  # None: EDGEPROXY_MAX_BODY_SIZE
    tls: str | None = None  # at the edge: "acme" (certificates ordered) or "files"
    tls_redirect: bool = False  # plain HTTP -> 308 to https
    hsts: int | None = None  # Strict-Transport-Security max-age, opt-in
    hsts_subdomains: bool = False


@fast_state
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
    weight: int = 1

    @property
    def eligible(self) -> bool:
        """True when the replica may get new requests."""
        return self.state in ("healthy", "running")

    # Derived once per snapshot, read several times per request: `address` is host:port with
    # IPv6 hosts bracketed; `key` is the identity for health bookkeeping (a new container on
    # a reused IP starts clean).
    address: str = field(init=False, compare=False, repr=False, default="")
    key: str = field(init=False, compare=False, repr=False, default="")

    def __post_init__(self) -> None:
        host = f"[{self.host}]" if ":" in self.host else self.host
        object.__setattr__(self, "address", f"{host}:{self.port}")
        object.__setattr__(self, "key", f"{self.container_id or self.name}@{self.host}:{self.port}")


@dataclass(frozen=True, slots=True)
class Route:
    """A spec and the replicas behind it; the balancer counter is the only mutable part."""

    name: str
    source: str  # "docker", "file" or "held" (all replicas gone, kept for the hold period)
    spec: RouteSpec
    upstreams: tuple[Upstream, ...]  # every replica, eligible or not, for visibility
    pool: tuple[Upstream, ...] = field(default=(), compare=False)  # eligible replicas only
    # Smooth weighted round-robin order over `pool`, computed once per snapshot.
    sequence: tuple[int, ...] = field(default=(), compare=False, repr=False)
    counter: itertools.count[int] = field(default_factory=itertools.count, compare=False,
                                          repr=False)

    def __post_init__(self) -> None:
        pool = tuple(u for u in self.upstreams if u.eligible)
        object.__setattr__(self, "pool", pool)
        object.__setattr__(self, "sequence", weighted_sequence([u.weight for u in pool]))

    def __reduce__(self) -> tuple[type[Route], tuple[str, str, RouteSpec, tuple[Upstream, ...]]]:
        # Sent to the workers without the derived fields: each process rebuilds them and
        # starts its own balancer counter (itertools.count stops pickling in Python 3.14).
        return (Route, (self.name, self.source, self.spec, self.upstreams))


def weighted_sequence(weights: list[int]) -> tuple[int, ...]:
    """nginx's smooth weighted round robin, unrolled: weights 5,1,1 -> a a b a c a a."""
    if not weights:
        return ()
    if all(w == weights[0] for w in weights):
        return tuple(range(len(weights)))
    total = sum(weights)
    current = [0] * len(weights)
    out = []
    for _ in range(total):
        for i, w in enumerate(weights):
            current[i] += w
        best = max(range(len(weights)), key=lambda i: current[i])
        current[best] -= total
        out.append(best)
    return tuple(out)


@fast_state
@dataclass(frozen=True, slots=True)
class Skipped:
    """Why a container is not (fully) routed; shown in logs and the admin API."""

    container: str
    reason: str
    label: str | None = None
    value: str | None = None
