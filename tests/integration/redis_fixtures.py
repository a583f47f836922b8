"""A real redis-server (Debian package) for the tests; never skipped: a missing binary fails."""

from __future__ import annotations

import shutil
import subprocess

import redis
from helpers import free_port, wait_for

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"

class RedisServer:
    """A redis-server subprocess on a fixed free port that tests may stop and start again."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.ping, timeout=10, what=f"redis-server on port {self.port}")

    def ping(self) -> bool:
        with redis.Redis(port=self.port, socket_timeout=0.5) as client:
            return bool(client.ping())

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=1)
