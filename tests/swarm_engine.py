r"""A second, swarm-mode dockerd for the Swarm tests, beside the main one (tests/engine.py).

Stdlib only, like tests/engine.py::

    python3 tests/swarm_engine.py ensure   # start it if needed, swarm init, load the images
    python3 tests/swarm_engine.py stop     # SIGTERM it (its tasks stop with it)
    python3 tests/swarm_engine.py purge    # stop, then delete its data root and bridges

Why a second daemon: the main dockerd runs with ``--live-restore`` (the tests restart it and
expect containers to survive), and dockerd refuses swarm mode with live-restore.  This one
shares nothing with the main daemon (facts found on this machine's engine, 20.10):

* its own socket (:data:`SOCKET`), data root, exec root and pid file, and an empty
  ``--config-file`` (so /etc/docker/daemon.json, if any, does not leak in);
* ``--iptables=false``: with iptables on, its bridge driver rewrites the shared DOCKER chains
  and breaks the main daemon's published ports.  The cost: no published ports and no routing
  mesh on this daemon; tests reach a task through its ``docker_gwbridge`` address, which the
  host routes to;
* a default bridge of its own (``--bridge`` naming :data:`BRIDGE`, created here; never
  ``--bridge=none``, which makes dockerd delete the host's docker0 and breaks every container
  of the main daemon);
* no ``--default-address-pool`` (nor ``default-address-pools`` in its config): dockerd 20.10
  deletes the host's ``docker0`` at start-up when it has address pools, runs without
  live-restore and finds its previous default "bridge" network in its data root, that is on
  every start but the first (moby daemon/daemon_unix.go, configureNetworking: "Clear stale
  bridge network" -> ``removeDefaultBridgeInterface()``, which names ``docker0`` whatever
  ``--bridge`` says).  That took the main daemon's default bridge away and broke every test of
  the main engine after a Swarm stage.  This daemon's own networks get explicit subnets
  instead (:data:`BRIDGE_CIDR`, :data:`GWBRIDGE_SUBNET`, :data:`OVERLAY_POOL`), and
  :func:`start` checks that ``docker0`` survived;
* its own ``docker_gwbridge`` (:data:`GWBRIDGE`, another subnet), created before
  ``swarm init --advertise-addr 127.0.0.1``.

Images move over with ``docker save | docker load`` (ids are kept).  The daemon logs to
:data:`LOG`.  Everything here is idempotent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine

STATE = Path(os.environ.get("EDGEPROXY_SWARM_STATE", "/var/lib/edgeproxy-swarm"))
"""Data root of the swarm daemon."""

RUN = Path("/run/epsw")
"""Exec root, socket, pid file and config file (short: unix socket paths are limited)."""

SOCKET = RUN / "docker.sock"
HOST = f"unix://{SOCKET}"
"""DOCKER_HOST for the swarm daemon."""

PIDFILE = RUN / "docker.pid"
CONFIG = RUN / "daemon.json"
LOG = Path(os.environ.get("EDGEPROXY_SWARM_DOCKERD_LOG", "/tmp/edgeproxy-swarm-dockerd.log"))

BRIDGE, BRIDGE_CIDR = "epsw0", "10.231.0.1/24"
"""The daemon's default bridge (its docker0), created here."""

GWBRIDGE, GWBRIDGE_SUBNET = "epsw_gwbridge", "10.232.0.0/24"
"""Linux name and subnet of this daemon's docker_gwbridge (the main one never has swarm)."""

OVERLAY_POOL = "10.234.0.0/16"
"""Where swarm overlay networks (ingress included) come from."""

DEADLINE = 60.0


def _env(swarm: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DOCKER_HOST", "DOCKER_CONTEXT")}
    if swarm:
        env["DOCKER_HOST"] = HOST
    return env


def docker(*args: str, stdin: bytes | None = None, timeout: float = 120.0,
           swarm: bool = True) -> str:
    """Run the docker client against the swarm daemon (or the main one); its stdout."""
    env = _env(swarm)
    where = f"DOCKER_HOST={HOST} " if swarm else ""
    proc = subprocess.run([engine.DOCKER, *args], input=stdin, capture_output=True,
                          timeout=timeout, check=False, env=env)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        raise engine.EngineError(f"{where}docker {' '.join(args)}: {err}")
    return proc.stdout.decode()


def answers() -> bool:
    """Tell whether the swarm daemon answers on its socket."""
    try:
        docker("version", "--format", "{{.Server.Version}}", timeout=10)
    except (engine.EngineError, subprocess.TimeoutExpired):
        return False
    return True


def pid() -> int | None:
    """The swarm daemon's pid from its pid file, if it runs."""
    try:
        value = int(PIDFILE.read_text().strip())
    except (OSError, ValueError):
        return None
    return value if engine._alive(value) and engine._comm(value) == "dockerd" else None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _ensure_bridge() -> None:
    if subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True).returncode != 0:
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("addr", "add", BRIDGE_CIDR, "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")


def argv() -> list[str]:
    """The swarm daemon's command line (see the module docstring for each flag)."""
    return [shutil.which("dockerd") or "/usr/sbin/dockerd",
            "--host", HOST, "--data-root", str(STATE), "--exec-root", str(RUN / "exec"),
            "--pidfile", str(PIDFILE), "--config-file", str(CONFIG),
            "--iptables=false", "--ip-masq=false", "--bridge", BRIDGE]


