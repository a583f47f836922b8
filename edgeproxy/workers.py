"""Several worker processes on one port (SO_REUSEPORT) and one control plane, supervised by a
small parent.

The control plane (its own process) holds the only Docker connection, the only active health
prober, ACME and the routes-file watcher, and serves the admin listener; it publishes each new
table to the workers over a Unix socket in a private runtime directory. Workers hold the data
plane only. The supervisor restarts any of them that dies; metrics are summed over all processes
through prometheus_client's multiprocess folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from types import FrameType

from edgeproxy.core.logs import get_logger
from edgeproxy.core.settings import Settings

EXIT_LISTEN_FAILED = 3  # a worker could not bind: restarting would not help
CONTROL = -1  # the control plane's index among the supervised children


def run_worker(settings: Settings, index: int, control_path: str | None = None,
               restarted: bool = False) -> int:
    """Run one worker (or, with index CONTROL, the control plane) to completion; its exit code."""
    from edgeproxy.server import ListenError, serve, serve_control

    runner: Callable[..., object]
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        runner = asyncio.run
    else:  # pragma: no cover - optional speed-up (extra "fast")
        runner = uvloop.run
    try:
        if index == CONTROL and control_path is not None:
            runner(serve_control(settings, control_path, restarted=restarted))
        else:
            runner(serve(settings, worker=index, control_path=control_path))
    except ListenError as exc:
        sys.stderr.write(f"edgeproxy: {exc}\n")  # one write: print() makes two, and workers race
        sys.stderr.flush()
        return EXIT_LISTEN_FAILED
    except KeyboardInterrupt:
        return 0
    return 0


def run(settings: Settings) -> int:
    """Run the proxy: in this process for one worker, else as a supervisor of N children."""
    if settings.workers <= 1:
        return run_worker(settings, 0)
    return Supervisor(settings).run()


class Supervisor:
    """Forks the control plane and the workers, forwards SIGTERM/SIGINT, restarts whichever
    crashes."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.children: dict[int, int] = {}  # pid -> worker index
        self.stopping = False
        self.failed_listen = False
        self.log = get_logger("supervisor")
        self.metrics_dir = tempfile.mkdtemp(prefix="edgeproxy-metrics-")
        # mkdtemp makes it 0700: only this user reaches the control socket.
        self.runtime_dir = tempfile.mkdtemp(prefix="edgeproxy-run-")
        self.control_path = os.path.join(self.runtime_dir, "control.sock")
        self.control_starts = 0

    def _spawn(self, index: int) -> None:
        restarted = False
        if index == CONTROL:
            restarted = self.control_starts > 0
            self.control_starts += 1
        pid = os.fork()
        if pid == 0:  # child
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            code = 1
            try:
                code = run_worker(self.settings, index, self.control_path, restarted)
            except BaseException:  # noqa: BLE001 - os._exit below would swallow the traceback
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.children[pid] = index

    def _signal(self, signum: int, _frame: FrameType | None) -> None:
        self.stopping = True
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def run(self) -> int:
        """Start every worker and wait; exit 0 after a clean stop."""
        # prometheus_client reads this when it is first imported: set it before any worker
        # (and before this process) imports the metrics module.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        if self.settings.ratelimit_backend == "memory":
            from edgeproxy.policies import shared

            shared.prepare(self.settings.ratelimit_max_keys * 2)  # half full keeps probes short
        signal.signal(signal.SIGTERM, self._signal)
        signal.signal(signal.SIGINT, self._signal)
        self.log.info("workers_starting", workers=self.settings.workers, pid=os.getpid())
        try:
            self._spawn(CONTROL)
            for i in range(self.settings.workers):
                self._spawn(i)
            restarts: dict[int, float] = {}
            while self.children:
                try:
                    pid, status = os.wait()
                except ChildProcessError:
                    break
                except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                    continue
                index = self.children.pop(pid, None)
                if index is None:
                    continue
                self._mark_dead(pid)
                code = os.waitstatus_to_exitcode(status)
                if code == EXIT_LISTEN_FAILED:
                    self.failed_listen = True
                    self._signal(signal.SIGTERM, None)
                if self.stopping:
                    continue
                # A crash: restart, but not in a tight loop.
                last = restarts.get(index, 0.0)
                delay = 1.0 if time.monotonic() - last < 10 else 0.0
                restarts[index] = time.monotonic()
                self.log.error("control_died" if index == CONTROL else "worker_died",
                               worker="control" if index == CONTROL else index, pid=pid,
                               exit_code=code, restart_in_s=delay)
                time.sleep(delay)
                if not self.stopping:
                    self._spawn(index)
        finally:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
        return 1 if self.failed_listen else 0

    def _mark_dead(self, pid: int) -> None:
        with contextlib.suppress(Exception):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, self.metrics_dir)  # type: ignore[no-untyped-call]
