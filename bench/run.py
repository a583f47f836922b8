"""Benchmark edgeproxy against nginx, HAProxy and Caddy on this machine, one run, one table.

Each proxy runs alone, pinned to core 0; the backend (an nginx answering 20 bytes and serving
a large file), the upload sink and the load generators (wrk, curl) share core 1. Every proxy
forwards /api/* to the backend and /sink/* to the sink over keep-alive upstream connections,
sets X-Forwarded-For and writes an access log to a file.

    .venv/bin/python bench/run.py [--duration 10] [--connections 50]
                                  [--only plain,auth,stream,basic,forward,h2,grpc,otel]
                                  [--baseline-src DIR] [--scale] [--out bench/results]

`basic` (basic auth, every request with the same good credentials: edgeproxy's cache and
Caddy's basic_auth with one bcrypt entry) and `forward` (forward auth to the backend nginx's
/auth, which answers 200 with Remote-User, copied to the replica) run edgeproxy and Caddy only.
The h2 and grpc scenarios (HTTP/2 over TLS at the edge, h2c to the replica) run against Caddy and
edgeproxy only; they need h2load (Debian's nghttp2-client), openssl and grpcio, and are skipped
with a note when one is missing. `otel` runs edgeproxy only, with tracing on.

Nothing is installed: missing tools are named with the apt-get line that brings them, exit 2.
Writes OUT/latest.json and, when matplotlib is importable, OUT/latest.png. The goals of the
issue are printed as ratios for reading, never as a pass/fail exit code.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import hmac
import http.client
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PROXY_CORE = "0"
LOAD_CORE = "1"  # backend, upload sink, wrk and curl
BODY = "0123456789abcdefghij"  # the backend's 20-byte answer
TOOLS = ("wrk", "nginx", "haproxy", "caddy", "taskset", "curl")
APT_LINE = "apt-get install -y wrk nginx-light haproxy caddy"
PROXIES = ("direct", "nginx", "haproxy", "caddy", "edgeproxy")
SCENARIOS = ("plain", "auth", "stream", "basic", "forward", "h2", "grpc", "otel")
# basic and forward run edgeproxy and Caddy only: nginx and HAProxy have no forward_auth twin.
POLICY_SCENARIOS = ("basic", "forward")
POLICY_PROXIES = ("caddy", "edgeproxy")
BASIC_USER, BASIC_PASSWORD = "bench", "bench-password"
H2_PROXIES = ("caddy", "edgeproxy")  # the HTTP/2 rows compare these two (the issue's goal)
H2_CONNECTIONS, H2_STREAMS = 10, 10  # h2load -c10 -m10
GRPC_CONCURRENCY = 20
# The policy keys the auth scenario puts on edgeproxy's route (see the issue).
AUTH_KEYS = {"auth": "jwt", "ratelimit": "100000000/s"}
JWT_SECRET = secrets.token_hex(32)  # per run; the token is minted from it
# CPU used by processes this run did not start, above which a row is marked as disturbed.
BUSY_CORES = 0.15
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A step of the benchmark failed; the message says which and why."""

    def summary(self) -> str:
        """One line for the table: the first line, plus the last exception line of a log."""
        lines = str(self).splitlines() or [""]
        raised = [ln.strip() for ln in lines[1:] if re.match(r"\s*[\w.]+(Error|Exception)\b", ln)]
        return (lines[0].rstrip(":") + (f": {raised[-1]}" if raised else ""))[:160]


# --- small helpers --------------------------------------------------------------------------

def log(msg: str) -> None:
    """Progress on stderr, so stdout holds only the table."""
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str, headers: dict[str, str] | None = None,
             timeout: float = 2.0) -> tuple[int, bytes]:
    """One GET to 127.0.0.1:port -> (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def mint_jwt(secret: str, subject: str = "bench", ttl: float = 86400.0) -> str:
    """An HS256 token, minted with the standard library so the harness needs no JWT package."""
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    now = int(time.time())
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    claims = {"sub": subject, "iat": now, "nbf": now - 60, "exp": now + int(ttl),
              "scope": "bench"}
    payload = b64(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = f"{header}.{payload}".encode()
    sig = hmac.new(secret.encode(), signing_input, hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(sig)}"


def first_line(argv: list[str]) -> str:
    """First non-empty output line of a version command (stdout or stderr)."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    for line in (out.stdout + "\n" + out.stderr).splitlines():
        if line.strip():
            return line.strip()
    return "unknown"


# --- process memory and CPU from /proc --------------------------------------------------------

def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses; fields resume after the last ')'.
    return text[text.rfind(")") + 2:].split()


def process_group(pgid: int) -> list[int]:
    """Every live process whose process group is pgid (each server is started as a leader)."""
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and int(fields[2]) == pgid:
                pids.append(int(entry.name))
    return pids


def rss_mb(pids: list[int]) -> float:
    """Summed resident set size of pids, in MB (VmRSS, like `ps`)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    return total / 1e6


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of pids so far."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
    return total / TICKS


def core_busy_seconds() -> dict[str, float]:
    """CPU seconds each core ('0', '1', ...) has spent busy (idle and iowait excluded)."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name != "cpu":
            values = [int(v) for v in fields[:8]]
            out[name[3:]] = (sum(values) - values[3] - values[4]) / TICKS
    return out


def machine_busy_seconds() -> float:
    """CPU seconds all cores together have spent busy."""
    return sum(core_busy_seconds().values())


def own_seconds(servers: list[int]) -> float:
    """CPU seconds of the servers we run, the children we waited for (wrk, curl) and ourselves."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    me = resource.getrusage(resource.RUSAGE_SELF)
    return (cpu_seconds(servers) + children.ru_utime + children.ru_stime + me.ru_utime
            + me.ru_stime)


class CpuWindow:
    """CPU use over one measurement, per core: the proxy's on the proxy core, and what processes
    this run did not start took on each core (other work skews every number, so it is reported
    next to them). Everything we start but the proxy runs on the load core."""

    def __init__(self, procs: Processes, proxy_pids: list[int]) -> None:
        self.procs = procs
        self.proxy_pids = proxy_pids
        self.proxy_cores: float | None = None
        self.other_proxy_core = 0.0  # others' CPU on the proxy's core
        self.other_load_core = 0.0  # others' CPU on the load core
        self.load_core_busy = 0.0  # the load core's total use, 1.0 = saturated

    def _servers(self) -> list[int]:
        return [pid for server in self.procs.running for pid in server.pids()]

    def __enter__(self) -> CpuWindow:
        self._servers0 = self._servers()
        self._t0 = time.monotonic()
        self._busy0 = core_busy_seconds()
        self._own0 = own_seconds(self._servers0)
        self._proxy0 = cpu_seconds(self.proxy_pids)
        return self

    def __exit__(self, *_: object) -> None:
        wall = max(time.monotonic() - self._t0, 1e-3)
        busy1 = core_busy_seconds()
        busy = {core: busy1[core] - self._busy0.get(core, 0.0) for core in busy1}
        proxy = cpu_seconds(self.proxy_pids) - self._proxy0
        own_load = own_seconds(self._servers0) - self._own0 - proxy
        if self.proxy_pids:
            self.proxy_cores = proxy / wall
        self.other_proxy_core = max(0.0, busy.get(PROXY_CORE, 0.0) - proxy) / wall
        self.other_load_core = max(0.0, busy.get(LOAD_CORE, 0.0) - own_load) / wall
        self.load_core_busy = busy.get(LOAD_CORE, 0.0) / wall

    @property
    def disturbed(self) -> bool:
        """Other work took a share of a core we needed: the proxy's, or the load core when that
        was saturated and the proxy was not (then the load core may have been the limit)."""
        if self.proxy_pids and self.other_proxy_core > BUSY_CORES:
            return True
        proxy_saturated = self.proxy_cores is not None and self.proxy_cores >= 0.9
        return (self.load_core_busy > 0.95 and self.other_load_core > BUSY_CORES
                and not proxy_saturated)


class RssSampler:
    """Samples the summed RSS of some processes every 100 ms in a thread; keeps the maximum."""

    def __init__(self, pids: list[int], interval: float = 0.1) -> None:
        self.pids = pids
        self.interval = interval
        self.max = rss_mb(pids)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.max = max(self.max, rss_mb(self.pids))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.max = max(self.max, rss_mb(self.pids))


# --- processes ------------------------------------------------------------------------------

# Niceness for everything started (--nice). Each process is started in a session of its own,
# and with autogroup scheduling a session is its own group: a process's nice value then counts
# only against its own session, so the session's autogroup gets the niceness as well.
_NICE = {"value": 0}


def prioritise(pid: int) -> None:
    """Give a process we started (and its session) the niceness of --nice."""
    nice = _NICE["value"]
    if not nice:
        return
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/autogroup").write_text(str(nice))
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, pid, nice)


def run_tool(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a load generator (wrk, curl) to its end at our priority; kill it if we are stopped."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    prioritise(proc.pid)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@dataclass
class Server:
    """A process we started: its name, Popen, log file, and the port it answers on."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    port: int

    def pids(self) -> list[int]:
        """The process and any workers it forked (same process group)."""
        return process_group(self.proc.pid) or [self.proc.pid]

    def log_tail(self, n: int = 15) -> str:
        """The last lines of its output, to say why it failed."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


class Processes:
    """Starts servers pinned to a core and stops them all, also on Ctrl-C or an error."""

    def __init__(self) -> None:
        self.running: list[Server] = []

    def start(self, name: str, argv: list[str], *, core: str, log_path: Path, port: int,
              env: dict[str, str] | None = None, cwd: Path | None = None) -> Server:
        """Start argv under `taskset -c core` as the leader of a new process group."""
        with log_path.open("ab") as out:
            proc = subprocess.Popen(
                ["taskset", "-c", core, *argv], stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=cwd,
                start_new_session=True)
        prioritise(proc.pid)
        server = Server(name, proc, log_path, port)
        self.running.append(server)
        return server

    def stop(self, server: Server, timeout: float = 10.0) -> None:
        """SIGTERM to its process group, SIGKILL after `timeout`."""
        if server in self.running:
            self.running.remove(server)
        if server.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.proc.pid, signal.SIGTERM)
            try:
                server.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(server.proc.pid, signal.SIGKILL)
                server.proc.wait()
        # Workers left behind by a master that died first.
        for pid in process_group(server.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def stop_all(self) -> None:
        """Stop every server still running, newest first."""
        for server in reversed(list(self.running)):
            self.stop(server)


def wait_ready(server: Server, path: str = "/api/hello", deadline_s: float = 20.0,
               check: Callable[[int, bytes], bool] | None = None) -> None:
    """Poll GET path until check(status, body) holds; raise BenchError with the log if not."""
    check = check or (lambda status, body: status == 200 and body == BODY.encode())
    deadline = time.monotonic() + deadline_s
    last = "no answer"
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise BenchError(f"{server.name} exited with {server.proc.returncode}:\n"
                             f"{server.log_tail()}")
        try:
            status, body = http_get(server.port, path)
        except OSError as exc:
            last = str(exc)
        else:
            if check(status, body):
                return
            last = f"{status} {body[:200]!r}"
        time.sleep(0.05)
    raise BenchError(f"{server.name} not ready on :{server.port}{path} after {deadline_s}s "
                     f"(last: {last}):\n{server.log_tail()}")


# --- configs --------------------------------------------------------------------------------

def _nginx_common(work: Path, name: str) -> str:
    tmp = work / f"{name}-tmp"
    tmp.mkdir(exist_ok=True)
    return f"""