def _has_docker0() -> bool:
    return Path("/sys/class/net/docker0").exists()


def start() -> None:
    """Start the swarm daemon detached and wait until it answers.

    Raises :class:`engine.EngineError` if the host's ``docker0`` (the main daemon's default
    bridge) was there before and is gone once this daemon answers.
    """
    _ensure_bridge()
    for d in (STATE, RUN):
        d.mkdir(parents=True, exist_ok=True)
    CONFIG.write_text("{}\n")
    had_docker0 = _has_docker0()
    command = argv()
    with LOG.open("ab") as log:
        log.write(f"==== {time.strftime('%F %T')} starting: {' '.join(command)}\n".encode())
        log.flush()
        subprocess.run(["setsid", "-f", *command], stdin=subprocess.DEVNULL, stdout=log,
                       stderr=subprocess.STDOUT, check=True)
    deadline = time.monotonic() + DEADLINE
    while not answers():
        if time.monotonic() > deadline:
            tail = "\n".join(LOG.read_text(errors="replace").splitlines()[-20:])
            raise engine.EngineError(f"the swarm dockerd did not answer; {LOG}:\n{tail}")
        time.sleep(0.1)
    if had_docker0 and not _has_docker0():
        raise engine.EngineError(
            "the swarm dockerd deleted the host's docker0 (the main daemon's default bridge) "
            f"while starting: check its flags ({' '.join(command[1:])}) for an address pool, "
            "see tests/swarm_engine.py")


def _running_argv(p: int) -> list[str]:
    try:
        return Path(f"/proc/{p}/cmdline").read_bytes().decode().split("\0")[:-1]
    except OSError:
        return []


def stop() -> None:
    """SIGTERM the swarm daemon and wait until it and its containerd are gone."""
    p = pid()
    if p is None:
        return
    kids = engine._children(p)
    os.kill(p, 15)
    engine._wait_exit([p, *kids], time.monotonic() + DEADLINE)
    PIDFILE.unlink(missing_ok=True)


def swarm_state() -> str:
    """The node's LocalNodeState: inactive, pending, active, error, locked."""
    return docker("info", "--format", "{{.Swarm.LocalNodeState}}").strip()


def ensure_swarm() -> None:
    """docker_gwbridge of our own, then a one-node swarm advertised on 127.0.0.1."""
    if swarm_state() == "active":
        return
    names = docker("network", "ls", "--format", "{{.Name}}").split()
    if "docker_gwbridge" not in names:
        docker("network", "create", "--driver", "bridge", "--subnet", GWBRIDGE_SUBNET,
               "--opt", f"com.docker.network.bridge.name={GWBRIDGE}",
               "--opt", "com.docker.network.bridge.enable_icc=false",
               "--opt", "com.docker.network.bridge.enable_ip_masquerade=false",
               "docker_gwbridge")
    docker("swarm", "init", "--advertise-addr", "127.0.0.1", "--listen-addr", "127.0.0.1:2377",
           "--default-addr-pool", OVERLAY_POOL)


def image_id(tag: str, on_swarm: bool = True) -> str | None:
    """The image's id on the swarm daemon (or the main one), None when it is absent."""
    try:
        return docker("image", "inspect", "--format", "{{.Id}}", tag, swarm=on_swarm).strip()
    except engine.EngineError:
        return None


def copy_image(tag: str) -> None:
    """`docker save | docker load` from the main daemon, unless the same id is there."""
    main_id = image_id(tag, on_swarm=False)
    if main_id is None:
        raise engine.EngineError(f"image {tag} is not on the main daemon to copy")
    if image_id(tag) == main_id:
        return
    save = subprocess.Popen([engine.DOCKER, "save", tag], stdout=subprocess.PIPE, env=_env(False))
    try:
        subprocess.run([engine.DOCKER, "load", "--quiet"], stdin=save.stdout, env=_env(True),
                       check=True, capture_output=True, timeout=300)
    finally:
        assert save.stdout is not None
        save.stdout.close()
        if save.wait(timeout=60) != 0:
            raise engine.EngineError(f"docker save {tag} failed")


def ensure() -> None:
    """The swarm daemon answers, is an active one-node manager and has the busybox image."""
    p = pid()
    if p is not None and _running_argv(p) != argv():
        # Started by an older version of this file (say, with an address pool): start over
        # with today's flags rather than keep a daemon that may break the main one.
        stop()
    if not answers():
        if pid() is not None:
            stop()  # holds the pid file but does not answer: start over
        start()
    ensure_swarm()
    engine.ensure_dockerd()
    engine.ensure_busybox_image()
    copy_image(engine.BUSYBOX_IMAGE)


def purge() -> None:
    """Stop the daemon and delete everything it left: data root, exec root, bridges."""
    stop()
    for d in (STATE, RUN):
        shutil.rmtree(d, ignore_errors=True)
    for link in (BRIDGE, GWBRIDGE):
        subprocess.run(["ip", "link", "del", link], capture_output=True, check=False)


def main(argv: list[str]) -> int:
    """Command line: ensure, stop or purge."""
    commands = {"ensure": ensure, "stop": stop, "purge": purge}
    if len(argv) != 1 or argv[0] not in commands:
        print(f"usage: swarm_engine.py {{{'|'.join(commands)}}}", file=sys.stderr)
        return 2
    try:
        commands[argv[0]]()
    except (engine.EngineError, subprocess.SubprocessError, OSError) as exc:
        print(f"swarm_engine.py {argv[0]}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
