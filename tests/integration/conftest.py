"""Fixtures for the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import engine
import pytest
from docker_fixtures import remove_test_containers


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[None]:
    """A running dockerd (live-restore) and the busybox image; test containers cleaned up."""
    engine.ensure_dockerd()
    engine.ensure_busybox_image()
    remove_test_containers()
    yield
    remove_test_containers()
