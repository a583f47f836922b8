"""Observations (containers, file routes) -> one immutable RouteTable with compiled matchers."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from edgeproxy.core.paths import prefixes_of
from edgeproxy.core.state import fast_state
from edgeproxy.routes.labels import LabelError, LabelsInvalid, NotRouted, Routing, parse_labels
from edgeproxy.routes.model import Container, ReplicaState, Route, RouteSpec, Skipped, Upstream

PrefixMap = dict[str, Route]


@dataclass(frozen=True, slots=True)
class FileRoute:
    """A route declared in the routes file: a spec and fixed upstream URLs.

    With `errors`, the route is invalid as the file now says it: a route that was valid before
    keeps its last good spec and upstreams (and is served); one that never was has none."""

    name: str
    spec: RouteSpec
    upstreams: tuple[Upstream, ...]
    errors: tuple[LabelError, ...] = ()

    @classmethod
    def invalid(cls, name: str, errors: tuple[LabelError, ...]) -> FileRoute:
        """A route with no good version to serve: it claims no host or path."""
        return cls(name, RouteSpec(hosts=(), paths=()), (), errors)

    @property
    def serving(self) -> bool:
        """False for a route that has no valid version at all."""
        return bool(self.upstreams)


@fast_state
@dataclass(frozen=True, slots=True)
class Decision:
    """Why one container is, or is not, routed."""

    container: str
    routed: bool
    reason: str
    route: str | None = None
    errors: tuple[LabelError, ...] = ()


@dataclass(frozen=True)
class RouteTable:
    """An immutable snapshot: routes plus host/path lookup maps compiled from them."""

    routes: tuple[Route, ...] = ()
    # Compared too: a container whose only change is a bad label must still reach /containers.
    decisions: tuple[Decision, ...] = ()
    conflicts: tuple[Skipped, ...] = ()
    _exact: dict[str, PrefixMap] = field(default_factory=dict, compare=False, repr=False)
    _wildcard: dict[str, PrefixMap] = field(default_factory=dict, compare=False, repr=False)
    _any: PrefixMap = field(default_factory=dict, compare=False, repr=False)

    def match(self, host: str, path: str) -> tuple[Route, str] | None:
        """(route, matched prefix) for a normalised path; exact host, then *.host, then any."""
        prefixes: list[str] | None = None
        maps: list[PrefixMap] = []
        if host:
            exact = self._exact.get(host)
            if exact is not None:
                maps.append(exact)
            if self._wildcard:
                dot = host.find(".")
                if dot > 0:
                    wild = self._wildcard.get(host[dot:])
                    if wild is not None:
                        maps.append(wild)
        maps.append(self._any)
        for candidates in maps:
            if not candidates:
                continue
            if prefixes is None:
                prefixes = prefixes_of(path)
            for prefix in prefixes:
                route = candidates.get(prefix)
                if route is not None:
                    return route, prefix
        return None


def replica_state(c: Container) -> tuple[ReplicaState, str]:
    """A container's eligibility for new requests, with the reason when it has none."""
    if c.state != "running":
        return "stopped", f"container is {c.state}"
    if c.stopping:
        return "draining", "stop or kill received; finishing in-flight requests"
    if c.health == "healthy":
        return "healthy", ""
    if c.health == "starting":
        return "starting", "health check has not passed yet"
    if c.health == "unhealthy":
        return "unhealthy", "Docker health check fails"
    return "running", ""


def pick_network(c: Container, wanted: str | None, default: str | None) -> tuple[str, str]:
    """(network, address) to reach a running container on; raise ValueError why not."""
    nets = dict(c.networks)
    if wanted is not None:
        name = _network_named(c, wanted, nets)
    elif default is not None and default in nets:
        name = default
    elif len(nets) == 1:
        name = next(iter(nets))
    elif not nets:
        raise ValueError("attached to no network with an address")
    else:
        raise ValueError(
            f"attached to several networks ({_names(nets)}); set the network label "
            "or EDGEPROXY_NETWORK"
        )
    address = nets[name]
    if not address:
        raise ValueError(f"no IP address on network {name!r} (host or none network mode?)")
    return name, address


COMPOSE_PROJECT = "com.docker.compose.project"


def _network_named(c: Container, wanted: str, nets: Mapping[str, str]) -> str:
    """The attached network `wanted` names: as written, else Compose's `<project>_<wanted>`.

    A compose file says `networks: [frontend]` and Compose creates `<project>_frontend`; the
    label is written beside the first, so the container's project label supplies the prefix."""
    if wanted in nets:
        return wanted
    project = c.labels.get(COMPOSE_PROJECT)
    if project and f"{project}_{wanted}" in nets:
        return f"{project}_{wanted}"
    raise ValueError(f"not attached to network {wanted!r} (attached: {_names(nets)})")


def _names(nets: Mapping[str, str]) -> str:
    return ", ".join(sorted(nets)) or "none"


def pick_port(routing: Routing, c: Container) -> int:
    """The label's port, else the only exposed TCP port, else 80."""
    if routing.port is not None:
        return routing.port
    if len(c.exposed_ports) == 1:
        return c.exposed_ports[0]
    return 80


@dataclass
class _Group:
    spec: RouteSpec
    source: str
    # file routes first, then the oldest container (created, then first seen), then name
    rank: tuple[int, float, int, str]
    name: str
    upstreams: list[Upstream] = field(default_factory=list)
    containers: list[str] = field(default_factory=list)


