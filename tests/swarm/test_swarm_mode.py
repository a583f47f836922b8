"""EDGEPROXY_SWARM=true where services can't be listed: a clear error at start, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import engine

ROOT = Path(__file__).resolve().parents[2]


def test_swarm_true_on_a_daemon_outside_a_swarm_stops_with_what_to_do() -> None:
    # The main daemon (live-restore) is never in a Swarm: only GET /info is asked of it.
    engine.ensure_dockerd()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGEPROXY_", "DOCKER_"))}
    env.update(EDGEPROXY_SWARM="true", DOCKER_HOST="unix:///var/run/docker.sock")
    proc = subprocess.run([sys.executable, "-m", "edgeproxy"], env=env, capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("edgeproxy: EDGEPROXY_SWARM=true, but the Docker daemon is "
                                  "not in an active Swarm: run the proxy on a manager node")
    assert "socket proxy on a manager" in proc.stderr
