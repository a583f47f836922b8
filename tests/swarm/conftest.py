"""Fixtures for the Swarm stage (see swarm_fixtures.py); run it on its own:
    .venv/bin/python -m pytest -q tests/swarm
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
import swarm_engine
from swarm_fixtures import TEST_LABEL, Proxy, build_proxy_image, cleanup, sw


@pytest.fixture(scope="session")
def swarm() -> Iterator[None]:
    """A one-node swarm on the second daemon, with the busybox and proxy images."""
    if shutil.which("docker") is None or shutil.which("dockerd") is None:
        pytest.fail("the Swarm stage needs docker.io (dockerd and the docker CLI)", pytrace=False)
    started = time.monotonic()
    swarm_engine.ensure()
    build_proxy_image()
    cleanup()
    print(f"swarm stage set-up: {time.monotonic() - started:.1f}s", file=sys.stderr)
    yield
    cleanup()


@pytest.fixture(scope="module")
def network(swarm: None) -> Iterator[str]:
    """An overlay network for the proxy and the services of one test module."""
    name = f"ept-net-{uuid.uuid4().hex[:6]}"
    sw("network", "create", "--driver", "overlay", "--attachable", "--label", TEST_LABEL, name)
    yield name


@pytest.fixture(scope="module")
def proxy(network: str) -> Iterator[Proxy]:
    p = Proxy(network)
    p.deploy()
    yield p
    with_logs = os.environ.get("EDGEPROXY_SWARM_TEST_LOGS")
    if with_logs:
        print(p.logs(), file=sys.stderr)
    sw("service", "rm", p.name)


