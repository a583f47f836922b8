"""Docker discovery: one list, then the event stream; reconnect with backoff; re-open a stream
that stays silent too long (a silence watchdog). Only Docker I/O."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import docker
import docker.errors
import requests.exceptions

from edgeproxy.control.providers import Observations
from edgeproxy.core.logs import get_logger
from edgeproxy.routes.model import Container

# Kill signals that are reloads, not stops; anything else (SIGTERM, SIGKILL, and custom stop
# signals such as httpd's SIGWINCH) takes the replica out of rotation at once.
_RELOAD_SIGNALS = frozenset(("1", "10", "12", "SIGHUP", "SIGUSR1", "SIGUSR2"))
_IGNORED_ACTIONS = ("exec_", "attach", "commit", "copy", "export", "top", "resize", "archive")
_STATUS_HEALTH = re.compile(r"\((healthy|unhealthy|health: starting)\)")


def _health_from_status(status: str) -> str | None:
    m = _STATUS_HEALTH.search(status or "")
    if not m:
        return None
    return "starting" if m.group(1) == "health: starting" else m.group(1)


def _networks(settings: Mapping[str, Any] | None) -> tuple[tuple[str, str], ...]:
    nets = (settings or {}).get("Networks") or {}
    out = []
    for name, net in nets.items():
        net = net or {}
        out.append((name, net.get("IPAddress") or net.get("GlobalIPv6Address") or ""))
    return tuple(sorted(out))


def container_from_list(item: Mapping[str, Any]) -> Container:
    """A `GET /containers/json` entry -> Container (labels, state, health, networks included)."""
    names = item.get("Names") or [item["Id"][:12]]
    ports = sorted({p["PrivatePort"] for p in item.get("Ports") or ()
                    if p.get("Type", "tcp") == "tcp" and p.get("PrivatePort")})
    return Container(
        id=item["Id"],
        name=names[0].lstrip("/"),
        labels=dict(item.get("Labels") or {}),
        state=item.get("State") or "unknown",
        health=_health_from_status(item.get("Status") or ""),
        networks=_networks(item.get("NetworkSettings")),
        exposed_ports=tuple(ports),
        created=float(item.get("Created") or 0),
    )


def _parse_created(text: str) -> float:
    text = text.rstrip("Z")
    if "." in text:  # Docker gives nanoseconds; datetime takes microseconds
        head, frac = text.split(".", 1)
        text = f"{head}.{frac[:6]}"
    try:
        # Whole seconds, as the list gives them: the conflict rule must not depend on which
        # of the two the observation came from.
        return float(int(datetime.fromisoformat(text + "+00:00").timestamp()))
    except ValueError:
        return 0.0


def container_from_inspect(item: Mapping[str, Any]) -> Container:
    """A `GET /containers/{id}/json` document -> Container."""
    config = item.get("Config") or {}
    state = item.get("State") or {}
    health = (state.get("Health") or {}).get("Status")
    exposed = sorted({int(k.split("/")[0]) for k in (config.get("ExposedPorts") or {})
                      if k.endswith("/tcp")})
    return Container(
        id=item["Id"],
        name=(item.get("Name") or item["Id"][:12]).lstrip("/"),
        labels=dict(config.get("Labels") or {}),
        state=state.get("Status") or "unknown",
        health=health if health in ("healthy", "unhealthy", "starting") else None,
        networks=_networks(item.get("NetworkSettings")),
        exposed_ports=tuple(exposed),
        created=_parse_created(item.get("Created") or ""),
    )


Post = Callable[[Callable[[], None]], None]


# --- discovery status: what /healthz reports and the log explains ----------------------------------

DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
WARN_EVERY = 60.0  # seconds between repeated docker_unreachable warnings while it keeps failing


@dataclass(frozen=True, slots=True)
class DiscoveryStatus:
    """The Docker provider's connection: `failing` makes /healthz answer 503 with the reason."""

    state: Literal["connecting", "connected", "failing"] = "connecting"
    error: str | None = None  # the last failure, as the SDK reported it
    hint: str | None = None  # what the operator can do about it
    since: float = 0.0  # time.time() when this state began
    failures: int = 0  # failed attempts in a row

    def as_json(self) -> dict[str, Any]:
        """The status as /healthz shows it."""
        return {"state": self.state, "error": self.error, "hint": self.hint,
                "since": self.since or None, "failures": self.failures}


