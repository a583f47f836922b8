"""Fixtures for tests against the real Docker Engine: labelled busybox backends."""

from __future__ import annotations

import json
import subprocess
import uuid
from typing import Any

import engine

TEST_LABEL = "edgeproxy-test=1"


def unique(prefix: str = "t") -> str:
    """A short unique name for a path or container."""
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def remove_test_containers() -> None:
    ids = engine.docker("ps", "-aq", "--filter", "label=" + TEST_LABEL).split()
    if ids:
        subprocess.run(["docker", "rm", "-f", *ids], capture_output=True, check=False)


def run_container(
    name: str,
    labels: dict[str, str],
    *args: str,
    command: tuple[str, ...] | None = None,
    init: bool = True,
) -> str:
    """`docker run -d` a busybox httpd backend with labels; returns the container id."""
    argv = ["run", "-d", "--name", name, "--label", TEST_LABEL]
    if init:
        argv.append("--init")
    for k, v in labels.items():
        argv += ["--label", f"{k}={v}"]
    argv += list(args)
    argv.append(engine.BUSYBOX_IMAGE)
    if command:
        argv += list(command)
    return engine.docker(*argv).strip()


def inspect(name: str) -> dict[str, Any]:
    """`docker inspect` one container."""
    doc = json.loads(engine.docker("inspect", name))
    return doc[0]  # type: ignore[no-any-return]
