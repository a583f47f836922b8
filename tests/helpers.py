"""Shared test helpers: free ports, polling with a deadline, the proxy and backend processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import requests

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def close_listener(sock: socket.socket, accepting: threading.Thread) -> None:
    """Close a listening socket that `accepting` is blocked in accept() on.

    close() alone leaves that thread blocked on the old socket, and a thread between reading the
    descriptor's number and entering accept() lands on whatever socket the number is given to
    next: a later test's server, whose connections it then steals and answers. shutdown() wakes
    accept() (EINVAL on Linux); the number is released only once the thread has returned."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    accepting.join(5)
    sock.close()


def wait_for(check: Callable[[], T], timeout: float = 10.0, interval: float = 0.05,
             what: str = "condition") -> T:
    """Poll `check` until it returns a truthy value; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
            if last:
                return last
        except Exception as exc:  # the thing polled may not be up yet
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


class ProxyProcess:
    """A running `python -m edgeproxy` with its own ports and log file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        self.log_path = log_path
        full = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPROXY_")}
        full.update({
            "EDGEPROXY_LISTEN": f"127.0.0.1:{self.port}",
            "EDGEPROXY_ADMIN_LISTEN": f"127.0.0.1:{self.admin_port}",
            "EDGEPROXY_DEBOUNCE": "20ms",
            "EDGEPROXY_WORKERS": "1",
            "EDGEPROXY_LOG_LEVEL": "debug",
            "PYTHONUNBUFFERED": "1",
        })
        full.update(env)
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "edgeproxy"], env=full,
                                     stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.base = f"http://127.0.0.1:{self.port}"
        self.admin_base = f"http://127.0.0.1:{self.admin_port}"

    def wait_ready(self, timeout: float = 15.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"proxy exited with {self.proc.returncode}:\n{self.log_text()}")
            # 503: up, but Docker discovery fails (some tests want exactly that)
            return requests.get(self.admin_base + "/healthz", timeout=1).status_code in (200, 503)
        wait_for(ready, timeout, what="proxy /healthz")

    def url(self, path: str) -> str:
        return self.base + path

    def admin(self, path: str, ok: tuple[int, ...] = (200,)) -> Any:
        r = requests.get(self.admin_base + path, timeout=5)
        if r.status_code not in ok:
            r.raise_for_status()
        return r.json()

    def routes(self) -> dict[str, Any]:
        return {r["name"]: r for r in self.admin("/routes")["routes"]}

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict) and (name is None or ev.get("event") == name):
                out.append(ev)
        return out

    def terminate(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@contextmanager
def run_proxy(tmp_path: Path, **env: str) -> Iterator[ProxyProcess]:
    """Start the proxy with EDGEPROXY_* overrides (keyword names without the prefix)."""
    full = {("EDGEPROXY_" + k.upper() if not k.isupper() else k): v for k, v in env.items()}
    p = ProxyProcess(full, tmp_path / f"proxy-{time.monotonic_ns()}.log")
    try:
        p.wait_ready()
        yield p
    finally:
        p.terminate()


@contextmanager
def run_backend(name: str | None = None) -> Iterator[str]:
    """Start tests/backend.py on a free port; yield its base URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "backend.py"), str(port),
                             name or f"backend-{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: requests.get(base + "/ready", timeout=1).ok, 15, what="backend")
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


def write_routes(path: Path, routes: dict[str, dict[str, Any]]) -> Path:
    """Write a routes TOML file from {name: {key: value}} (strings, bools, lists)."""
    lines = []
    for name, table in routes.items():
        lines.append(f"[routes.{name}]")
        for key, value in table.items():
            name = json.dumps(key) if "." in key else key  # "auth.scopes" beside auth = "jwt"
            lines.append(f"{name} = {_toml(value)}")
        lines.append("")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return path


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, int):
        return str(value)
    return json.dumps(value)