daemon off;
worker_processes 1;
pid {work}/{name}.pid;
error_log {work}/{name}-error.log warn;
events {{ worker_connections 4096; }}
"""


def _nginx_temp_paths(work: Path, name: str) -> str:
    tmp = work / f"{name}-tmp"
    return "\n".join(f"  {kind}_temp_path {tmp}/{kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))


def backend_conf(work: Path, port: int) -> str:
    """The backend: 20 bytes for any path, and /api/files/ served from disk (sendfile)."""
    return _nginx_common(work, "backend") + f"""
http {{
{_nginx_temp_paths(work, "backend")}
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  sendfile on;
  tcp_nopush on;
  default_type text/plain;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location /api/files/ {{ alias {work}/files/; }}
    location = /auth {{ add_header Remote-User bench; return 200 ""; }}
    location / {{ return 200 "{BODY}"; }}
  }}
}}
"""


def h2c_backend_conf(work: Path, port: int) -> str:
    """The backend again, as HTTP/2 with prior knowledge (h2c) for the HTTP/2 rows."""
    return _nginx_common(work, "backend-h2c") + f"""
http {{
{_nginx_temp_paths(work, "backend-h2c")}
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  http2_max_requests 1000000;
  default_type text/plain;
  server {{
    listen 127.0.0.1:{port} http2 backlog=4096;
    location / {{ return 200 "{BODY}"; }}
  }}
}}
"""


def caddy_h2_conf(work: Path, port: int, h2c: int, grpc_port: int, cert: Path,
                  key: Path) -> str:
    """Caddy with a TLS edge (HTTP/2 by ALPN) and h2c replicas, access log to a file."""
    return f"""{{
  admin off
  auto_https off
}}

