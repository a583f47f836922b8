"""Several workers, one stdout pipe (as under docker logs): every line arrives whole.

Three workers log access lines under load into one pipe, some longer than PIPE_BUF (a long
URL); the test reads the pipe slowly, so that it fills and the kernel would split any write
larger than PIPE_BUF. Every line must parse as JSON; start-up events come once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from helpers import ROOT, free_port, run_backend, wait_for, write_routes

from edgeproxy.core.logs import MAX_LINE, fit_line


def test_lines_from_three_workers_never_run_together(tmp_path: Path) -> None:
    with run_backend("b") as backend:
        routes = write_routes(tmp_path / "routes.toml",
                              {"r": {"path": "/r", "upstreams": [backend]}})
        port, admin = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPROXY_")}
        env.update(EDGEPROXY_LISTEN=f"127.0.0.1:{port}", EDGEPROXY_ADMIN_LISTEN=f"127.0.0.1:{admin}",
                   EDGEPROXY_WORKERS="3", EDGEPROXY_DOCKER="false", EDGEPROXY_LOG_FORMAT="json",
                   EDGEPROXY_LOG_LEVEL="debug", EDGEPROXY_ROUTES_FILE=str(routes),
                   EDGEPROXY_NOT_A_SETTING="1", PYTHONUNBUFFERED="1")
        proc = subprocess.Popen([sys.executable, "-m", "edgeproxy"], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        assert proc.stdout is not None
        chunks: list[bytes] = []

        def drain() -> None:
            assert proc.stdout is not None
            while data := proc.stdout.read1(512):  # type: ignore[attr-defined]
                chunks.append(data)
                time.sleep(0.0005)  # a slow reader: the pipe fills, writers block

        reader = threading.Thread(target=drain)
        reader.start()
        try:
            wait_for(lambda: requests.get(f"http://127.0.0.1:{admin}/healthz", timeout=1).ok, 15,
                     what="proxy")
            long_path = "/r/" + "x" * 5000  # an access line longer than PIPE_BUF

            def hit(i: int) -> int:
                path = long_path if i % 10 == 0 else f"/r/{i}"
                return requests.get(f"http://127.0.0.1:{port}{path}",
                                    headers={"Connection": "close"}, timeout=10).status_code

            with ThreadPoolExecutor(12) as pool:
                codes = list(pool.map(hit, range(1500)))
            assert set(codes) == {200}, set(codes)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                # A worker that ignores SIGTERM must fail this test, not hang the whole run:
                # the reader waits for every process holding the pipe.
                os.killpg(proc.pid, signal.SIGKILL)
                raise
            finally:
                reader.join(30)
    lines = b"".join(chunks).split(b"\n")
    assert lines[-1] == b""
    events = []
    for n, line in enumerate(lines[:-1]):
        assert len(line) <= MAX_LINE, (n, len(line))
        try:
            events.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"line {n} is not one JSON object: {line[:300]!r}") from None
    access = [e for e in events if e["event"] == "access"]
    assert len(access) == 1500
    assert {e["worker"] for e in access} == {0, 1, 2}
    cut = [e for e in access if e.get("truncated")]
    assert len(cut) == 150 and all("...[cut " in e["path"] for e in cut), cut[:1]
    shown = [e["event"] for e in events if e["level"] != "debug"]  # other workers: debug only
    for once in ("listening", "setting_unknown", "routes_file_loaded"):
        assert shown.count(once) == 1, (once, [e for e in events if e["event"] == once])


def test_fit_line_cuts_the_longest_field_and_keeps_json() -> None:
    event = {"event": "access", "level": "info", "path": "/" + "p" * 9000, "ua": "u" * 3000,
             "status": 200}
    line = fit_line(event, lambda e: json.dumps(e))
    assert len(line) <= MAX_LINE
    parsed = json.loads(line)
    assert parsed["truncated"] is True and parsed["status"] == 200
    assert parsed["path"].startswith("/ppp") and "...[cut " in parsed["path"]
    short = {"event": "x", "level": "info", "n": 1}
    assert fit_line(short, lambda e: json.dumps(e)) == json.dumps(short).encode()
