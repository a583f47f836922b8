"""Slow bodies behind large heads: what 500 such connections cost edgeproxy's memory.

A benchmark scenario, not a test (issue 15). N connections (default 500) each send one request
head of the largest size the proxy accepts (EDGEPROXY_MAX_HEADER_SIZE, 32 KiB by default: a
request line and about a hundred headers) announcing a body, then send none of it and hold the
connection. Meanwhile a good client asks for a small page every 200 ms. Printed: the proxy's
RSS before, at its peak and after the connections are closed (VmRSS from /proc, sampled every
100 ms), the growth, and how the good client fared (answers and latency). The goal of the issue:
the RSS grows by less than 64 MB and the good client is still answered. It is printed for
reading, never turned into an exit code.

    .venv/bin/python bench/slowheads.py [--connections 500] [--hold 10] [--head-size 32k]

edgeproxy runs pinned to core 0; the backend (bench/sink.py, which waits for each body to end)
and this harness run on core 1. Everything started is stopped at the end, on Ctrl-C and on
errors; the work directory is removed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (  # bench/run.py, beside this script
    LOAD_CORE,
    PROXY_CORE,
    ROOT,
    BenchError,
    Processes,
    RssSampler,
    free_port,
    http_get,
    log,
    routes_toml,
    rss_mb,
    wait_ready,
)

GOAL_MB = 64.0


def parse_size(text: str) -> int:
    """'32k' or bytes -> bytes (the proxy's own units, k and m)."""
    text = text.strip().lower()
    scale = {"k": 1024, "m": 1024 * 1024}.get(text[-1:], 1)
    return int(text.rstrip("km")) * scale


def slow_head(size: int, n: int) -> bytes:
    """A POST head of exactly `size` bytes announcing a 1 MB body, in lines of about 320 bytes
    (so the header count stays within the proxy's default limit of 100)."""
    start = f"POST /api/slow/{n} HTTP/1.1\r\nHost: bench\r\nContent-Length: 1000000\r\n".encode()
    room = size - len(start) - 2
    lines = []
    i = 0
    while room > 0:
        take = min(340, room)
        if 0 < room - take < 20:
            take = room - 20
        name = f"X-Fill-{i:03d}: ".encode()
        lines.append(name + b"f" * (take - len(name) - 2) + b"\r\n")
        room -= take
        i += 1
    head = start + b"".join(lines) + b"\r\n"
    if len(head) != size:
        raise BenchError(f"head of {len(head)} bytes built, {size} wanted")
    return head


async def hold_connections(port: int, count: int, head_size: int, hold: float,
                           opened: list[int]) -> tuple[int, int]:
    """Open `count` connections, send each a whole head and no body, hold them `hold` seconds.
    Returns how many stayed open to the end and how many the proxy answered early."""
    writers: list[asyncio.StreamWriter] = []
    readers: list[asyncio.StreamReader] = []
    for n in range(count):
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as exc:
            log(f"connection {n}: {exc}")
            break
        writer.write(slow_head(head_size, n))
        writers.append(writer)
        readers.append(reader)
        opened[0] = len(writers)
    await asyncio.gather(*(w.drain() for w in writers), return_exceptions=True)
    # Anything the proxy sends (an answer, or EOF) before the hold ends completes a read.
    reads = [asyncio.create_task(r.read(65536)) for r in readers]
    await asyncio.sleep(hold)
    answered = sum(t.done() for t in reads)
    for t in reads:
        t.cancel()
    for w in writers:
        w.close()
    await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)
    return len(writers) - answered, answered