def docker_hint(error: str, docker_host: str | None) -> str:
    """What to do about a failure to reach Docker, from the SDK's error text."""
    host = docker_host or DEFAULT_DOCKER_HOST
    if host.startswith("unix://"):
        path = host[len("unix://"):] or "/var/run/docker.sock"
        if "Permission denied" in error or "PermissionError" in error:
            return (f"this user (uid {os.getuid()}) may not open {path}: give the proxy the "
                    "socket's group (compose: group_add: [\"${DOCKER_GID}\"] with DOCKER_GID="
                    f"$(stat -c %g {path}); docker run --group-add), or set DOCKER_HOST to a "
                    "socket proxy (e.g. tcp://socket-proxy:2375)")
        if "No such file" in error or "FileNotFoundError" in error:
            return (f"no Docker socket at {path}: mount it (-v /var/run/docker.sock:{path}:ro), "
                    "or set DOCKER_HOST to a socket proxy (e.g. tcp://socket-proxy:2375)")
        if "Connection refused" in error or "ConnectionRefusedError" in error:
            return (f"nothing listens on {path}: is the Docker daemon (or the socket proxy "
                    "behind it) running?")
    elif "Connection refused" in error or "Name or service not known" in error \
            or "Temporary failure in name resolution" in error:
        return (f"DOCKER_HOST={host} does not answer: is the socket proxy running, on a network "
                "the proxy shares, and does it allow CONTAINERS and EVENTS?")
    elif "403" in error or "Forbidden" in error:
        return (f"DOCKER_HOST={host} refuses the request: a socket proxy must allow CONTAINERS "
                "and EVENTS (and INFO/VERSION for the API version)")
    return (f"check that Docker answers at DOCKER_HOST={host} (docker -H {host} ps), or set "
            "EDGEPROXY_DOCKER=false to serve the routes file only")


class _DaemonPool:
    """A few daemon threads for blocking inspects: unlike ThreadPoolExecutor's workers, they
    never hold up process exit behind a slow Docker call (a drain must end on time)."""

    def __init__(self, size: int, name: str) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._size = size
        for i in range(size):
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True).start()

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        """Run fn(*args) on one of the threads."""
        self._jobs.put(functools.partial(fn, *args))

    def shutdown(self) -> None:
        """Let the threads end once they are idle."""
        for _ in range(self._size):
            self._jobs.put(None)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with contextlib.suppress(Exception):  # each job logs its own failures
                job()


