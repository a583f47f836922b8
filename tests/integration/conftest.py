"""Fixtures for the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import engine
import pytest
from docker_fixtures import remove_test_containers
from redis_fixtures import RedisServer


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[None]:
    """A running dockerd (live-restore) and the busybox image; test containers cleaned up."""
    engine.ensure_dockerd()
    engine.ensure_busybox_image()
    remove_test_containers()
    yield
    remove_test_containers()


@pytest.fixture(scope="session")
def redis_process() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_server(redis_process: RedisServer) -> RedisServer:
    """The shared server, running (a previous test may have killed it)."""
    if not redis_process.running:
        redis_process.start()
    return redis_process