def good_client(port: int, stop: threading.Event, latencies: list[float],
                failures: list[str]) -> None:
    """A well-behaved client: one small GET every 200 ms on a fresh connection."""
    while not stop.is_set():
        started = time.monotonic()
        try:
            status, _ = http_get(port, "/api/hello", timeout=5.0)
        except OSError as exc:
            failures.append(str(exc))
        else:
            if status == 200:
                latencies.append((time.monotonic() - started) * 1000)
            else:
                failures.append(f"status {status}")
        stop.wait(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--hold", type=float, default=10.0, help="seconds the heads are held")
    parser.add_argument("--head-size", default="32k",
                        help="bytes per head; also given to the proxy as EDGEPROXY_MAX_HEADER_SIZE")
    args = parser.parse_args(argv)
    head_size = parse_size(args.head_size)
    if shutil.which("taskset") is None or (os.cpu_count() or 1) < 2:
        print("need taskset and 2 cores: one for the proxy, one for the rest", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {int(LOAD_CORE)})
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    work = Path(tempfile.mkdtemp(prefix="edgeproxy-slowheads-"))
    procs = Processes()
    try:
        sink_port, port, admin = free_port(), free_port(), free_port()
        sink = procs.start("sink", [sys.executable, str(ROOT / "bench" / "sink.py"),
                                    str(sink_port)], core=LOAD_CORE,
                           log_path=work / "sink.out", port=sink_port)
        wait_ready(sink, "/", check=lambda status, body: status == 200)
        routes = work / "routes.toml"
        routes.write_text(routes_toml(sink_port, sink_port))
        env = {"EDGEPROXY_DOCKER": "false", "EDGEPROXY_ROUTES_FILE": str(routes),
               "EDGEPROXY_LISTEN": f"127.0.0.1:{port}",
               "EDGEPROXY_ADMIN_LISTEN": f"127.0.0.1:{admin}", "EDGEPROXY_WORKERS": "1",
               "EDGEPROXY_ACCESS_LOG": "false", "EDGEPROXY_MAX_HEADER_SIZE": str(head_size),
               "PYTHONPATH": str(ROOT)}
        proxy = procs.start("edgeproxy", [sys.executable, "-m", "edgeproxy"], core=PROXY_CORE,
                            log_path=work / "edgeproxy.out", port=port, env=env, cwd=ROOT)
        wait_ready(proxy, "/api/hello", check=lambda status, body: status == 200)
        # Warm up every code path the scenario uses, so 'before' is not the cold start.
        for _ in range(50):
            http_get(port, "/api/hello")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(slow_head(head_size, -1).replace(b"1000000", b"0000002", 1) + b"ok")
            s.recv(65536)
        pids = proxy.pids()
        time.sleep(1.0)
        before = rss_mb(pids)
        log(f"edgeproxy pid {proxy.proc.pid}: RSS {before:.1f} MB; opening {args.connections} "
            f"connections with {head_size}-byte heads, holding them {args.hold:.0f} s")

        stop = threading.Event()
        latencies: list[float] = []
        failures: list[str] = []
        opened = [0]
        client = threading.Thread(target=good_client, args=(port, stop, latencies, failures),
                                  daemon=True)
        with RssSampler(pids) as sampler:
            client.start()
            held, answered = asyncio.run(hold_connections(port, args.connections, head_size,
                                                          args.hold, opened))
            stop.set()
            client.join()
        time.sleep(2.0)
        after = rss_mb(pids)
        if proxy.proc.poll() is not None:
            raise BenchError(f"edgeproxy exited with {proxy.proc.returncode}:\n"
                             f"{proxy.log_tail()}")
    except BenchError as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)

    growth = sampler.max - before
    print(f"slow heads: {opened[0]} connections x {head_size} bytes of head, no body, "
          f"held {args.hold:.0f} s ({held} still open at the end, {answered} answered early)")
    print(f"edgeproxy RSS: before {before:.1f} MB, peak {sampler.max:.1f} MB, "
          f"after {after:.1f} MB; growth {growth:+.1f} MB (goal < {GOAL_MB:.0f} MB: "
          f"{'met' if growth < GOAL_MB else 'missed'})")
    if latencies:
        print(f"good client: {len(latencies)} answered, {len(failures)} failed; latency "
              f"p50 {statistics.median(latencies):.1f} ms, max {max(latencies):.1f} ms")
    else:
        print(f"good client: never answered ({len(failures)} failed: {failures[:1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