def build_table(
    containers: Iterable[Container],
    file_routes: Iterable[FileRoute] = (),
    *,
    label_prefix: str = "gateway",
    exposed_by_default: bool = True,
    network: str | None = None,
    failing: Mapping[str, str] | None = None,
    held: Iterable[tuple[str, RouteSpec]] = (),
) -> RouteTable:
    """Build a snapshot. Bad labels skip one container; conflicts go to the oldest claimant."""
    decisions: list[Decision] = []
    groups: dict[RouteSpec, _Group] = {}
    file_groups: list[_Group] = []
    for fr in file_routes:
        if fr.errors:
            # Shown in /containers beside the containers' label errors.
            why = "; ".join(f"{e.label}={e.value!r}: {e.reason}" for e in fr.errors)
            decisions.append(Decision(
                f"routes file: {fr.name}", fr.serving,
                (f"invalid, serving its last good version: {why}" if fr.serving
                 else f"invalid, not routed: {why}"),
                route=fr.name if fr.serving else None, errors=fr.errors))
            if not fr.serving:
                continue
        ups = list(fr.upstreams)
        if failing and fr.spec.health is not None:
            # An active check takes a routes-file replica out just as it does a container's.
            ups = [_judged(u, failing) for u in ups]
        file_groups.append(_Group(fr.spec, "file", (0, 0.0, 0, fr.name), fr.name, ups, []))

    for c in sorted(containers, key=lambda c: (c.created, c.seen, c.name)):
        try:
            routing = parse_labels(c.labels, label_prefix, exposed_by_default)
        except LabelsInvalid as exc:
            decisions.append(Decision(c.name, False, "invalid labels: " + str(exc),
                                      errors=tuple(exc.errors)))
            continue
        except Exception as exc:  # noqa: BLE001 - a parser bug must cost one container only
            decisions.append(Decision(c.name, False,
                                      f"labels could not be parsed: {type(exc).__name__}"))
            continue
        if isinstance(routing, NotRouted):
            decisions.append(Decision(c.name, False, routing.reason))
            continue
        if c.problem is not None:
            decisions.append(Decision(c.name, False, c.problem))
            continue
        state, why = replica_state(c)
        port = pick_port(routing, c)
        address = ""
        if state != "stopped":
            try:
                _, address = pick_network(c, routing.network, network)
            except ValueError as exc:
                decisions.append(Decision(c.name, False, "no reachable network: " + str(exc),
                                          errors=(LabelError(f"{label_prefix}.network",
                                                             routing.network or "", str(exc)),)))
                continue
        upstream = Upstream(routing.spec.scheme, address, port, c.name, c.id, state, why,
                            routing.weight)
        if failing and routing.spec.health is not None:
            upstream = _judged(upstream, failing)
        group = groups.get(routing.spec)
        if group is None:
            group = groups[routing.spec] = _Group(routing.spec, "docker",
                                                  (1, c.created, c.seen, c.name), c.service)
        group.upstreams.append(upstream)
        group.containers.append(c.name)

    held_groups = [_Group(spec, "held", (2, 0.0, 0, name), name) for name, spec in held
                   if spec not in groups]
    return _compile(file_groups + list(groups.values()) + held_groups, decisions)


def _judged(u: Upstream, failing: Mapping[str, str]) -> Upstream:
    """`u`, marked unhealthy when its active health check fails."""
    reason = failing.get(u.key) if u.eligible else None
    if reason is None:
        return u
    return dataclasses.replace(u, state="unhealthy", reason="active health check: " + reason)


def _compile(groups: list[_Group], decisions: list[Decision]) -> RouteTable:
    exact: dict[str, PrefixMap] = {}
    wildcard: dict[str, PrefixMap] = {}
    any_host: PrefixMap = {}
    owner: dict[tuple[str | None, str], _Group] = {}
    conflicts: list[Skipped] = []
    routes: list[Route] = []
    used_names: set[str] = set()
    lost: dict[str, str] = {}

    for group in sorted(groups, key=lambda g: g.rank):
        name = group.name
        n = 2
        while name in used_names:
            name = f"{group.name}-{n}"
            n += 1
        used_names.add(name)
        route = Route(name, group.source, group.spec,
                      tuple(sorted(group.upstreams, key=lambda u: u.name)))
        won = 0
        for host in group.spec.hosts or (None,):
            for path in group.spec.paths:
                key = (host, path)
                winner = owner.get(key)
                if winner is not None:
                    if group.source == "held":
                        continue  # a live route took the place of one we were holding
                    where = f"{host or '*'}{path}"
                    first = (f"container {winner.containers[0]}" if winner.containers
                             else f"file route {winner.name}")
                    for cname in group.containers or [f"file route {group.name}"]:
                        conflicts.append(Skipped(cname, f"lost {where} to {first}, which "
                                                 "claimed it first with other settings"))
                        lost[cname] = first
                    continue
                owner[key] = group
                won += 1
                if host is None:
                    target = any_host
                elif host.startswith("*."):
                    target = wildcard.setdefault(host[1:], {})
                else:
                    target = exact.setdefault(host, {})
                target[path] = route
        if won:
            routes.append(route)
            for u in route.upstreams:
                if u.container_id is None:
                    continue
                reason = "routed" if u.eligible else f"routed, but gets no traffic: {u.state} ({u.reason})"
                decisions.append(Decision(u.name, True, reason, route=name))
        else:
            for cname in group.containers:
                decisions.append(Decision(cname, False, f"lost a conflict with {lost[cname]}"))

    routes.sort(key=lambda r: r.name)
    return RouteTable(tuple(routes), tuple(sorted(decisions, key=lambda d: d.container)),
                      tuple(conflicts), exact, wildcard, any_host)
