"""The Docker provider's silence watchdog against a fake docker client: a quiet stream is re-opened
and re-listed without a disconnection; a failed re-open is one; stop() ends both threads."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import wait_for

from edgeproxy.control.providers.docker import DockerProvider


class FakeStream:
    """A blocking event stream; close() ends it from another thread, as CancellableStream's."""

    def __init__(self) -> None:
        self.items: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self.closed = threading.Event()

    def __iter__(self) -> FakeStream:
        return self

    def __next__(self) -> dict[str, Any]:
        while not self.closed.is_set():
            try:
                return self.items.get(timeout=0.01)
            except queue.Empty:
                pass
        raise StopIteration

    def close(self) -> None:
        self.closed.set()


class FakeDocker:
    """What DockerProvider's client factory returns; `fail_from` fails the Nth client on."""

    def __init__(self, fail_from: int | None = None) -> None:
        self.streams: list[FakeStream] = []
        self.lists = 0
        self.clients = 0
        self.fail_from = fail_from

    def __call__(self) -> FakeDocker:
        self.clients += 1
        if self.fail_from is not None and self.clients >= self.fail_from:
            raise ConnectionError("Connection refused")
        return self

    def events(self, **_: Any) -> FakeStream:
        self.streams.append(FakeStream())
        return self.streams[-1]

    def containers(self, **_: Any) -> list[dict[str, Any]]:
        self.lists += 1
        return []

    def close(self) -> None:
        pass


class Sink:
    """Records what the provider reports."""

    def __init__(self) -> None:
        self.ups: list[bool] = []
        self.resyncs = 0

    def connected(self, up: bool, source: str = "docker") -> None:
        self.ups.append(up)

    def resync(self, items: Any, source: str = "docker") -> None:
        self.resyncs += 1


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    t.join(5)
    loop.close()


def provider(loop: asyncio.AbstractEventLoop, docker: FakeDocker, sink: Sink,
             idle: float) -> DockerProvider:
    p = DockerProvider(sink, loop, docker, backoff_max=0.5, events_idle=idle)  # type: ignore[arg-type]
    p.start()
    return p


def stop(p: DockerProvider) -> None:
    p.stop()
    threads = [t for t in (p._thread, p._watchdog) if t is not None]
    for t in threads:
        t.join(2)
    assert not any(t.is_alive() for t in threads), "stop() must end both threads"


def test_a_quiet_stream_is_reopened_and_relisted_without_a_disconnection(
        loop: asyncio.AbstractEventLoop) -> None:
    docker, sink = FakeDocker(), Sink()
    p = provider(loop, docker, sink, 0.2)
    try:
        wait_for(lambda: len(docker.streams) >= 3 and sink.resyncs >= 3, 5,
                 what="two refreshes")
        # Each refresh opened the new stream before listing (nothing falls between).
        assert docker.lists <= len(docker.streams)
        assert all(s.closed.is_set() for s in docker.streams[:-1])
        assert p.refreshes >= 2
        assert p.reconnects == 0
        assert False not in sink.ups
        wait_for(lambda: p.status.state == "connected", 2, what="status connected")
    finally:
        stop(p)


def test_events_keep_the_stream(loop: asyncio.AbstractEventLoop) -> None:
    docker, sink = FakeDocker(), Sink()
    p = provider(loop, docker, sink, 0.3)
    try:
        wait_for(lambda: docker.streams, 5, what="a stream")
        stream = docker.streams[0]
        for _ in range(15):  # 0.75s of events 50ms apart: never 0.3s of silence
            stream.items.put({"Type": "container", "Action": "exec_start: sh",
                              "Actor": {"ID": "c1"}})
            threading.Event().wait(0.05)
        assert len(docker.streams) == 1 and not stream.closed.is_set()
        assert p.refreshes == 0
    finally:
        stop(p)


def test_a_failed_reopen_is_a_disconnection(loop: asyncio.AbstractEventLoop) -> None:
    docker, sink = FakeDocker(fail_from=2), Sink()
    p = provider(loop, docker, sink, 0.2)
    try:
        wait_for(lambda: p.status.state == "failing", 5, what="status failing")
        assert p.reconnects >= 1 and p.refreshes == 1
        assert "Connection refused" in (p.status.error or "")
        assert sink.ups[0] is True and sink.ups[-1] is False
    finally:
        stop(p)


def test_zero_means_no_watchdog(loop: asyncio.AbstractEventLoop) -> None:
    docker, sink = FakeDocker(), Sink()
    p = provider(loop, docker, sink, 0.0)
    try:
        wait_for(lambda: docker.streams, 5, what="a stream")
        assert p._watchdog is None
        threading.Event().wait(0.3)
        assert len(docker.streams) == 1 and p.refreshes == 0
    finally:
        stop(p)
