"""Swarm discovery: services (their labels) and tasks (the replicas) -> Container observations.

The pure half turns `GET /services`, `GET /tasks` and `GET /networks` answers into the same
`Container` observations the Docker provider makes, so label parsing, table building, the hold
period and the "why not routed" reasons apply unchanged: one observation per task (id = task
id), carrying the service's labels and the task's address on the chosen network.

The I/O half (`SwarmProvider`) costs one filtered `GET /tasks` per poll (Docker emits no task
events, moby#37403) plus `GET /services` and `GET /networks` at start and on service events;
never an inspect per task nor a node lookup per task. Task container events on this node
(kill, die, start, health) cut the wait: a kill drains the task at once, a start polls at once.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import docker

from edgeproxy.core.logs import get_logger
from edgeproxy.core.settings import Settings
from edgeproxy.routes.model import Container

SOURCE = "swarm"
"""The source name this provider reports under."""

INGRESS = "ingress"
TASK_LABEL = "com.docker.swarm.task.id"
SERVICE_LABEL = "com.docker.swarm.service.id"

# Task states on the way to running: the task is shown (not eligible) so that a route whose
# tasks are all starting answers 503, not 404. Anything after running is gone.
_COMING = frozenset(("new", "pending", "assigned", "accepted", "preparing", "ready", "starting"))
_ALIVE = frozenset(("starting", "running"))
_RELOAD_SIGNALS = frozenset(("1", "10", "12", "SIGHUP", "SIGUSR1", "SIGUSR2"))
_FAST_POLL = 0.1  # seconds between polls for _FAST_WINDOW after a task container's event
_FAST_WINDOW = 2.0


class SwarmModeError(RuntimeError):
    """EDGEPROXY_SWARM=true, but the daemon can't list services (not an active manager)."""


# --- pure: JSON -> observations -------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Service:
    """What a task needs from its service: labels, naming and the endpoint choice."""

    id: str
    name: str
    labels: Mapping[str, str]  # gateway.swarm.endpoint removed: the label parser doesn't know it
    created: float
    namespace: str | None  # the stack's name: networks are named <stack>_<network>
    endpoint: str  # "tasks" or "vip"
    vips: tuple[tuple[str, str], ...]  # (network name, virtual IP) without the ingress
    dnsrr: bool
    problem: str | None = None  # a bad gateway.swarm.endpoint


def _seconds(text: str | None) -> float:
    """Docker's RFC 3339 time (nanoseconds) -> whole epoch seconds; 0 when unreadable."""
    text = (text or "").rstrip("Z")
    if "." in text:
        head, frac = text.split(".", 1)
        text = f"{head}.{frac[:6]}"
    try:
        return float(int(datetime.fromisoformat(text + "+00:00").timestamp()))
    except ValueError:
        return 0.0


def _address(cidr: str) -> str:
    return cidr.split("/", 1)[0]