class DockerProvider:
    """Runs the blocking docker SDK in a thread and posts observations to the sink (on the
    sink's event loop). Observations are reported under `source` ("docker")."""

    source = "docker"

    def __init__(self, sink: Observations, loop: asyncio.AbstractEventLoop,
                 client_factory: Callable[[], Any] | None = None,
                 backoff_max: float = 30.0, *, quiet: bool = False,
                 events_idle: float = 0.0) -> None:
        self._sink = sink
        self._backoff_max = backoff_max
        self._state: bool | None = None  # connected, as last reported
        # Only one provider (quiet=False) explains failures at warning level.
        self._quiet = quiet
        self.status = DiscoveryStatus(since=time.time())
        self._warned_at = -WARN_EVERY
        self._loop = loop
        self._factory = client_factory or (lambda: docker.from_env(timeout=10).api)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._api: Any = None
        self._log = get_logger("docker")
        self.reconnects = 0
        self._seq: dict[str, int] = {}
        self._inspectors = _DaemonPool(4, "docker-inspect")
        self.on_reconnect: Callable[[], None] | None = None
        self.last_event = 0.0
        # The silence watchdog: a stream quiet for `events_idle` seconds (0 = never) is closed
        # and re-opened with a fresh list. A socket proxy that lost its upstream, or a half-open
        # tcp:// connection, keeps the stream open but silent: without this the table goes stale.
        self._events_idle = events_idle
        self._watch_lock = threading.Lock()
        self._followed: Any = None  # the event stream being read, while it is
        self._heard = 0.0  # time.monotonic() of its opening or of its last event
        self._refresh = False  # the watchdog closed the stream: re-open it, it is no failure
        self.refreshes = 0
        self._watchdog: threading.Thread | None = None

    def start(self) -> None:
        """Start the discovery thread."""
        self._thread = threading.Thread(target=self._run, name="docker-events", daemon=True)
        self._thread.start()
        if self._events_idle > 0:
            self._watchdog = threading.Thread(target=self._watch, name="docker-events-watchdog",
                                              daemon=True)
            self._watchdog.start()

    def stop(self) -> None:
        """Ask the thread to end; closing the client unblocks its read."""
        self._stop.set()
        self._inspectors.shutdown()
        with self._watch_lock:
            events, self._followed = self._followed, None
        if events is not None:
            with contextlib.suppress(Exception):
                events.close()  # shuts the stream's socket: its blocked read returns at once
        api = self._api
        if api is not None:
            with contextlib.suppress(Exception):  # a half-dead client may fail to close
                api.close()

    def _post(self, fn: Callable[[], None]) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn)

    def _run(self) -> None:
        backoff = 0.25
        first = True
        refresh = False
        while not self._stop.is_set():
            try:
                self._api = api = self._factory()
                # Open the stream before listing: nothing can fall between the two.
                events = api.events(decode=True, filters={"type": ["container", "network"]})
                items = api.containers(all=True)
                containers = [container_from_list(i) for i in items]
                self._seq.clear()  # inspects still in flight predate this list: drop them
                self._post(functools.partial(self._sink.resync, containers, self.source))
                self._post(functools.partial(self._connected, len(containers), first, refresh))
                first = refresh = False
                backoff = 0.25
                self._watch_stream(events)
                try:
                    self._follow(api, events)
                except Exception:
                    if not self._refreshing():
                        raise
                    refresh = True  # the watchdog's close may surface as a read error
                finally:
                    self._watch_stream(None)
                if self._stop.is_set():
                    return
                if refresh or self._refreshing():
                    # A quiet stream, not a lost daemon: re-open and re-list at once, quietly.
                    refresh = True
                    self.refreshes += 1
                    self._log.debug("docker_events_refreshed", idle_s=self._events_idle)
                    self._close_quietly()
                    continue
                raise ConnectionError("event stream ended")
            except Exception as exc:  # noqa: BLE001 - any failure means: reconnect
                if self._stop.is_set():
                    return
                refresh = False
                self.reconnects += 1
                if self.on_reconnect is not None:
                    self.on_reconnect()
                reason = f"{type(exc).__name__}: {exc}"[:300]
                self._post(functools.partial(self._disconnected, reason, backoff))
                self._close_quietly()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self._backoff_max)

    def _watch_stream(self, events: Any) -> None:
        """Hand the watchdog the stream now read, its silence counted from now (None: no
        stream is read; a refresh mark stays for _run to take)."""
        with self._watch_lock:
            self._followed = events
            self._heard = time.monotonic()
            if events is not None:
                self._refresh = False
            stopped = events is not None and self._stop.is_set()
        if stopped:  # stop() ran before this stream was known: close it here
            with contextlib.suppress(Exception):
                events.close()

    def _refreshing(self) -> bool:
        """Whether the watchdog closed the stream (and clear the mark)."""
        with self._watch_lock:
            refresh, self._refresh = self._refresh, False
            return refresh

    def _watch(self) -> None:
        """The silence watchdog: close the stream once it has said nothing for events_idle."""
        idle = self._events_idle
        while True:
            with self._watch_lock:
                events = self._followed
                quiet = time.monotonic() - self._heard
                due = events is not None and quiet >= idle
                if due:
                    self._followed = None  # closed once; _run hands over the next stream
                    self._refresh = True
            if due:
                with contextlib.suppress(Exception):  # a half-dead stream may fail to close
                    events.close()
            # Wake when the current stream would be due; with none, check again within idle.
            wait = idle - quiet if events is not None and not due else idle
            if self._stop.wait(max(wait, 0.05)):
                return

    def _close_quietly(self) -> None:
        with contextlib.suppress(Exception):
            if self._api is not None:
                self._api.close()

    def _connected(self, count: int, first: bool, refresh: bool = False) -> None:
        was = self._state
        self._state = True
        self._sink.connected(True, self.source)
        before, now = self.status, time.time()
        if refresh and before.state == "connected":
            # The watchdog's re-open of a quiet stream: the connection never failed.
            self._log.debug("docker_resynced", containers=count, refresh=True)
            return
        self.status = DiscoveryStatus("connected", since=now)
        event = "docker_connected" if first else "docker_resynced"
        (self._log.debug if self._quiet else self._log.info)(
            event, containers=count, previously_connected=was)
        if before.state == "failing" and not self._quiet:
            self._log.info("docker_recovered", failures=before.failures,
                           down_s=round(now - before.since, 1))

    def _disconnected(self, reason: str, backoff: float) -> None:
        before = self.status
        failing = before.state == "failing"
        host = os.environ.get("DOCKER_HOST")
        self.status = DiscoveryStatus("failing", reason, docker_hint(reason, host),
                                      before.since if failing else time.time(),
                                      before.failures + 1)
        fields = {"reason": reason, "hint": self.status.hint, "docker_host":
                  host or DEFAULT_DOCKER_HOST, "failures": self.status.failures,
                  "retry_in_s": backoff}
        now = time.monotonic()
        if self._quiet:
            self._log.debug("docker_unreachable", **fields)
        elif self._state is not False:  # was connected, or first attempt
            self._warned_at = now
            self._log.warning("docker_disconnected", **fields)
        elif now - self._warned_at >= WARN_EVERY:
            # First failure, then once a minute until it works: loud enough, never a flood.
            self._warned_at = now
            self._log.warning("docker_unreachable", **fields)
        else:
            self._log.debug("docker_unreachable", **fields)
        self._state = False
        self._sink.connected(False, self.source)

    def _follow(self, api: Any, events: Iterator[Mapping[str, Any]]) -> None:
        for ev in events:
            if self._stop.is_set():
                return
            self.last_event = time.time()
            with self._watch_lock:
                self._heard = time.monotonic()
            self._handle(api, ev)

    def _handle(self, api: Any, ev: Mapping[str, Any]) -> None:
        action = str(ev.get("Action") or ev.get("status") or "")
        actor = ev.get("Actor") or {}
        attrs = actor.get("Attributes") or {}
        if ev.get("Type") == "network":
            if action not in ("connect", "disconnect"):
                return
            cid = attrs.get("container")
        else:
            cid = actor.get("ID") or ev.get("id")
        if not cid or action.startswith(_IGNORED_ACTIONS):
            return
        w, source = self._sink, self.source
        signal = str(attrs.get("signal", ""))
        if (action == "kill" and signal not in _RELOAD_SIGNALS) or action == "stop":
            self._post(lambda: w.stopping(cid))
            return
        if action == "destroy":
            self._post(lambda: w.remove(cid, source))
            self._seq.pop(cid, None)
            return
        if action in ("start", "restart", "unpause"):
            self._post(lambda: w.started(cid))
        # Each inspecting event bumps the container's sequence: an inspect answered after a
        # newer one was asked for (or after the destroy) is dropped, never applied late.
        seq = self._seq[cid] = self._seq.get(cid, 0) + 1
        stamp = ev.get("timeNano")
        # Inspects run beside the event stream: Docker answers a 'network connect' inspect only
        # once the container's start completes, and events must not queue behind it.
        self._inspectors.submit(self._inspect, api, cid, seq, stamp / 1e9 if stamp else None)

    def _inspect(self, api: Any, cid: str, seq: int, event_time: float | None) -> None:
        try:
            doc = api.inspect_container(cid)
        except docker.errors.NotFound:
            self._post(lambda: self._sink.remove(cid, self.source))
            return
        except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
            self._log.warning("docker_inspect_failed", container=cid[:12], error=str(exc)[:200])
            return
        except Exception as exc:  # noqa: BLE001 - a worker thread must never die silently
            self._log.warning("docker_inspect_failed", container=cid[:12],
                              error=f"{type(exc).__name__}: {exc}"[:200])
            return
        if self._seq.get(cid) != seq:
            return  # a newer event's inspect will tell the current state
        c = container_from_inspect(doc)
        self._post(functools.partial(self._apply, c, cid, seq, event_time))

    def _apply(self, c: Container, cid: str, seq: int, event_time: float | None) -> None:
        if self._seq.get(cid) != seq:
            return
        self._sink.update(c, self.source)
        if event_time is not None:
            self._sink.observed_lag(max(0.0, time.time() - event_time), self.source)