:{port} {{
  bind 127.0.0.1
  tls {cert} {key}
  log {{
    output file {work}/caddy-h2-access.log {{
      roll_disabled
    }}
  }}
  reverse_proxy /api/* h2c://127.0.0.1:{h2c}
  reverse_proxy /test.Echo/* h2c://127.0.0.1:{grpc_port}
}}
"""


def self_signed(work: Path) -> tuple[Path, Path]:
    """A certificate for bench.test and 127.0.0.1 (openssl), for the TLS edge of the h2 rows."""
    cert, key = work / "edge.crt", work / "edge.key"
    out = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                          "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                          "/CN=bench.test", "-addext",
                          "subjectAltName=DNS:bench.test,IP:127.0.0.1", "-keyout", str(key),
                          "-out", str(cert)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise BenchError(f"openssl could not make a certificate: {out.stderr}")
    return cert, key


def nginx_conf(work: Path, port: int, backend: int, sink: int) -> str:
    """nginx as the proxy: upstream keep-alive pools, XFF, streamed bodies, access log to a file."""
    common = """
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_request_buffering off;
      proxy_max_temp_file_size 0;"""
    return _nginx_common(work, "nginx") + f"""
http {{
{_nginx_temp_paths(work, "nginx")}
  access_log {work}/nginx-access.log combined;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  client_max_body_size 0;
  upstream backend {{ server 127.0.0.1:{backend}; keepalive 64; keepalive_requests 1000000; }}
  upstream sink {{ server 127.0.0.1:{sink}; keepalive 8; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location /api/ {{ proxy_pass http://backend;{common}
    }}
    location /sink/ {{ proxy_pass http://sink;{common}
    }}
  }}
}}
"""


def haproxy_conf(port: int, backend: int, sink: int) -> str:
    """HAProxy: one thread, httplog to stdout (a file), forwardfor, idle connections reused."""
    return f"""
global
  nbthread 1
  maxconn 4096
  log stdout format raw local0 info

defaults
  mode http
  log global
  option httplog
  option forwardfor
  http-reuse always
  timeout connect 5s
  timeout client 60s
  timeout server 60s

frontend fe
  bind 127.0.0.1:{port}
  use_backend sink if {{ path_beg /sink/ }}
  use_backend api if {{ path_beg /api/ }}

backend api
  server b1 127.0.0.1:{backend}

backend sink
  server s1 127.0.0.1:{sink}
"""


def caddy_conf(work: Path, port: int, backend: int, sink: int) -> str:
    """Caddy: plain HTTP, no admin API, JSON access log to a file; reverse_proxy sets XFF."""
    return f"""{{
  admin off
  auto_https off
}}

:{port} {{
  bind 127.0.0.1
  log {{
    output file {work}/caddy-access.log {{
      roll_disabled
    }}
  }}
  reverse_proxy /api/* 127.0.0.1:{backend}
  reverse_proxy /sink/* 127.0.0.1:{sink}
}}
"""


def basic_entry(cost: int = 5) -> str:
    """One bcrypt entry (htpasswd -B's default cost 5) for BASIC_USER, made with the bcrypt
    package (edgeproxy's own dependency), so no htpasswd binary is needed."""
    import bcrypt  # edgeproxy depends on it; imported here so --help works without it

    return bcrypt.hashpw(BASIC_PASSWORD.encode(), bcrypt.gensalt(cost)).decode()


def basic_header() -> dict[str, str]:
    """The Authorization header every basic-auth request carries."""
    token = base64.b64encode(f"{BASIC_USER}:{BASIC_PASSWORD}".encode()).decode()
    return {"Authorization": "Basic " + token}


def caddy_policy_conf(work: Path, port: int, backend: int, scenario: str, hashed: str) -> str:
    """Caddy with basic_auth or forward_auth in front of /api/* (same backend, same access log)."""
    if scenario == "basic":
        policy = f"  basic_auth /api/* {{\n    {BASIC_USER} {hashed}\n  }}\n"
    else:
        policy = (f"  forward_auth /api/* 127.0.0.1:{backend} {{\n    uri /auth\n"
                  f"    copy_headers Remote-User\n  }}\n")
    return f"""{{
  admin off
  auto_https off
}}

:{port} {{
  bind 127.0.0.1
  log {{
    output file {work}/caddy-{scenario}-access.log {{
      roll_disabled
    }}
  }}
{policy}  reverse_proxy /api/* 127.0.0.1:{backend}
}}
"""


def policy_keys(scenario: str, backend: int, hashed: str) -> dict[str, str]:
    """edgeproxy's routes-file keys for the same policy."""
    if scenario == "basic":
        return {"auth": "basic", "auth.users": f"{BASIC_USER}:{hashed}"}
    return {"auth": "forward", "auth.url": f"http://127.0.0.1:{backend}/auth",
            "auth.response_headers": "Remote-User"}


def routes_toml(backend: int, sink: int, extra: dict[str, str] | None = None,
                scale: int = 0) -> str:
    """edgeproxy's routes file: /api and /sink, optional policy keys, optional N more routes."""
    def value(v: str) -> str:
        return json.dumps(v)  # a JSON string is a valid TOML basic string

    api_extra = "".join(f"{json.dumps(k)} = {value(v)}\n" for k, v in (extra or {}).items())
    parts = [
        f'[routes.api]\npath = "/api"\nupstreams = ["http://127.0.0.1:{backend}"]\n{api_extra}',
        f'[routes.sink]\npath = "/sink"\nupstreams = ["http://127.0.0.1:{sink}"]\n',
    ]
    parts += [f'[routes.svc{i:04d}]\npath = "/svc{i:04d}"\n'
              f'upstreams = ["http://127.0.0.1:{backend}"]\n' for i in range(scale)]
    return "\n".join(parts)


# --- load generators ------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise BenchError(f"cannot read wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclass
class WrkResult:
    """What one wrk run reported."""

    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: int


def parse_wrk(out: str) -> WrkResult:
    """wrk --latency output -> WrkResult."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.MULTILINE)
    total = re.search(r"(\d+) requests in", out)
    if not (rps and p50 and p99 and total):
        raise BenchError(f"cannot read wrk output:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return WrkResult(float(rps.group(1)), _ms(p50.group(1)), _ms(p99.group(1)),
                     int(total.group(1)), int(non2xx.group(1)) if non2xx else 0,
                     sum(int(g) for g in errs.groups()) if errs else 0)


def run_wrk(port: int, path: str, seconds: float, connections: int,
            headers: dict[str, str] | None = None) -> WrkResult:
    """wrk on the load core, one thread, keep-alive, latency distribution."""
    argv = ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s",
            "--latency", "--timeout", "5s"]
    for k, v in (headers or {}).items():
        argv += ["-H", f"{k}: {v}"]
    argv.append(f"http://127.0.0.1:{port}{path}")
    out = run_tool(argv, timeout=seconds + 60)
    if out.returncode != 0:
        raise BenchError(f"wrk failed ({out.returncode}): {out.stderr or out.stdout}")
    return parse_wrk(out.stdout)


def curl_transfer(url: str, upload: Path | None, body_to: Path) -> tuple[int, int, float]:
    """One curl download or upload (PUT of a file) -> (status, bytes moved, seconds).

    The response body goes to `body_to` (/dev/null for downloads): through a pipe into this
    process, 100 MB would cost the load core more than the proxy does.
    """
    argv = ["taskset", "-c", LOAD_CORE, "curl", "-sS", "--noproxy", "*", "-o", str(body_to),
            "-w", "%{http_code} %{size_download} %{size_upload} %{time_total}"]
    if upload is not None:
        argv += ["-T", str(upload), "-H", "Expect:"]
    argv.append(url)
    out = run_tool(argv, timeout=300)
    if out.returncode != 0:
        raise BenchError(f"curl {url} failed ({out.returncode}): {out.stderr.strip()}")
    code, down, up, total = out.stdout.split()
    size = int(float(up)) if upload is not None else int(float(down))
    return int(code), size, float(total)


# --- the measurements -----------------------------------------------------------------------

@dataclass
class Row:
    """One line of the result table."""

    proxy: str
    scenario: str
    rate: float | None = None  # req/s, or MB/s for download/upload
    unit: str = "req/s"
    p50_ms: float | None = None
    p99_ms: float | None = None
    rss_mb: float | None = None  # peak during the measurement (scale: after warm-up)
    rss_growth_mb: float | None = None  # streams: peak minus the baseline before them
    cpu_cores: float | None = None  # CPU used by the proxy per second of wall time
    other_cores: str = ""  # CPU used meanwhile by processes this run did not start: core 0/1
    per_cpu_s: float | None = None  # rate per CPU-second of the proxy: robust to other load
    x_caddy: float | None = None
    x_direct: float | None = None
    x_nginx: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    """Everything a measurement needs to know about this run."""

    procs: Processes
    work: Path
    duration: float
    warmup: float
    connections: int
    stream_mb: int
    stream_runs: int
    repeat: int
    backend_port: int
    sink_port: int
    big_file: Path
    edgeproxy_src: Path
    # HTTP/2 rows: the h2c backend (nginx), the gRPC replica and the edge's self-signed pair.
    h2c_port: int = 0
    grpc_port: int = 0
    cert: Path | None = None
    key: Path | None = None
    baseline_src: Path | None = None


def _others(cpu: CpuWindow) -> str:
    return f"{cpu.other_proxy_core:.2f}/{cpu.other_load_core:.2f}"


def measure_wrk(plan: Plan, server: Server | None, port: int, proxy: str, scenario: str,
                path: str = "/api/hello", headers: dict[str, str] | None = None) -> Row:
    """Warm-up run, then the measured run with the proxy's RSS and CPU sampled."""
    log(f"[{proxy}] {scenario}: warm-up {plan.warmup:g}s, then {plan.repeat} x "
        f"{plan.duration:g}s with {plan.connections} connections")
    run_wrk(port, path, plan.warmup, plan.connections, headers)
    pids = server.pids() if server else []
    runs = []
    for _ in range(plan.repeat):
        with CpuWindow(plan.procs, pids) as cpu, RssSampler(pids) as sampler:
            res = run_wrk(port, path, plan.duration, plan.connections, headers)
        runs.append((res, cpu, sampler.max))
    # On a shared machine the fastest run is the least disturbed one.
    res, cpu, peak = max(runs, key=lambda run: run[0].rps)
    row = Row(proxy, scenario, res.rps, "req/s", res.p50_ms, res.p99_ms,
              peak if pids else None, cpu_cores=cpu.proxy_cores, other_cores=_others(cpu),
              extra={"requests": res.requests, "non_2xx": res.non_2xx,
                     "socket_errors": res.socket_errors,
                     "runs": [{"rps": round(r.rps, 1), "p50_ms": r.p50_ms, "p99_ms": r.p99_ms,
                               "other_cores": _others(c)} for r, c, _ in runs]})
    bad = res.non_2xx + res.socket_errors
    if bad:
        row.note = f"{res.non_2xx} non-2xx, {res.socket_errors} socket errors"
        if bad > 0.01 * max(res.requests, 1):
            row.note += " (over 1%: rate not comparable)"
    if cpu.disturbed:
        row.note = (row.note + "; " if row.note else "") + "disturbed by other load"
    log(f"[{proxy}] {scenario}: {res.rps:,.0f} req/s, p50 {res.p50_ms:.2f} ms, "
        f"p99 {res.p99_ms:.2f} ms {row.note}")
    return row


def measure_streams(plan: Plan, server: Server | None, port: int, proxy: str,
                    sink_port: int | None = None) -> list[Row]:
    """A large download and a large upload through the proxy: MB/s (median) and RSS growth."""
    down_url = f"http://127.0.0.1:{port}/api/files/{plan.big_file.name}"
    up_url = f"http://127.0.0.1:{sink_port or port}/sink/upload"
    small = plan.work / "files" / "warm.bin"
    answer = plan.work / "upload-answer.txt"
    null = Path(os.devnull)
    log(f"[{proxy}] stream: warm-up, then {plan.stream_runs} x {plan.stream_mb} MB "
        "down and up")
    # Warm connection pools with small bodies so the baseline is not inflated by a big one.
    curl_transfer(f"http://127.0.0.1:{port}/api/files/{small.name}", None, null)
    curl_transfer(up_url, small, answer)
    pids = server.pids() if server else []
    size = plan.big_file.stat().st_size
    rows = []
    for scenario in ("download", "upload"):
        baseline = rss_mb(pids) if pids else 0.0
        speeds = []
        note = ""
        with CpuWindow(plan.procs, pids) as cpu, RssSampler(pids) as sampler:
            for _ in range(plan.stream_runs):
                if scenario == "download":
                    code, got, secs = curl_transfer(down_url, None, null)
                    ok = code == 200 and got == size
                else:
                    code, got, secs = curl_transfer(up_url, plan.big_file, answer)
                    ok = code == 200 and answer.read_text().strip() == str(size)
                if not ok:
                    note = f"status {code}, {got} of {size} bytes"
                    break
                speeds.append(size / 1e6 / secs)
        row = Row(proxy, scenario, statistics.median(speeds) if speeds else None, "MB/s",
                  rss_mb=sampler.max if pids else None,
                  rss_growth_mb=sampler.max - baseline if pids else None, note=note,
                  cpu_cores=cpu.proxy_cores, other_cores=_others(cpu),
                  extra={"runs_mb_s": [round(s, 1) for s in speeds], "size_bytes": size,
                         "rss_baseline_mb": round(baseline, 1) if pids else None})
        if cpu.disturbed:
            row.note = (row.note + "; " if row.note else "") + "disturbed by other load"
        rows.append(row)
        growth = f", RSS +{row.rss_growth_mb:.1f} MB" if row.rss_growth_mb is not None else ""
        log(f"[{proxy}] {scenario}: {row.rate or 0:,.0f} MB/s{growth} {note}")
    return rows


# --- the proxies under test -----------------------------------------------------------------

def edgeproxy_env(plan: Plan, port: int, admin: int, routes: Path) -> dict[str, str]:
    """Environment for one edgeproxy process serving only the routes file."""
    env = {"EDGEPROXY_DOCKER": "false", "EDGEPROXY_ROUTES_FILE": str(routes),
           "EDGEPROXY_LISTEN": f"127.0.0.1:{port}", "EDGEPROXY_ADMIN_LISTEN": f"127.0.0.1:{admin}",
           "EDGEPROXY_ACCESS_LOG": "true", "EDGEPROXY_LOG_LEVEL": "info",
           "EDGEPROXY_MAX_BODY_SIZE": "0", "PYTHONPATH": str(plan.edgeproxy_src)}
    if edgeproxy_has_setting(plan.edgeproxy_src, "EDGEPROXY_WORKERS"):
        env["EDGEPROXY_WORKERS"] = "1"
    return env


_HELP: dict[Path, str] = {}


def edgeproxy_has_setting(src: Path, name: str) -> bool:
    """Whether `edgeproxy --help` lists a setting (the project grows while this harness exists)."""
    if src not in _HELP:
        out = subprocess.run([sys.executable, "-m", "edgeproxy", "--help"], capture_output=True,
                             text=True, cwd=src, env={**os.environ, "PYTHONPATH": str(src)},
                             timeout=60, check=False)
        _HELP[src] = out.stdout + out.stderr
    return re.search(rf"\b{re.escape(name)}\b", _HELP[src]) is not None


def start_edgeproxy(plan: Plan, name: str, env: dict[str, str], port: int) -> Server:
    """One edgeproxy process on the proxy core, from plan.edgeproxy_src, output to NAME.out."""
    return plan.procs.start(name, [sys.executable, "-m", "edgeproxy"], core=PROXY_CORE,
                            log_path=plan.work / f"{name}.out", port=port, env=env,
                            cwd=plan.edgeproxy_src)


def start_proxy(procs: Processes, plan: Plan, proxy: str) -> Server:
    """Start one proxy on core 0 with its config and wait until /api/hello answers."""
    work, port = plan.work, free_port()
    b, s = plan.backend_port, plan.sink_port
    logf = work / f"{proxy}.out"
    if proxy == "nginx":
        conf = work / "nginx.conf"
        conf.write_text(nginx_conf(work, port, b, s))
        argv = ["nginx", "-p", str(work), "-e", str(work / "nginx-error.log"), "-c", str(conf)]
        server = procs.start(proxy, argv, core=PROXY_CORE, log_path=logf, port=port)
    elif proxy == "haproxy":
        conf = work / "haproxy.cfg"
        conf.write_text(haproxy_conf(port, b, s))
        # -db: foreground; its stdout (the access log, `log stdout`) goes to haproxy.out.
        server = procs.start(proxy, ["haproxy", "-db", "-f", str(conf)], core=PROXY_CORE,
                             log_path=logf, port=port)
    elif proxy == "caddy":
        conf = work / "Caddyfile"
        conf.write_text(caddy_conf(work, port, b, s))
        env = {"XDG_DATA_HOME": str(work / "caddy-data"), "XDG_CONFIG_HOME": str(work / "caddy-cfg"),
               "HOME": str(work), "GOMAXPROCS": "1"}
        server = procs.start(proxy, ["caddy", "run", "--config", str(conf), "--adapter",
                                     "caddyfile"], core=PROXY_CORE, log_path=logf, port=port,
                             env=env)
    elif proxy == "edgeproxy":
        routes = work / "routes.toml"
        routes.write_text(routes_toml(b, s))
        env = edgeproxy_env(plan, port, free_port(), routes)
        server = start_edgeproxy(plan, proxy, env, port)
    else:
        raise BenchError(f"unknown proxy {proxy!r}")
    wait_ready(server)
    return server


def run_proxy(procs: Processes, plan: Plan, proxy: str, scenarios: list[str]) -> list[Row]:
    """All scenarios against one proxy (or the backend directly); the proxy runs alone."""
    server: Server | None = None
    if proxy == "direct":
        port = plan.backend_port
        sink_port: int | None = plan.sink_port
    else:
        log(f"[{proxy}] starting on core {PROXY_CORE}")
        server = start_proxy(procs, plan, proxy)
        port = server.port
        sink_port = None
    rows: list[Row] = []
    try:
        if "plain" in scenarios:
            rows.append(measure_wrk(plan, server, port, proxy, "plain"))
        if "stream" in scenarios:
            rows += measure_streams(plan, server, port, proxy, sink_port)
    finally:
        if server is not None:
            procs.stop(server)
    return rows


def h2_missing() -> list[str]:
    """What the HTTP/2 rows need and this machine lacks."""
    missing = [t for t in ("h2load", "openssl") if shutil.which(t) is None]
    try:
        import grpc  # noqa: F401 - only the grpc row needs it
    except ImportError:
        missing.append("grpcio (pip)")
    return missing


def wait_h2_ready(server: Server, plan: Plan, deadline_s: float = 20.0) -> None:
    """Poll https://bench.test:port/api/hello over HTTP/2 (curl) until it answers BODY."""
    deadline = time.monotonic() + deadline_s
    last = "no answer"
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise BenchError(f"{server.name} exited with {server.proc.returncode}:\n"
                             f"{server.log_tail()}")
        out = subprocess.run(["curl", "-sS", "--http2", "--max-time", "2", "--cacert",
                              str(plan.cert), "--resolve", f"bench.test:{server.port}:127.0.0.1",
                              "-w", "\n%{http_version}",
                              f"https://bench.test:{server.port}/api/hello"],
                             capture_output=True, text=True, check=False)
        if out.returncode == 0 and out.stdout == f"{BODY}\n2":
            return
        last = (out.stdout + out.stderr).strip()[-200:]
        time.sleep(0.1)
    raise BenchError(f"{server.name} not ready over HTTP/2 on :{server.port} after "
                     f"{deadline_s}s (last: {last}):\n{server.log_tail()}")


def start_h2_proxy(plan: Plan, proxy: str) -> Server:
    """Caddy or edgeproxy with a TLS edge on core 0 and h2c replicas."""
    work, port = plan.work, free_port()
    assert plan.cert is not None and plan.key is not None  # noqa: S101 - set by main
    if proxy == "caddy":
        conf = work / "Caddyfile-h2"
        conf.write_text(caddy_h2_conf(work, port, plan.h2c_port, plan.grpc_port, plan.cert,
                                      plan.key))
        env = {"XDG_DATA_HOME": str(work / "caddy-data"),
               "XDG_CONFIG_HOME": str(work / "caddy-cfg"), "HOME": str(work), "GOMAXPROCS": "1"}
        server = plan.procs.start("caddy-h2", ["caddy", "run", "--config", str(conf),
                                               "--adapter", "caddyfile"], core=PROXY_CORE,
                                  log_path=work / "caddy-h2.out", port=port, env=env)
    else:
        routes = work / "routes-h2.toml"
        routes.write_text(f'[routes.api]\npath = "/api"\nupstreams = '
                          f'["h2c://127.0.0.1:{plan.h2c_port}"]\n\n'
                          f'[routes.grpc]\npath = "/test.Echo"\nupstreams = '
                          f'["h2c://127.0.0.1:{plan.grpc_port}"]\n')
        env = edgeproxy_env(plan, free_port(), free_port(), routes)
        env.update({"EDGEPROXY_TLS_LISTEN": f"127.0.0.1:{port}",
                    "EDGEPROXY_TLS_CERT": str(plan.cert), "EDGEPROXY_TLS_KEY": str(plan.key)})
        server = start_edgeproxy(plan, "edgeproxy-h2", env, port)
    wait_h2_ready(server, plan)
    return server


def parse_h2load(out: str) -> tuple[float, int, int, float | None]:
    """h2load output -> (req/s, requests done, failed or non-2xx, mean ms per request)."""
    rate = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out)
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, "
                     r"(\d+) failed, (\d+) errored", out)
    codes = re.search(r"status codes: (\d+) 2xx", out)
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", out)
    if not rate or not done or not codes:
        raise BenchError(f"cannot read h2load output:\n{out}")
    bad = int(done.group(3)) + int(done.group(1)) - int(codes.group(1))
    mean_ms = None
    if mean:
        with contextlib.suppress(BenchError):
            mean_ms = _ms(mean.group(1))
    return float(rate.group(1)), int(done.group(1)), bad, mean_ms


def measure_h2load(plan: Plan, server: Server, proxy: str) -> Row:
    """h2load -c10 -m10 over TLS (ALPN h2) on the load core: req/s and the proxy's CPU."""
    url = f"https://127.0.0.1:{server.port}/api/hello"
    argv = ["taskset", "-c", LOAD_CORE, "h2load", f"-c{H2_CONNECTIONS}", f"-m{H2_STREAMS}",
            "-t1", "--warm-up-time", f"{plan.warmup:g}", "-D", f"{plan.duration:g}", url]
    log(f"[{proxy}] h2: h2load -c{H2_CONNECTIONS} -m{H2_STREAMS} for {plan.duration:g}s")
    pids = server.pids()
    with CpuWindow(plan.procs, pids) as cpu, RssSampler(pids) as sampler:
        out = run_tool(argv, plan.warmup + plan.duration + 30)
    if out.returncode != 0:
        raise BenchError(f"h2load failed ({out.returncode}): {out.stderr or out.stdout}")
    rate, done, bad, mean_ms = parse_h2load(out.stdout)
    row = Row(proxy, "h2", rate, "req/s", rss_mb=sampler.max, cpu_cores=cpu.proxy_cores,
              other_cores=_others(cpu), extra={"requests": done, "bad": bad,
                                               "mean_ms": mean_ms})
    if bad:
        row.note = f"{bad} failed or non-2xx"
    if cpu.disturbed:
        row.note = (row.note + "; " if row.note else "") + "disturbed by other load"
    log(f"[{proxy}] h2: {rate:,.0f} req/s {row.note}")
    return row


def measure_grpc(plan: Plan, server: Server, proxy: str) -> Row:
    """Unary gRPC calls (grpcio, asyncio) over the TLS edge to the h2c gRPC replica."""
    log(f"[{proxy}] grpc: {GRPC_CONCURRENCY} calls in flight for {plan.duration:g}s")
    argv = ["taskset", "-c", LOAD_CORE, sys.executable, str(ROOT / "bench" / "grpc_load.py"),
            f"127.0.0.1:{server.port}", str(plan.cert), "bench.test"]
    run_tool([*argv, f"{plan.warmup:g}", str(GRPC_CONCURRENCY)], plan.warmup + 30)
    pids = server.pids()
    with CpuWindow(plan.procs, pids) as cpu, RssSampler(pids) as sampler:
        out = run_tool([*argv, f"{plan.duration:g}", str(GRPC_CONCURRENCY)],
                       plan.duration + 30)
    if out.returncode != 0:
        raise BenchError(f"grpc_load failed ({out.returncode}): {out.stderr or out.stdout}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    row = Row(proxy, "grpc", res["rate"], "calls/s", res["p50_ms"], res["p99_ms"],
              sampler.max, cpu_cores=cpu.proxy_cores, other_cores=_others(cpu),
              extra={"calls": res["calls"], "failed": res["failed"]})
    if res["failed"]:
        row.note = f"{res['failed']} failed calls"
    if cpu.disturbed:
        row.note = (row.note + "; " if row.note else "") + "disturbed by other load"
    log(f"[{proxy}] grpc: {res['rate']:,.0f} calls/s {row.note}")
    return row


def run_h2(procs: Processes, plan: Plan, proxy: str, scenarios: list[str]) -> list[Row]:
    """The HTTP/2 rows against one proxy, which runs alone."""
    log(f"[{proxy}] starting with a TLS edge (h2) on core {PROXY_CORE}")
    server = start_h2_proxy(plan, proxy)
    rows: list[Row] = []
    try:
        if "h2" in scenarios:
            rows.append(measure_h2load(plan, server, proxy))
        if "grpc" in scenarios:
            rows.append(measure_grpc(plan, server, proxy))
    finally:
        procs.stop(server)
    return rows


def run_auth(procs: Processes, plan: Plan) -> Row:
    """edgeproxy with a JWT-protected, rate-limited /api route and a valid token on every request.

    If this edgeproxy does not know the keys yet (the routes file is refused, so nothing is
    routed) or does not enforce them, the row is n/a with the reason.
    """
    work, port, admin = plan.work, free_port(), free_port()
    routes = work / "routes-auth.toml"
    routes.write_text(routes_toml(plan.backend_port, plan.sink_port, AUTH_KEYS))
    env = edgeproxy_env(plan, port, admin, routes)
    env["EDGEPROXY_JWT_SECRET"] = JWT_SECRET
    token = mint_jwt(JWT_SECRET)
    log(f"[edgeproxy] auth: starting with {', '.join(f'{k}={v!r}' for k, v in AUTH_KEYS.items())}")
    server = start_edgeproxy(plan, "edgeproxy-auth", env, port)
    try:
        try:
            wait_ready(server, check=lambda status, _: status in (200, 401, 403, 404),
                       deadline_s=20)
            with_token = http_get(port, "/api/hello", {"Authorization": f"Bearer {token}"})
            without = http_get(port, "/api/hello")
        except BenchError as exc:
            return Row("edgeproxy", "auth", note=f"n/a: did not start: {exc.summary()}")
        if with_token[0] != 200 or without[0] not in (401, 403):
            reason = _auth_unsupported_reason(server, with_token, without)
            log(f"[edgeproxy] auth: n/a: {reason}")
            return Row("edgeproxy", "auth", note=f"n/a: {reason}")
        return measure_wrk(plan, server, port, "edgeproxy", "auth",
                           headers={"Authorization": f"Bearer {token}"})
    finally:
        procs.stop(server)


# OpenTelemetry at 100 %: every request makes a server and a client span, exported to a
# dummy collector on the load core (so its CPU is not the proxy's).
OTEL_ENV = {"OTEL_TRACES_SAMPLER": "always_on", "OTEL_SERVICE_NAME": "edgeproxy-bench"}


def run_otel(procs: Processes, plan: Plan) -> list[Row]:
    """edgeproxy's plain route with tracing on (100 % sampling, a dummy collector), and with
    --baseline-src, the plain route of that other edgeproxy (e.g. main, tracing off) in the
    same run: the A/B for "tracing off costs nothing"."""
    rows = []
    if plan.baseline_src is not None:
        base = replace(plan, edgeproxy_src=plan.baseline_src)
        routes = plan.work / "routes-base.toml"
        routes.write_text(routes_toml(plan.backend_port, plan.sink_port))
        port = free_port()
        log(f"[edgeproxy-base] plain: {plan.baseline_src}")
        server = start_edgeproxy(base, "edgeproxy-base", edgeproxy_env(base, port, free_port(),
                                                                       routes), port)
        try:
            wait_ready(server)
            rows.append(measure_wrk(plan, server, port, "edgeproxy-base", "plain"))
        finally:
            procs.stop(server)
    collector_port = free_port()
    collector = procs.start("collector", [sys.executable, str(ROOT / "bench" / "collector.py"),
                                          str(collector_port)], core=LOAD_CORE,
                            log_path=plan.work / "collector.out", port=collector_port)
    port, admin = free_port(), free_port()
    routes = plan.work / "routes-otel.toml"
    routes.write_text(routes_toml(plan.backend_port, plan.sink_port))
    env = edgeproxy_env(plan, port, admin, routes)
    env.update(OTEL_ENV, OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{collector_port}")
    log("[edgeproxy] otel: tracing on, 100 % sampled, to a dummy collector")
    server = start_edgeproxy(plan, "edgeproxy-otel", env, port)
    try:
        wait_ready(collector, "/", check=lambda status, _: status == 200)
        wait_ready(server)
        row = measure_wrk(plan, server, port, "edgeproxy", "otel")
        time.sleep(0.5)  # one more export interval's worth of spans
        stats = json.loads(http_get(collector_port, "/")[1])
        metrics = http_get(admin, "/metrics")[1].decode()
        dropped = sum(float(v) for v in re.findall(
            r"^edgeproxy_trace_spans_dropped_total\{[^}]*\} (\S+)$", metrics, re.M))
        row.extra.update(collector_exports=stats["exports"], collector_bytes=stats["bytes"],
                         spans_dropped=dropped)
        if not stats["exports"]:
            row.note = (row.note + "; " if row.note else "") + "no span reached the collector"
        elif dropped:
            row.note = (row.note + "; " if row.note else "") + f"{dropped:.0f} spans dropped"
        rows.append(row)
    except BenchError as exc:
        rows.append(Row("edgeproxy", "otel", note=f"failed: {exc.summary()}"))
    finally:
        procs.stop(server)
        procs.stop(collector)
    return rows


def _auth_unsupported_reason(server: Server, with_token: tuple[int, bytes],
                             without: tuple[int, bytes]) -> str:
    text = server.log_path.read_text(errors="replace")
    if "routes_file_invalid" in text:
        unknown = sorted(set(re.findall(r"(routes\.api\.[\w.]+)='[^']*': unknown key", text)))
        return "routes file refused" + (f": unknown key {', '.join(unknown)}" if unknown else "")
    if with_token[0] != 200:
        return f"a valid token got {with_token[0]}"
    return f"a request without a token got {without[0]} (auth not enforced)"


def run_policy(procs: Processes, plan: Plan, proxy: str, scenario: str) -> Row:
    """basic or forward auth in front of /api on edgeproxy or Caddy; every request passes (a
    refusal would measure the error path, so the row is n/a when a probe is not let through)."""
    work, port = plan.work, free_port()
    hashed = basic_entry()
    headers = basic_header() if scenario == "basic" else None
    name = f"{proxy}-{scenario}"
    log(f"[{proxy}] {scenario}: starting")
    if proxy == "caddy":
        conf = work / f"Caddyfile-{scenario}"
        conf.write_text(caddy_policy_conf(work, port, plan.backend_port, scenario, hashed))
        env = {"XDG_DATA_HOME": str(work / "caddy-data"), "XDG_CONFIG_HOME": str(work / "caddy-cfg"),
               "HOME": str(work), "GOMAXPROCS": "1"}
        server = procs.start(name, ["caddy", "run", "--config", str(conf), "--adapter",
                                    "caddyfile"], core=PROXY_CORE,
                             log_path=work / f"{name}.out", port=port, env=env)
    else:
        routes = work / f"routes-{scenario}.toml"
        routes.write_text(routes_toml(plan.backend_port, plan.sink_port,
                                      policy_keys(scenario, plan.backend_port, hashed)))
        server = start_edgeproxy(plan, name, edgeproxy_env(plan, port, free_port(), routes), port)
    try:
        try:
            wait_ready(server, check=lambda status, _: status in (200, 401, 404), deadline_s=20)
            passed = http_get(port, "/api/hello", headers)
            refused = http_get(port, "/api/hello") if scenario == "basic" else (401, b"")
        except BenchError as exc:
            return Row(proxy, scenario, note=f"n/a: did not start: {exc.summary()}")
        if passed != (200, BODY.encode()) or refused[0] != 401:
            reason = (f"a good request got {passed[0]}" if passed[0] != 200 else
                      f"a request without credentials got {refused[0]} (auth not enforced)")
            if proxy == "edgeproxy":
                reason = _auth_unsupported_reason(server, passed, refused)
            log(f"[{proxy}] {scenario}: n/a: {reason}")
            return Row(proxy, scenario, note=f"n/a: {reason}")
        return measure_wrk(plan, server, port, proxy, scenario, headers=headers)
    finally:
        procs.stop(server)


def run_scale(procs: Processes, plan: Plan, n_routes: int) -> list[Row]:
    """RSS of one edgeproxy with n routes (and with none) after warm-up, and time to be ready."""
    rows = []
    for n in (0, n_routes):
        port, admin = free_port(), free_port()
        routes = plan.work / f"routes-{n}.toml"
        routes.write_text(routes_toml(plan.backend_port, plan.sink_port, scale=n))
        env = edgeproxy_env(plan, port, admin, routes)
        name = f"edgeproxy-{n}-routes"
        log(f"[edgeproxy] scale: {n + 2} routes")
        t0 = time.monotonic()
        server = start_edgeproxy(plan, name, env, port)
        try:
            ready = _wait_routes(server, admin, n + 2, t0)
            probe = f"/svc{n - 1:04d}/hello" if n else "/api/hello"
            wait_ready(server, probe)
            run_wrk(port, probe, plan.warmup, plan.connections)
            for i in range(0, n, max(1, n // 20)):  # touch routes across the table
                http_get(port, f"/svc{i:04d}/x")
            time.sleep(0.5)
            rss = rss_mb(server.pids())
        finally:
            procs.stop(server)
        rows.append(Row("edgeproxy", f"scale-{n}", rss_mb=rss, unit="",
                        extra={"routes": n + 2, "ready_s": round(ready, 3)},
                        note=f"{n + 2} routes; ready in {ready:.2f}s"))
        log(f"[edgeproxy] scale: {n + 2} routes: RSS {rss:.1f} MB, ready in {ready:.2f}s")
    return rows


def _wait_routes(server: Server, admin: int, want: int, t0: float) -> float:
    deadline = t0 + 60
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise BenchError(f"{server.name} exited:\n{server.log_tail()}")
        with contextlib.suppress(OSError, ValueError):
            status, body = http_get(admin, "/healthz")
            if status == 200 and json.loads(body).get("routes", 0) >= want:
                return time.monotonic() - t0
        time.sleep(0.02)
    raise BenchError(f"{server.name} did not list {want} routes within 60s:\n{server.log_tail()}")


# --- report ---------------------------------------------------------------------------------

def add_ratios(rows: list[Row]) -> None:
    """Rate per proxy CPU-second; x Caddy, x direct and x nginx on the same scenario (auth:
    against plain)."""
    def rate(proxy: str, scenario: str) -> float | None:
        for r in rows:
            if r.proxy == proxy and r.scenario == scenario and r.rate and not r.note.endswith(
                    "not comparable)"):
                return r.rate
        return None

    for r in rows:
        if not r.rate:
            continue
        if r.cpu_cores:
            r.per_cpu_s = r.rate / r.cpu_cores
        base = "plain" if r.scenario == "auth" else r.scenario
        for attr, other in (("x_caddy", "caddy"), ("x_direct", "direct"), ("x_nginx", "nginx")):
            ref = rate(other, base)
            if ref:
                setattr(r, attr, r.rate / ref)


def goals(rows: list[Row]) -> list[dict[str, Any]]:
    """The issue's targets as ratios measured in this run (for reading, not a gate)."""
    def find(proxy: str, scenario: str) -> Row | None:
        return next((r for r in rows if r.proxy == proxy and r.scenario == scenario), None)

    out: list[dict[str, Any]] = []

    def goal(name: str, value: float | None, op: str, target: float,
             *used: Row | None) -> None:
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        out.append({"goal": name, "value": None if value is None else round(value, 3),
                    "target": f"{op} {target:g}", "met": met,
                    "disturbed": any(r is not None and "disturbed" in r.note for r in used)})

    edge, caddy = find("edgeproxy", "plain"), find("caddy", "plain")
    goal("plain req/s x Caddy", edge.x_caddy if edge else None, ">=", 1.0, edge, caddy)
    goal("plain req per CPU-second x Caddy's", _per_cpu_ratio(edge, caddy), ">=", 1.0, edge,
         caddy)
    p99 = (edge.p99_ms / caddy.p99_ms if edge and caddy and edge.p99_ms and caddy.p99_ms
           else None)
    goal("plain p99 x Caddy", p99, "<=", 1.5, edge, caddy)
    otel, base = find("edgeproxy", "otel"), find("edgeproxy-base", "plain")
    goal("otel 100 % sampled req/s x plain", otel.rate / edge.rate
         if otel and edge and otel.rate and edge.rate else None, ">=", 0.6, otel, edge)
    goal("plain req/s x --baseline-src plain", edge.rate / base.rate
         if base and edge and base.rate and edge.rate else None, ">=", 0.95, edge, base)
    auth = find("edgeproxy", "auth")
    goal("auth+ratelimit req/s x Caddy plain", auth.x_caddy if auth else None, ">=", 0.8, auth,
         caddy)
    goal("auth req per CPU-second x Caddy plain's", _per_cpu_ratio(auth, caddy), ">=", 0.8,
         auth, caddy)
    for sc, target, label in (("basic", 0.9, "basic auth (cached) req/s x Caddy basic_auth"),
                              ("forward", 1.0, "forward auth req/s x Caddy forward_auth")):
        r, ref = find("edgeproxy", sc), find("caddy", sc)
        goal(label, r.x_caddy if r else None, ">=", target, r, ref)
    for sc in ("download", "upload"):
        r, ref = find("edgeproxy", sc), find("nginx", sc)
        goal(f"{sc} MB/s x nginx", r.x_nginx if r else None, ">=", 0.5, r, ref)
        goal(f"{sc} RSS growth MB", r.rss_growth_mb if r else None, "<=", 20)
    for sc in ("h2", "grpc"):  # HTTP/2 over TLS, h2c replica: >= 0.7x Caddy per core
        r, ref = find("edgeproxy", sc), find("caddy", sc)
        goal(f"{sc} req/s x Caddy", r.x_caddy if r else None, ">=", 0.7, r, ref)
        goal(f"{sc} req per CPU-second x Caddy's", _per_cpu_ratio(r, ref), ">=", 0.7, r, ref)
    big = next((r for r in rows if r.proxy == "edgeproxy" and r.scenario.startswith("scale-")
                and r.scenario != "scale-0"), None)
    goal(f"RSS MB with {big.extra['routes'] if big else 1000} routes", big.rss_mb if big else None,
         "<=", 100)
    return out


def _per_cpu_ratio(row: Row | None, ref: Row | None) -> float | None:
    if row is None or ref is None or not row.per_cpu_s or not ref.per_cpu_s:
        return None
    return row.per_cpu_s / ref.per_cpu_s


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# (heading, how a row shows in it, left-aligned)
COLUMNS: tuple[tuple[str, Callable[[Row], str], bool], ...] = (
    ("proxy", lambda r: r.proxy, True),
    ("scenario", lambda r: r.scenario, True),
    ("rate", lambda r: _fmt(r.rate, ",.0f"), False),
    ("unit", lambda r: r.unit, True),
    ("p50 ms", lambda r: _fmt(r.p50_ms, ".2f"), False),
    ("p99 ms", lambda r: _fmt(r.p99_ms, ".2f"), False),
    ("RSS MB", lambda r: _fmt(r.rss_mb, ".1f"), False),
    ("RSS +MB", lambda r: _fmt(r.rss_growth_mb, ".1f"), False),
    ("proxy CPU", lambda r: _fmt(r.cpu_cores, ".2f"), False),
    (f"other CPU c{PROXY_CORE}/c{LOAD_CORE}", lambda r: r.other_cores or "-", False),
    ("per CPU-s", lambda r: _fmt(r.per_cpu_s, ",.0f"), False),
    ("x Caddy", lambda r: _fmt(r.x_caddy, ".2f"), False),
    ("x direct", lambda r: _fmt(r.x_direct, ".2f"), False),
    ("x nginx", lambda r: _fmt(r.x_nginx, ".2f"), False),
    ("note", lambda r: r.note, True),
)


def table(rows: list[Row]) -> str:
    """The result table as a Markdown table (also pasted into bench/README.md)."""
    cells = [[name for name, _, _ in COLUMNS]] + [[show(r) for _, show, _ in COLUMNS]
                                                  for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lefts = [left for _, _, left in COLUMNS]
    text = []
    for n, line in enumerate(cells):
        text.append("| " + " | ".join(c.ljust(w) if left else c.rjust(w)
                                      for c, w, left in zip(line, widths, lefts, strict=True))
                    + " |")
        if n == 0:
            text.append("|" + "|".join("-" * (w + 2) if left else "-" * (w + 1) + ":"
                                       for w, left in zip(widths, lefts, strict=True)) + "|")
    return "\n".join(text)


def machine_info(edgeproxy_src: Path) -> dict[str, Any]:
    """Cores, CPU model, kernel and the versions of everything measured."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    src = str(edgeproxy_src.resolve())
    git = first_line(["git", "-C", src, "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", src, "status", "--porcelain", "edgeproxy"],
                           capture_output=True, text=True, check=False).stdout.strip()
    info: dict[str, Any] = {
        "cores": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
        "memory_gb": round(os.sysconf("SC_PHYS_PAGES") * PAGE / 2**30, 1),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "python": platform.python_version(),
        "python_executable": os.path.realpath(sys.executable),
        "nginx": first_line(["nginx", "-v"]), "haproxy": first_line(["haproxy", "-v"]),
        "caddy": first_line(["caddy", "version"]), "wrk": first_line(["wrk", "-v"]),
        "curl": first_line(["curl", "--version"]),
        "edgeproxy_src": src,
        "edgeproxy_commit": git + (" + uncommitted changes in edgeproxy/" if dirty else ""),
        "edgeproxy": subprocess.run(
            [sys.executable, "-c", "import edgeproxy; print(edgeproxy.__version__)"],
            capture_output=True, text=True, cwd=src, env={**os.environ, "PYTHONPATH": src},
            check=False).stdout.strip() or "unknown",
    }
    for mod in ("aiohttp", "uvloop"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = "not installed"
    return info


def chart(rows: list[Row], path: Path, subtitle: str = "") -> str:
    """Bars per proxy: req/s (plain, auth), req per proxy CPU-second, MB/s (download, upload).
    Returns what was written, or why the chart was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return (f"chart skipped: matplotlib is not installed in {sys.executable}; "
                f"`{sys.executable} -m pip install matplotlib` enables {path.name}")
    panels: list[tuple[str, tuple[str, ...], Callable[[Row], float | None]]] = [
        ("requests/s (20-byte response, keep-alive)", ("plain", "auth"), lambda r: r.rate),
        ("requests per proxy CPU-second", ("plain", "auth"), lambda r: r.per_cpu_s),
        ("MB/s (large body)", ("download", "upload"), lambda r: r.rate),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 5))
    for ax, (title, scenarios, value) in zip(axes, panels, strict=True):
        proxies = [p for p in PROXIES
                   if any(r.proxy == p and r.scenario in scenarios and value(r) for r in rows)]
        width = 0.8 / len(scenarios)
        for k, sc in enumerate(scenarios):
            vals = [next((value(r) or 0.0 for r in rows if r.proxy == p and r.scenario == sc),
                         0.0) for p in proxies]
            xs = [i + (k - (len(scenarios) - 1) / 2) * width for i in range(len(proxies))]
            bars = ax.bar(xs, vals, width, label=sc)
            ax.bar_label(bars, labels=[f"{v:,.0f}" if v else "" for v in vals], fontsize=7)
        ax.set_xticks(range(len(proxies)), proxies)
        ax.set_title(title)
        ax.legend()
    fig.suptitle("edgeproxy bench: each proxy alone on core 0; backend, sink and load generator "
                 "on core 1" + (f"\n{subtitle}" if subtitle else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"chart: {path}"


# --- main -----------------------------------------------------------------------------------

def check_tools() -> list[str]:
    """Names of the required tools not on PATH."""
    return [t for t in TOOLS if shutil.which(t) is None]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk measurement")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of wrk warm-up before each")
    p.add_argument("--connections", type=int, default=50, help="wrk keep-alive connections")
    p.add_argument("--repeat", type=int, default=1,
                   help="wrk measurements per row; the fastest counts (for a shared machine)")
    p.add_argument("--only", default=",".join(SCENARIOS),
                   help="comma-separated scenarios: plain, auth, stream, basic, forward, h2, "
                        "grpc, otel (default: all; basic, forward, h2 and grpc run Caddy and "
                        "edgeproxy only, otel edgeproxy only)")
    p.add_argument("--proxies", default=",".join(PROXIES),
                   help="comma-separated: direct, nginx, haproxy, caddy, edgeproxy (default: all)")
    p.add_argument("--nice", type=int, default=0,
                   help="niceness for this run and everything it starts (negative needs root): "
                        "on a shared machine, -10 keeps other work from skewing the numbers")
    p.add_argument("--scale", action="store_true",
                   help="also measure edgeproxy's RSS and start-up time with --scale-routes routes")
    p.add_argument("--scale-routes", type=int, default=1000, help="routes for --scale")
    p.add_argument("--stream-mb", type=int, default=100, help="size of the streamed bodies")
    p.add_argument("--stream-runs", type=int, default=3, help="transfers per direction (median)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results",
                   help="where latest.json and latest.png go (default: bench/results)")
    p.add_argument("--edgeproxy-src", type=Path, default=ROOT,
                   help="directory holding the edgeproxy package to run (default: this checkout;"
                        " e.g. a `git worktree` of a commit while the working tree is mid-edit)")
    p.add_argument("--baseline-src", type=Path, default=None,
                   help="with the otel scenario: also measure the plain route of the edgeproxy "
                        "in this directory (e.g. an export of main) in the same run")
    p.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    args.proxies = [s.strip() for s in args.proxies.split(",") if s.strip()]
    for name, got, allowed in (("--only", args.only, SCENARIOS), ("--proxies", args.proxies, PROXIES)):
        bad = [x for x in got if x not in allowed]
        if bad:
            p.error(f"{name}: unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
    return args


def make_files(work: Path, stream_mb: int) -> Path:
    """The large body (random 1 MB block repeated, so no proxy can compress it) and a warm one."""
    files = work / "files"
    files.mkdir()
    block = os.urandom(1 << 20)
    big = files / "big.bin"
    with big.open("wb") as f:
        for _ in range(stream_mb):
            f.write(block)
    (files / "warm.bin").write_bytes(block[:65536])
    return big


def _interrupt(signum: int, _frame: object) -> None:
    # SIGTERM takes the same path as Ctrl-C: the finally block stops every server.
    raise KeyboardInterrupt(signum)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 2 when a tool is missing, 1 on a failure, else 0."""
    args = parse_args(argv)
    missing = check_tools()
    if missing:
        print(f"missing: {', '.join(missing)}. This script installs nothing; as root run:\n"
              f"  {APT_LINE}" + (" curl" if "curl" in missing else ""), file=sys.stderr)
        return 2
    if (os.cpu_count() or 1) < 2:
        print("need 2 cores: one for the proxy, one for the backend and load generator",
              file=sys.stderr)
        return 2
    # The harness itself (RSS sampling, curl, wrk parsing) stays off the proxy's core.
    os.sched_setaffinity(0, {int(LOAD_CORE)})
    if args.nice:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # the RSS sampler thread too
        except PermissionError:
            print(f"--nice {args.nice}: a negative niceness needs root", file=sys.stderr)
            return 2
        _NICE["value"] = args.nice
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in background

    work = Path(tempfile.mkdtemp(prefix="edgeproxy-bench-"))
    work.chmod(0o755)  # nginx workers run as nobody and read the files from here
    procs = Processes()
    rows: list[Row] = []
    started = time.time()
    try:
        info = machine_info(args.edgeproxy_src)
        busy0, t0 = machine_busy_seconds(), time.monotonic()
        time.sleep(1.0)
        info["busy_cores_before"] = round((machine_busy_seconds() - busy0)
                                          / (time.monotonic() - t0), 2)
        log(f"work dir {work}; {info['cpu']}, {info['cores']} cores, "
            f"{info['busy_cores_before']} cores busy before the run")
        if info["busy_cores_before"] > BUSY_CORES:
            log("warning: the machine is busy with other work; numbers will be low and noisy")
        plan = Plan(procs=procs, work=work, duration=args.duration, warmup=args.warmup,
                    connections=args.connections, stream_mb=args.stream_mb,
                    stream_runs=args.stream_runs, repeat=args.repeat, backend_port=free_port(),
                    sink_port=free_port(), big_file=make_files(work, args.stream_mb),
                    edgeproxy_src=args.edgeproxy_src, baseline_src=args.baseline_src)
        (work / "backend.conf").write_text(backend_conf(work, plan.backend_port))
        backend = procs.start("backend", ["nginx", "-p", str(work), "-e",
                                          str(work / "backend-error.log"), "-c",
                                          str(work / "backend.conf")],
                              core=LOAD_CORE, log_path=work / "backend.out",
                              port=plan.backend_port)
        sink = procs.start("sink", [sys.executable, str(ROOT / "bench" / "sink.py"),
                                    str(plan.sink_port)], core=LOAD_CORE,
                           log_path=work / "sink.out", port=plan.sink_port)
        wait_ready(backend)
        wait_ready(sink, "/", check=lambda status, body: status == 200)
        h2_rows = [s for s in args.only if s in ("h2", "grpc")]
        missing_h2 = h2_missing() if h2_rows else []
        if h2_rows and not missing_h2:
            plan.cert, plan.key = self_signed(work)
            plan.h2c_port, plan.grpc_port = free_port(), free_port()
            (work / "backend-h2c.conf").write_text(h2c_backend_conf(work, plan.h2c_port))
            procs.start("backend-h2c", ["nginx", "-p", str(work), "-e",
                                        str(work / "backend-h2c-error.log"), "-c",
                                        str(work / "backend-h2c.conf")],
                        core=LOAD_CORE, log_path=work / "backend-h2c.out", port=plan.h2c_port)
            procs.start("grpc-echo", [sys.executable, str(ROOT / "bench" / "grpc_echo.py"),
                                      str(plan.grpc_port)], core=LOAD_CORE,
                        log_path=work / "grpc-echo.out", port=plan.grpc_port)
        elif h2_rows:
            log(f"h2/grpc rows skipped: missing {', '.join(missing_h2)} "
                "(apt-get install -y nghttp2-client openssl; pip install grpcio)")
            rows += [Row(p, s, note=f"skipped: missing {', '.join(missing_h2)}")
                     for p in H2_PROXIES for s in h2_rows]
            h2_rows = []
        per_proxy = [s for s in args.only if s in ("plain", "stream")]
        for proxy in args.proxies:
            if per_proxy:
                try:
                    rows += run_proxy(procs, plan, proxy, per_proxy)
                except BenchError as exc:
                    log(f"[{proxy}] failed: {exc}")
                    rows.append(Row(proxy, "plain", note=f"failed: {exc.summary()}"))
            if proxy == "edgeproxy" and "auth" in args.only:
                rows.append(run_auth(procs, plan))
            for scenario in POLICY_SCENARIOS:
                if scenario in args.only and proxy in POLICY_PROXIES:
                    try:
                        rows.append(run_policy(procs, plan, proxy, scenario))
                    except BenchError as exc:
                        log(f"[{proxy}] {scenario} failed: {exc}")
                        rows.append(Row(proxy, scenario, note=f"failed: {exc.summary()}"))
            if proxy in H2_PROXIES and h2_rows:
                try:
                    rows += run_h2(procs, plan, proxy, h2_rows)
                except BenchError as exc:
                    log(f"[{proxy}] h2 failed: {exc}")
                    rows.append(Row(proxy, h2_rows[0], note=f"failed: {exc.summary()}"))
            if proxy == "edgeproxy" and "otel" in args.only:
                rows += run_otel(procs, plan)
        if args.scale:
            try:
                rows += run_scale(procs, plan, args.scale_routes)
            except BenchError as exc:
                log(f"[edgeproxy] scale failed: {exc}")
                rows.append(Row("edgeproxy", f"scale-{args.scale_routes}",
                                note=f"failed: {exc.summary()}"))
    except KeyboardInterrupt:
        log("interrupted; stopping everything started")
        return 130
    except BenchError as exc:  # the backend or the sink did not come up
        log(f"failed: {exc}")
        return 1
    finally:
        procs.stop_all()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    add_ratios(rows)
    goal_list = goals(rows)
    report = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "machine": info,
        "settings": {"duration_s": args.duration, "warmup_s": args.warmup,
                     "connections": args.connections, "stream_mb": args.stream_mb,
                     "stream_runs": args.stream_runs, "repeat": args.repeat, "nice": args.nice,
                     "proxy_core": PROXY_CORE,
                     "load_core": LOAD_CORE, "auth_keys": AUTH_KEYS,
                     "edgeproxy_workers_setting": edgeproxy_has_setting(args.edgeproxy_src,
                                                                        "EDGEPROXY_WORKERS")
                     if "edgeproxy" in args.proxies else None},
        "rows": [asdict(r) for r in rows],
        "goals": goal_list,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    print(table(rows))
    print()
    for g in goal_list:
        verdict = {True: "met", False: "not met", None: "n/a"}[g["met"]]
        if g["disturbed"] and g["met"] is not None:
            verdict += " (a row it uses was disturbed by other load: unreliable)"
        print(f"goal  {g['goal']:<38} {g['value'] if g['value'] is not None else '-':>8}  "
              f"(target {g['target']}): {verdict}")
    print()
    print(f"json: {args.out / 'latest.json'}")
    print(chart(rows, args.out / "latest.png",
                f"{info['cpu']}, {info['cores']} cores, {report['started']}, "
                f"{info['busy_cores_before']} cores busy with other work before the run"
                + (f", run at nice {args.nice}" if args.nice else "")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
