"""The swarm daemon restarts without touching the main engine (its docker0, its published ports).

Runs first in the stage (file order) on purpose: it restarts the swarm daemon, which is what
used to delete the host's docker0 and break every Docker test of the main suite's next run.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import engine
import requests
import swarm_engine
from helpers import free_port, wait_for


def _published_port_answers() -> None:
    """A busybox on the main daemon with a port published on 127.0.0.1 serves its page."""
    port = free_port()
    name = f"ept-apart-{uuid.uuid4().hex[:6]}"
    engine.docker("run", "-d", "--init", "--rm", "--name", name, "-p", f"127.0.0.1:{port}:80",
                  engine.BUSYBOX_IMAGE)
    try:
        def page() -> str | None:
            try:
                r = requests.get(f"http://127.0.0.1:{port}/", timeout=2)
            except requests.RequestException:
                return None
            return r.text if r.status_code == 200 else None
        body = wait_for(page, timeout=10, what=f"main daemon's {name} on 127.0.0.1:{port}")
        assert body.strip(), f"empty page from {name}"
    finally:
        engine.docker("rm", "-f", name)


def test_restarting_the_swarm_daemon_leaves_the_main_engine_as_it_was(swarm: None) -> None:
    main_pid = engine.dockerd_pid()
    assert main_pid is not None, "the main dockerd is not running"
    assert Path("/sys/class/net/docker0").exists(), "docker0 was already gone before the test"
    # Twice: each start after the first finds its previous default bridge network in the
    # data root, the case in which dockerd 20.10 with an address pool deletes docker0.
    for _ in range(2):
        swarm_engine.stop()
        swarm_engine.start()
        assert Path("/sys/class/net/docker0").exists(), "the swarm dockerd deleted docker0"
    swarm_engine.ensure()
    assert swarm_engine.swarm_state() == "active"
    # Nobody restarted the main daemon to repair its bridge (tests/engine.py would).
    assert engine.dockerd_pid() == main_pid
    _published_port_answers()
