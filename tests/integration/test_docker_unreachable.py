"""Docker discovery that cannot reach the daemon: /healthz says so (503), the log says what to do.

The proxy runs as a real process against a Unix socket nobody listens on (tests run as root, so
a mode-000 socket would not refuse us); recovery points the same path at the real daemon's
socket, which the proxy only lists and follows (no container is created: no engine lock).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from helpers import run_proxy, wait_for

DOCKER_SOCKET = Path("/var/run/docker.sock")


@pytest.fixture
def refusing_socket(tmp_path: Path) -> Iterator[Path]:
    """A Unix socket file that refuses connections: bound, never listening."""
    path = tmp_path / "docker.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    yield path
    s.close()


def healthz(admin_base: str) -> requests.Response:
    return requests.get(admin_base + "/healthz", timeout=5)


def healthz_until(admin_base: str, status: int, timeout: float) -> requests.Response:
    """Poll /healthz until it answers `status` (a Response is falsy for 4xx/5xx: boxed)."""
    return wait_for(lambda: (r := healthz(admin_base)).status_code == status and [r], timeout,
                    what=f"/healthz to answer {status}")[0]


def test_unreachable_docker_is_unhealthy_explained_and_recovers(refusing_socket: Path,
                                                                tmp_path: Path) -> None:
    with run_proxy(tmp_path, DOCKER_HOST=f"unix://{refusing_socket}",
                   docker_backoff_max="100ms", log_level="info") as p:
        r = healthz_until(p.admin_base, 503, 10)
        body = r.json()
        assert body["status"] == "failing" and body["docker"] == "disconnected", body
        assert body["reason"].startswith("Docker discovery fails: "), body
        assert "Connection refused" in body["reason"], body
        assert body["discovery"]["state"] == "failing"
        assert f"nothing listens on {refusing_socket}" in body["discovery"]["hint"], body
        # Many failed attempts (backoff capped at 100 ms), one warning: rate-limited.
        wait_for(lambda: healthz(p.admin_base).json()["discovery"]["failures"] >= 10, 10,
                 what="ten failed attempts")
        warnings = [e for e in p.events() if e.get("logger") == "docker"
                    and e.get("level") == "warning"]
        assert [e["event"] for e in warnings] == ["docker_disconnected"], warnings
        assert "nothing listens on" in warnings[0]["hint"], warnings
        assert warnings[0]["docker_host"] == f"unix://{refusing_socket}"

        if not DOCKER_SOCKET.is_socket():
            pytest.fail("no Docker daemon at /var/run/docker.sock to recover to", pytrace=False)
        os.unlink(refusing_socket)
        os.symlink(DOCKER_SOCKET, refusing_socket)
        r = healthz_until(p.admin_base, 200, 15)
        assert r.json()["status"] == "ok" and r.json()["docker"] == "connected", r.json()
        assert r.json()["discovery"]["state"] == "connected"
        recovered = wait_for(lambda: p.events("docker_recovered"), 5, what="docker_recovered")
        assert recovered[0]["level"] == "info" and recovered[0]["failures"] >= 10, recovered


def test_missing_socket_hint_names_the_mount_and_a_socket_proxy(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "docker.sock"
    with run_proxy(tmp_path, DOCKER_HOST=f"unix://{missing}", log_level="info") as p:
        r = healthz_until(p.admin_base, 503, 10)
        hint = r.json()["discovery"]["hint"]
        assert hint.startswith(f"no Docker socket at {missing}: mount it"), hint
        assert "DOCKER_HOST" in hint and "socket proxy" in hint, hint


def test_discovery_off_is_healthy_without_docker(tmp_path: Path) -> None:
    with run_proxy(tmp_path, docker="false", DOCKER_HOST="unix:///nowhere/docker.sock") as p:
        r = healthz(p.admin_base)
        assert r.status_code == 200 and r.json()["discovery"] is None, r.text
