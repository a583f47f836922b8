"""A Docker event stream that goes silent without closing (a socket proxy that lost its upstream,
a half-open tcp:// link) against the real engine: the silence watchdog re-opens it and re-lists,
quietly, so a container started meanwhile still gets its route."""

from __future__ import annotations

import asyncio
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from docker_fixtures import run_container, unique
from helpers import ProxyProcess, run_proxy, wait_for

DOCKER_SOCKET = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock").removeprefix(
    "unix://")
_EVENTS = re.compile(rb"GET \S*/events")


@dataclass
class _Conn:
    sent: bytearray = field(default_factory=bytearray)  # what the client sent
    frozen: bool = False


class FreezingRelay:
    """A TCP relay (DOCKER_HOST=tcp://127.0.0.1:PORT) in front of the Docker socket that can
    black-hole the event streams open at the moment of `freeze()`: they stay open, but no byte
    passes either way any more. Connections opened later pass normally."""

    def __init__(self) -> None:
        self.port = 0
        self._conns: list[_Conn] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def freeze(self) -> int:
        """Black-hole every event stream open now; return how many."""
        streams = [c for c in list(self._conns) if _EVENTS.search(bytes(c.sent))]
        for c in streams:
            c.frozen = True
        return len(streams)

    def event_streams(self) -> int:
        """How many event streams were opened through the relay so far."""
        return sum(1 for c in list(self._conns) if _EVENTS.search(bytes(c.sent)))

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       conn: _Conn, record: bool) -> None:
            try:
                while data := await reader.read(65536):
                    if conn.frozen:
                        continue  # swallowed: the peer waits for bytes that never come
                    if record:
                        conn.sent += data
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()

        async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            up_reader, up_writer = await asyncio.open_unix_connection(DOCKER_SOCKET)
            conn = _Conn()
            self._conns.append(conn)
            await asyncio.gather(pipe(reader, up_writer, conn, True),
                                 pipe(up_reader, writer, conn, False))

        async def main() -> None:
            self._stop = asyncio.Event()
            server = await asyncio.start_server(client, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop.wait()
            server.close()

        self._loop.run_until_complete(main())

    def __enter__(self) -> FreezingRelay:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *_: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture
def relay(docker_engine: None) -> Iterator[FreezingRelay]:
    with FreezingRelay() as r:
        yield r


def _start_behind_frozen_stream(p: ProxyProcess, relay: FreezingRelay) -> str:
    """Wait until connected, freeze the event stream, start a labelled container: its path."""
    wait_for(lambda: p.admin("/healthz")["docker"] == "connected", 15, what="docker connected")
    wait_for(relay.event_streams, 5, what="an event stream through the relay")
    assert relay.freeze() >= 1
    path = "/" + unique("quiet")
    run_container(unique("c"), {"gateway.path": path, "gateway.strip_prefix": "true"})
    return path


def _routed(p: ProxyProcess, path: str, health: list[tuple[Any, ...]]) -> bool:
    """Whether `path` has a route; each call records what /healthz said meanwhile."""
    r = requests.get(p.admin_base + "/healthz", timeout=5)
    doc = r.json()
    health.append((r.status_code, doc["status"], doc["discovery"]["state"]))
    return any(path in rt["paths"] for rt in p.admin("/routes")["routes"])


def test_a_silent_event_stream_is_reopened_and_the_new_container_routed(
        relay: FreezingRelay, tmp_path: Path) -> None:
    with run_proxy(tmp_path, docker_events_idle="2s",
                   DOCKER_HOST=f"tcp://127.0.0.1:{relay.port}") as p:
        path = _start_behind_frozen_stream(p, relay)
        health: list[tuple[Any, ...]] = []
        # The watchdog re-opens the stream at most 2s after it fell silent; the fresh list has
        # the container.
        wait_for(lambda: _routed(p, path, health), 8, what="the route of the container started "
                 "while the event stream was black-holed")
        assert p.events("docker_events_refreshed"), "expected the watchdog's refresh"
        # A quiet refresh, not a disconnection: nothing to warn about, /healthz never failing.
        assert not p.events("docker_disconnected"), p.events("docker_disconnected")
        assert not p.events("docker_unreachable"), p.events("docker_unreachable")
        assert health and all(h == (200, "ok", "connected") for h in health), health


def test_without_the_watchdog_the_frozen_stream_hides_the_container(
        relay: FreezingRelay, tmp_path: Path) -> None:
    # The control: the relay's black hole is what hides the container (the failure the watchdog
    # is for), so the test above cannot pass by some other path.
    with run_proxy(tmp_path, docker_events_idle="0",
                   DOCKER_HOST=f"tcp://127.0.0.1:{relay.port}") as p:
        path = _start_behind_frozen_stream(p, relay)
        health: list[tuple[Any, ...]] = []
        with pytest.raises(AssertionError):
            wait_for(lambda: _routed(p, path, health), 8, what="a route (it must not appear)")
        assert not p.events("docker_events_refreshed")
        assert all(h == (200, "ok", "connected") for h in health), health  # silently stale
