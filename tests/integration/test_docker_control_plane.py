"""One control plane per proxy against the real Docker Engine: one list and one event stream
whatever the number of workers, and a killed control plane resyncs without costing traffic."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from docker_fixtures import run_container, unique
from helpers import run_proxy, wait_for
from test_control_plane import Loop, agreed, control_pid, fresh_get

DOCKER_SOCKET = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock").removeprefix(
    "unix://")
_REQUEST_LINE = re.compile(rb"(?:^|\r\n)(GET|POST|HEAD|PUT|DELETE) (\S+) HTTP/1\.[01]\r\n")


class CountingRelay:
    """A Unix-socket relay in front of the Docker socket that records every request line."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._sent: list[bytearray] = []  # what each client connection sent
        self.list_delay = 0.0  # seconds to hold each `GET /containers/json` back
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def requests(self) -> list[str]:
        """'GET /v1.45/events?...' for every request seen so far."""
        out = []
        for sent in list(self._sent):
            out += [f"{m.group(1).decode()} {m.group(2).decode()}"
                    for m in _REQUEST_LINE.finditer(bytes(sent))]
        return out

    def count(self, pattern: str) -> int:
        return sum(1 for r in self.requests() if re.search(pattern, r))

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       record: bytearray | None) -> None:
            try:
                while data := await reader.read(65536):
                    if record is not None:
                        record += data
                        if self.list_delay and re.search(rb"GET \S*/containers/json", data):
                            await asyncio.sleep(self.list_delay)
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()

        async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            up_reader, up_writer = await asyncio.open_unix_connection(DOCKER_SOCKET)
            record = bytearray()
            self._sent.append(record)
            await asyncio.gather(pipe(reader, up_writer, record), pipe(up_reader, writer, None))

        async def main() -> None:
            self._stop = asyncio.Event()
            server = await asyncio.start_unix_server(client, path=self.path)
            self._ready.set()
            await self._stop.wait()
            server.close()

        self._loop.run_until_complete(main())

    def __enter__(self) -> CountingRelay:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *_: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture
def relay(docker_engine: None, tmp_path: Path) -> Iterator[CountingRelay]:
    with CountingRelay(str(tmp_path / "docker.sock")) as r:
        yield r


def test_three_workers_make_one_list_and_one_event_stream(relay: CountingRelay,
                                                          tmp_path: Path) -> None:
    with run_proxy(tmp_path, workers="3", DOCKER_HOST=f"unix://{relay.path}") as p:
        wait_for(lambda: p.admin("/healthz")["docker"] == "connected", 15,
                 what="docker connected")
        path = "/" + unique("one")
        run_container(unique("c"), {"gateway.path": path, "gateway.strip_prefix": "true"})
        wait_for(lambda: agreed(p, 3) and fresh_get(p.url(path + "/")).status_code == 200,
                 15, what="the container routable")
        assert relay.count(r"^GET (/v[\d.]+)?/events") == 1, relay.requests()
        assert relay.count(r"^GET (/v[\d.]+)?/containers/json") == 1, relay.requests()
        # Each event's container is inspected once, by the one control plane.
        inspects = relay.count(r"^GET (/v[\d.]+)?/containers/[0-9a-f]{64}/json")
        assert 1 <= inspects <= 4, relay.requests()


def test_a_killed_control_plane_resyncs_and_workers_keep_serving(relay: CountingRelay,
                                                                 tmp_path: Path) -> None:
    with run_proxy(tmp_path, workers="2", DOCKER_HOST=f"unix://{relay.path}") as p:
        wait_for(lambda: p.admin("/healthz")["docker"] == "connected", 15,
                 what="docker connected")
        before = "/" + unique("before")
        run_container(unique("c"), {"gateway.path": before, "gateway.strip_prefix": "true"})
        wait_for(lambda: agreed(p, 2) and fresh_get(p.url(before + "/")).status_code == 200,
                 15, what="the first container routable")
        old = control_pid(p)
        with Loop(p.url(before + "/")) as loop:
            wait_for(lambda: sum(loop.codes.values()) > 20, 10, what="traffic")
            # Hold the supervisor so that the container below starts while no control plane
            # runs: only a resync after the restart can find it.
            os.kill(p.proc.pid, signal.SIGSTOP)
            # A slow Docker list: the workers reconnect before the new control plane has it,
            # and must keep their table until it does.
            relay.list_delay = 1.5
            try:
                os.kill(old, signal.SIGKILL)
                meanwhile = "/" + unique("meanwhile")
                run_container(unique("c"), {"gateway.path": meanwhile, "gateway.strip_prefix": "true"})
                count = sum(loop.codes.values())
                wait_for(lambda: sum(loop.codes.values()) > count + 20, 10,
                         what="traffic without a control plane")
            finally:
                os.kill(p.proc.pid, signal.SIGCONT)
            wait_for(lambda: fresh_get(p.url(meanwhile + "/")).status_code == 200, 20,
                     what="the container started meanwhile routable")
            assert control_pid(p) != old
        assert set(loop.codes) == {200}, loop.codes
        assert loop.errors == 0
        ws = requests.get(p.admin_base + "/healthz", timeout=5).json()["workers"]
        assert len({w["table"] for w in ws}) == 1