def network_names(networks: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """A `GET /networks` answer -> {id: name}."""
    return {n["Id"]: n.get("Name") or n["Id"] for n in networks if n.get("Id")}


def service_from_json(item: Mapping[str, Any], names: Mapping[str, str],
                      prefix: str = "gateway") -> Service:
    """One `GET /services` entry -> Service; `names` maps network ids to names for VIPs."""
    spec = item.get("Spec") or {}
    labels = dict(spec.get("Labels") or {})
    key = f"{prefix}.swarm.endpoint"
    raw = labels.pop(key, None)
    endpoint, problem = "tasks", None
    if raw is not None:
        value = raw.strip().lower()
        if value in ("tasks", "vip"):
            endpoint = value
        else:
            problem = f"invalid labels: {key}={raw!r} is invalid: expected vip or tasks"
    mode = ((spec.get("EndpointSpec") or {}).get("Mode") or "vip").lower()
    vips = []
    for vip in (item.get("Endpoint") or {}).get("VirtualIPs") or ():
        name = names.get(vip.get("NetworkID") or "", vip.get("NetworkID") or "")
        if name and name != INGRESS and vip.get("Addr"):
            vips.append((name, _address(vip["Addr"])))
    name = spec.get("Name") or item["ID"]
    return Service(
        id=item["ID"], name=name, labels=labels, created=_seconds(item.get("CreatedAt")),
        namespace=labels.get("com.docker.stack.namespace"), endpoint=endpoint,
        vips=tuple(sorted(vips)), dnsrr=mode == "dnsrr", problem=problem)


def services_from_json(items: Iterable[Mapping[str, Any]], networks: Iterable[Mapping[str, Any]],
                       prefix: str = "gateway") -> dict[str, Service]:
    """`GET /services` and `GET /networks` answers -> {service id: Service}."""
    names = network_names(networks)
    return {s.id: s for s in (service_from_json(i, names, prefix) for i in items)}


def choose_networks(attached: Sequence[tuple[str, str]], wanted: str | None,
                    default: str | None, namespace: str | None) -> tuple[tuple[str, str], ...]:
    """The networks to hand to the table, named as it will look for them.

    `wanted` (gateway.network) or else `default` (EDGEPROXY_NETWORK) matches a network by its
    name or, in a stack, by `<stack>_<name>`; the match is handed on under the name asked for,
    alone. Without a match every network goes on, and the table says why it can't choose."""
    by_name = dict(attached)
    for target in (wanted, default):
        if target is None:
            continue
        for candidate in (target, f"{namespace}_{target}" if namespace else None):
            if candidate is not None and candidate in by_name:
                return ((target, by_name[candidate]),)
        if target is wanted:
            break  # a label that names a missing network is an error, not a fallback
    return tuple(sorted(attached))


def _task_name(service: Service, task: Mapping[str, Any]) -> str:
    # Docker's own container naming: <service>.<slot>.<task id>, global services by node.
    slot = task.get("Slot") or task.get("NodeID") or "0"
    return f"{service.name}.{slot}.{task['ID']}"


def _service_labels(service: Service) -> dict[str, str]:
    return {**service.labels, "com.docker.swarm.service.name": service.name,
            SERVICE_LABEL: service.id}


def _wanted_network(service: Service, prefix: str) -> str | None:
    value = service.labels.get(f"{prefix}.network")
    return value.strip() if value and value.strip() else None


def task_to_container(service: Service, task: Mapping[str, Any], *, prefix: str = "gateway",
                      network: str | None = None) -> Container | None:
    """One `GET /tasks` entry -> a Container observation, or None when it is no replica.

    Replicas are tasks whose desired state is running; those running are eligible, those on
    the way ("starting" also means: its HEALTHCHECK has not passed yet) are shown but get no
    traffic. A task whose desired state is anything else (shutdown in a rolling update, remove
    on scale down) but still runs is draining: no new requests."""
    state = str((task.get("Status") or {}).get("State") or "").lower()
    desired = str(task.get("DesiredState") or "").lower()
    if desired == "running":
        if state not in _COMING and state != "running":
            return None
    elif state not in _ALIVE:
        return None
    attached: list[tuple[str, str]] = []
    ingress = False
    for att in task.get("NetworksAttachments") or ():
        name = ((att.get("Network") or {}).get("Spec") or {}).get("Name") or ""
        if name == INGRESS:
            ingress = True
            continue
        addresses = att.get("Addresses") or ()
        if name and addresses:
            attached.append((name, _address(addresses[0])))
    labels = {**_service_labels(service), TASK_LABEL: str(task["ID"])}
    problem = service.problem or _port_problem(service, prefix)
    if problem is None and not attached:
        problem = ("attached only to the ingress network, which edgeproxy never routes to: "
                   "attach the service to an overlay network the proxy is on" if ingress else
                   "attached to no overlay network: attach the service to one the proxy is on")
    return Container(
        id=str(task["ID"]),
        name=_task_name(service, task),
        labels=labels,
        state="running" if state in _ALIVE else state,
        health="starting" if state == "starting" else None,
        networks=choose_networks(attached, _wanted_network(service, prefix), network,
                                 service.namespace),
        exposed_ports=(),
        created=service.created,
        stopping=desired != "running",
        problem=problem,
    )


def _port_problem(service: Service, prefix: str) -> str | None:
    if f"{prefix}.port" in service.labels:
        return None
    return (f"{prefix}.port is missing: Swarm does no port detection, so a service needs "
            f"{prefix}.port (deploy.labels in a stack file)")


def vip_container(service: Service, tasks: Sequence[Mapping[str, Any]], *,
                  prefix: str = "gateway", network: str | None = None) -> Container | None:
    """gateway.swarm.endpoint=vip: one observation for the service's virtual IP, present while
    at least one task runs or starts (none: the route is held, 503)."""
    states = [str((t.get("Status") or {}).get("State") or "").lower() for t in tasks
              if str(t.get("DesiredState") or "").lower() == "running"]
    if not any(s in _ALIVE for s in states):
        return None
    problem = service.problem or _port_problem(service, prefix)
    if problem is None and service.dnsrr:
        problem = (f"{prefix}.swarm.endpoint=vip needs a virtual IP, and this service uses "
                   "endpoint_mode dnsrr: use tasks, or endpoint_mode vip")
    if problem is None and not service.vips:
        problem = "has no virtual IP on an overlay network (only the ingress, or none)"
    return Container(
        id=service.id,
        name=f"{service.name} (vip)",
        labels=_service_labels(service),
        state="running",
        health=None if "running" in states else "starting",
        networks=choose_networks(service.vips, _wanted_network(service, prefix), network,
                                 service.namespace),
        exposed_ports=(),
        created=service.created,
        problem=problem,
    )


def observe(services: Mapping[str, Service], tasks: Iterable[Mapping[str, Any]], *,
            prefix: str = "gateway", network: str | None = None) -> list[Container]:
    """Every observation for one poll: a task per replica, or a VIP per service in vip mode.

    Tasks of a service not in `services` are left out (the caller refetches the services)."""
    out: list[Container] = []
    by_service: dict[str, list[Mapping[str, Any]]] = {}
    for t in tasks:
        by_service.setdefault(str(t.get("ServiceID") or ""), []).append(t)
    for sid, items in by_service.items():
        service = services.get(sid)
        if service is None:
            continue
        if service.endpoint == "vip":
            c = vip_container(service, items, prefix=prefix, network=network)
            if c is not None:
                out.append(c)
            continue
        for t in items:
            c = task_to_container(service, t, prefix=prefix, network=network)
            if c is not None:
                out.append(c)
    return sorted(out, key=lambda c: c.id)


def unknown_services(services: Mapping[str, Any], tasks: Iterable[Mapping[str, Any]]) -> bool:
    """True when a task belongs to a service we have not listed (a missed service event)."""
    return any(str(t.get("ServiceID") or "") not in services for t in tasks)


def swarm_role(info: Mapping[str, Any]) -> str:
    """`GET /info` -> "manager", "worker" or "off" (no swarm, or not active)."""
    sw = info.get("Swarm") or {}
    if str(sw.get("LocalNodeState") or "").lower() != "active":
        return "off"
    return "manager" if sw.get("ControlAvailable") else "worker"


def mode_error(role: str) -> SwarmModeError:
    """The error for EDGEPROXY_SWARM=true on a daemon that can't list services."""
    what = ("is a Swarm worker, and only managers can list services and tasks" if role == "worker"
            else "is not in an active Swarm")
    return SwarmModeError(
        f"EDGEPROXY_SWARM=true, but the Docker daemon {what}: run the proxy on a manager node "
        "(deploy.placement.constraints: [node.role == manager]) or point DOCKER_HOST at a "
        "socket proxy on a manager; or set EDGEPROXY_SWARM=auto or false")


def probe(settings: Settings, client_factory: Callable[[], Any] | None = None) -> str:
    """The daemon's swarm role; raise SwarmModeError for EDGEPROXY_SWARM=true off a manager.

    A daemon that does not answer is no error here: the provider retries like the Docker one."""
    if settings.swarm == "false" or not settings.docker:
        return "off"
    factory = client_factory or (lambda: docker.from_env(timeout=10).api)
    try:
        api = factory()
        try:
            role = swarm_role(api.info())
        finally:
            with contextlib.suppress(Exception):
                api.close()
    except Exception:  # noqa: BLE001 - unreachable now: decided when the provider connects
        return "unknown"
    if settings.swarm == "true" and role != "manager":
        raise mode_error(role)
    return role


# --- where observations go ------------------------------------------------------------------

class SwarmSink(Protocol):
    """What the provider needs of `providers.Observations` (the Watcher implements it)."""

    def resync(self, items: Iterable[Container], source: str = "docker") -> None:
        """Replace every observation of `source` (other sources keep theirs)."""

    def stopping(self, item_id: str) -> None:
        """The replica is being stopped: no new requests, in-flight ones finish."""

    def connected(self, up: bool, source: str = "docker") -> None:
        """The source's API answers (True) or not (False)."""


# --- I/O: the provider ----------------------------------------------------------------------

class SwarmProvider:
    """Polls tasks, follows service events, posts whole snapshots to the sink (on the loop).

    Two threads run the blocking docker SDK: one polls (`GET /tasks`, and `GET /services` +
    `GET /networks` when they may have changed), one follows the event stream and wakes the
    poller early. Any failure means: reconnect with backoff and resync."""

    def __init__(self, sink: SwarmSink, post: Callable[[Callable[[], None]], None],
                 settings: Settings, client_factory: Callable[[], Any] | None = None) -> None:
        self._sink = sink
        self._post = post
        self._settings = settings
        self._factory = client_factory or (lambda: docker.from_env(timeout=10).api)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._services_stale = True
        self._services: dict[str, Service] = {}
        self._last: list[Container] | None = None
        self._fast_until = 0.0
        self._events_api: Any = None
        self._following = False
        self._apis: list[Any] = []
        self._threads: list[threading.Thread] = []
        self._log = get_logger("swarm")
        self.polls = 0
        self.service_lists = 0
        self.reconnects = 0
        self.role = "unknown"
        self.on_containers: Callable[[Mapping[str, str]], None] | None = None

    def start(self) -> None:
        """Start the poller; it starts the event follower once the daemon is a manager."""
        self._spawn(self._poll_loop, "swarm-poll")

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        """Ask both threads to end; closing the clients unblocks their reads."""
        self._stop.set()
        self._wake.set()
        for api in list(self._apis):
            with contextlib.suppress(Exception):
                api.close()

    def poke(self) -> None:
        """Poll now rather than at the next tick."""
        self._wake.set()

    # --- polling ---

    def _connect(self) -> Any:
        api = self._factory()
        self._apis.append(api)
        return api

    def _drop(self, api: Any) -> None:
        with contextlib.suppress(Exception):
            api.close()
        with contextlib.suppress(ValueError):
            self._apis.remove(api)

    def _check_role(self, api: Any) -> bool:
        """True to go on; False when Swarm is off and EDGEPROXY_SWARM=auto (stop quietly)."""
        role = swarm_role(api.info())
        if role != self.role:
            self._log.info("swarm_role", role=role, mode=self._settings.swarm)
        self.role = role
        if role == "manager":
            return True
        if self._settings.swarm == "true":
            raise mode_error(role)
        return False

    def _poll_loop(self) -> None:
        backoff = 0.25
        failing = False
        while not self._stop.is_set():
            api = None
            try:
                api = self._connect()
                if not self._check_role(api):
                    self._log.info("swarm_off", reason=f"the daemon is a Swarm {self.role}"
                                   if self.role == "worker" else "the daemon is not in a Swarm")
                    return
                self._services_stale = True
                if not self._following:  # no event stream on a daemon without Swarm
                    self._following = True
                    self._spawn(self._event_loop, "swarm-events")
                while not self._stop.is_set():
                    self.poll_once(api)
                    if failing:
                        self._log.info("swarm_resynced", observations=len(self._last or ()))
                        failing = False
                    backoff = 0.25
                    # After a task container's event its task's state follows within a few
                    # hundred ms (starting -> running): poll fast for a moment to catch it.
                    fast = time.monotonic() < self._fast_until
                    self._wake.wait(min(_FAST_POLL, self._settings.swarm_poll) if fast
                                    else self._settings.swarm_poll)
                    self._wake.clear()
                    # A burst of events wakes us once: a short pause lets it settle.
                    self._stop.wait(0.05)
            except Exception as exc:  # noqa: BLE001 - any failure means: reconnect, resync
                if self._stop.is_set():
                    return
                self.reconnects += 1
                reason = f"{type(exc).__name__}: {exc}"[:300]
                # The event stream may hang on the same dead peer (a socket proxy killed
                # without a RST): close it so that it reconnects too.
                events_api = self._events_api
                if events_api is not None:
                    with contextlib.suppress(Exception):
                        events_api.close()
                if not failing:
                    self._log.warning("swarm_disconnected", reason=reason, retry_in_s=backoff)
                    self._post(functools.partial(self._sink.connected, False, SOURCE))
                failing = True
                if api is not None:
                    self._drop(api)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self._settings.docker_backoff_max)

    def poll_once(self, api: Any) -> bool:
        """One poll: tasks (and services when stale); post the snapshot if it changed."""
        s = self._settings
        if self._services_stale:
            self._refresh_services(api)
        tasks = api.tasks(filters={"desired-state": "running"})
        self.polls += 1
        if unknown_services(self._services, tasks):
            self._refresh_services(api)
        items = observe(self._services, tasks, prefix=s.label_prefix, network=s.network)
        containers = {str(((t.get("Status") or {}).get("ContainerStatus") or {})
                          .get("ContainerID") or ""): str(t["ID"]) for t in tasks}
        containers.pop("", None)
        first = self._last is None
        if items == self._last:
            return False
        self._last = items
        on_containers = self.on_containers
        if on_containers is not None:
            on_containers(containers)
        self._post(functools.partial(self._sink.resync, items, SOURCE))
        if first:
            self._post(functools.partial(self._sink.connected, True, SOURCE))
            self._log.info("swarm_connected", services=len(self._services),
                           observations=len(items))
        return True

    def _refresh_services(self, api: Any) -> None:
        # Flag first: an event that lands while we list marks it stale again.
        self._services_stale = False
        networks = api.networks(filters={"scope": "swarm"})
        self._services = services_from_json(api.services(), networks,
                                            self._settings.label_prefix)
        self.service_lists += 1

    # --- events ---

    def _event_loop(self) -> None:
        backoff = 0.25
        while not self._stop.is_set():
            api = None
            try:
                self._events_api = api = self._connect()
                events = api.events(decode=True, filters={"type": ["service", "container"]})
                self._services_stale = True  # whatever we missed while not following
                self._wake.set()
                backoff = 0.25
                for ev in events:
                    if self._stop.is_set():
                        return
                    self._handle(ev)
                raise ConnectionError("event stream ended")
            except Exception:  # noqa: BLE001 - the poller reports; just reconnect
                if self._stop.is_set():
                    return
                if api is not None:
                    self._drop(api)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self._settings.docker_backoff_max)

    def _handle(self, ev: Mapping[str, Any]) -> None:
        kind = ev.get("Type")
        action = str(ev.get("Action") or "")
        attrs = (ev.get("Actor") or {}).get("Attributes") or {}
        if kind == "service":
            self._services_stale = True
            self._wake.set()
            return
        task = attrs.get(TASK_LABEL)
        if kind != "container" or not task or action.startswith("exec_"):
            return
        signal = str(attrs.get("signal", ""))
        if (action == "kill" and signal not in _RELOAD_SIGNALS) or action in ("stop", "die"):
            # The orchestrator turned the task's desired state before this: drain it now
            # rather than at the next poll.
            self._post(functools.partial(self._sink.stopping, task))
        if action in ("start", "die", "destroy") or action.startswith("health_status"):
            self._fast_until = time.monotonic() + _FAST_WINDOW
            self._wake.set()


def start_swarm(sink: SwarmSink, loop: Any, settings: Settings,
                on_containers: Callable[[Mapping[str, str]], None] | None = None,
                ) -> SwarmProvider | None:
    """Start a SwarmProvider reporting to `sink` on `loop`; None when Swarm mode is off.

    `on_containers` gets {container id: task id} after each changed poll (to drain a task
    when its container's kill event arrives through the Docker provider)."""
    if settings.swarm == "false" or not settings.docker:
        return None

    def post(fn: Callable[[], None]) -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(fn)

    provider = SwarmProvider(sink, post, settings)
    provider.on_containers = on_containers
    provider.start()
    return provider
