r"""Manage a real Docker Engine (dockerd) and a tiny busybox image for the tests.

Stdlib only, so it runs before the project's virtualenv exists::

    python3 tests/engine.py ensure    # start dockerd if needed, build the image
    python3 tests/engine.py restart   # SIGTERM dockerd, start it again (live-restore)
    python3 tests/engine.py stop      # SIGTERM dockerd and wait until it is gone
    python3 tests/engine.py check     # ensure, then serve and fetch a page for real

dockerd
    Started with ``--live-restore`` and nothing else (:data:`DOCKERD_FLAGS`); on
    this kind of machine the defaults are right: overlay2 on ext4, iptables
    (nf_tables) and the ``docker0`` bridge on 172.17.0.0/16, reachable from the
    host.  It runs detached (``setsid -f``), logs to :data:`DOCKERD_LOG` and
    owns ``/var/run/docker.pid``.  With live-restore, containers keep running
    (and keep serving) while dockerd is down or restarting.

Image :data:`BUSYBOX_IMAGE`
    ``docker import`` of a tarball built here from the host's statically linked
    ``/bin/busybox`` (Debian package ``busybox-static``): every applet is a
    symlink in ``/bin`` (``/sbin``, ``/usr/bin`` and ``/usr/sbin`` point
    there), plus ``/tmp``, ``/etc/passwd`` and an echo CGI.  Its default
    command serves ``/www`` with busybox httpd on port 80::

        /www/index.html      the container's hostname (its short id)
        /www/cgi-bin/echo    the request, as KEY=value lines (text/plain)

    so ``docker run -d --init edgeproxy-test/busybox:latest`` is a ready
    backend.  ``docker run IMAGE sh -c '...'`` works as usual, as does
    ``httpd -f -p 80 -h /www``.  The echo CGI answers, with a Content-Length::

        HOSTNAME=<container hostname>
        REQUEST_METHOD=GET
        REQUEST_URI=/cgi-bin/echo/any/path?a=1   (path and query as received)
        PATH_INFO=/any/path
        QUERY_STRING=a=1
        REMOTE_ADDR=[::ffff:172.17.0.1]           (busybox's format)
        HTTP_HOST=...                             (every request header,
        HTTP_X_FORWARDED_FOR=...                   upper-cased, '-' -> '_',
        ...                                        sorted)
        BODY=<request body>                       (POST with Content-Length only)

    Use :func:`parse_echo` on the body.  More CGI scripts can be added at run
    time (``sh -c 'printf ... > /www/cgi-bin/x; chmod +x ...; exec httpd ...'``);
    a script that starts its output with ``HTTP/1.1 503 Reason\r\n`` sets the
    status, otherwise httpd prepends ``HTTP/1.1 200 OK``.

Busybox httpd quirks worth knowing in tests
    * No keep-alive: every response has (or implies) ``Connection: close``;
      a second, pipelined request on the same connection is ignored.
    * HEAD on a static file sends the body anyway (the echo CGI does not).
    * CGI output is passed through as is: no ``Date``/``Connection`` headers,
      and a CGI without Content-Length is delimited by closing the connection.
    * Only POST bodies (with Content-Length) reach a CGI; PUT bodies and
      chunked request bodies do not, and a PUT's Content-Length shows up as
      ``HTTP_CONTENT_LENGTH``.  Anything but GET/HEAD on a static file is 501.
    * A repeated header keeps only its last value; ``X_A`` and ``X-A`` both
      become ``HTTP_X_A``.
    * As PID 1, sh/httpd ignore SIGTERM: ``docker stop`` takes its full 10 s
      unless the container runs with ``--init`` (tini, present) or is removed
      with ``docker rm -f``.
    * httpd starts listening a few ms after the container starts: poll.

Health checks (``--health-cmd 'wget -q -O /dev/null http://127.0.0.1/'``)
and ``docker events`` (``health_status: healthy`` etc.) work with this image;
every health check also emits exec_create/exec_start/exec_die events.  An
events stream ends (``unexpected EOF``) when dockerd stops and must be
reopened.  Swarm mode refuses to start under ``--live-restore``.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
from hashlib import sha256
from http import HTTPStatus
from pathlib import Path

DOCKER = os.environ.get("EDGEPROXY_TEST_DOCKER_CLI", "docker")
"""The docker client to run (a newer client negotiates the daemon's API)."""

DOCKERD_FLAGS: tuple[str, ...] = ("--live-restore",)
"""Flags for a dockerd started here; live-restore keeps containers up."""

DOCKERD_LOG = Path(os.environ.get("EDGEPROXY_DOCKERD_LOG", "/tmp/edgeproxy-dockerd.log"))
"""File that dockerd's output is appended to."""

DOCKERD_PIDFILE = Path("/var/run/docker.pid")
"""dockerd's default pid file: it exists from start until dockerd has exited."""

DEADLINE = 60.0
"""Seconds to wait for dockerd to answer, or to exit."""

BUSYBOX_IMAGE = "edgeproxy-test/busybox:latest"
"""Tag of the test image built by :func:`ensure_busybox_image`."""

BUSYBOX_BINARY = Path("/bin/busybox")
"""The statically linked busybox from Debian's busybox-static."""

ECHO_CGI = r"""#!/bin/sh
# Echo the request as KEY=value lines; see tests/engine.py.
out=/tmp/echo.$$
{
  echo "HOSTNAME=$(hostname)"
  echo "REQUEST_METHOD=$REQUEST_METHOD"
  echo "REQUEST_URI=$REQUEST_URI"
  echo "PATH_INFO=$PATH_INFO"
  echo "QUERY_STRING=$QUERY_STRING"
  echo "REMOTE_ADDR=$REMOTE_ADDR"
  env | grep '^HTTP_' | sort
  if [ -n "$CONTENT_LENGTH" ]; then printf 'BODY='; head -c "$CONTENT_LENGTH"; echo; fi
} > "$out"
printf 'Content-Type: text/plain\r\nContent-Length: %s\r\n\r\n' "$(wc -c < "$out")"
[ "$REQUEST_METHOD" = HEAD ] || cat "$out"
rm -f "$out"
"""
"""The image's /www/cgi-bin/echo."""

HTTPD_CMD: tuple[str, ...] = (
    "sh",
    "-c",
    "hostname > /www/index.html && exec httpd -f -p 80 -h /www",
)
"""The image's default command: serve /www on port 80 in the foreground."""

_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_HASH_ENV = "EDGEPROXY_TEST_IMAGE"


class EngineError(RuntimeError):
    """dockerd could not be started, stopped or used."""


def docker(*args: str, stdin: bytes | None = None, timeout: float = 60.0) -> str:
    """Run the docker client with ``args`` and return its stdout.

    Raises :class:`EngineError` with docker's stderr when it fails.
    """
    proc = subprocess.run(
        [DOCKER, *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        raise EngineError(f"docker {' '.join(args)}: {err}")
    return proc.stdout.decode()


def docker_answers() -> bool:
    """Tell whether a Docker daemon answers on the default socket."""
    try:
        docker("version", "--format", "{{.Server.Version}}", timeout=10)
    except (EngineError, subprocess.TimeoutExpired, FileNotFoundError):
        return False
    return True


def _alive(pid: int) -> bool:
    """Tell whether ``pid`` runs; a zombie counts as exited.

    PID 1 on this machine reaps orphans only now and then, so an exited,
    detached dockerd can linger as a zombie for seconds.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _comm(pid: int) -> str:
    """Return the command name of ``pid``, or '' if it is gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def dockerd_pid() -> int | None:
    """Return the pid of the running dockerd from its pid file, if any.

    A stale pid file (its process gone or not a dockerd) is removed.
    """
    try:
        pid = int(DOCKERD_PIDFILE.read_text().strip())
    except (OSError, ValueError):
        return None
    if _alive(pid) and _comm(pid) == "dockerd":
        return pid
    DOCKERD_PIDFILE.unlink(missing_ok=True)
    return None


def _children(pid: int) -> list[int]:
    """Return the pids whose parent is ``pid`` (dockerd's containerd)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            kids.append(int(entry.name))
    return kids


def _log_tail(lines: int = 20) -> str:
    """Return the last lines of :data:`DOCKERD_LOG` for error messages."""
    try:
        text = DOCKERD_LOG.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _wait_exit(pids: list[int], deadline: float) -> None:
    """Wait until every pid in ``pids`` has exited, or raise."""
    while any(_alive(p) for p in pids):
        if time.monotonic() > deadline:
            raise EngineError(f"processes {pids} still running after the deadline")
        time.sleep(0.05)


def _wait_answer(deadline: float) -> None:
    """Wait until the daemon answers, or raise with the log's tail."""
    while not docker_answers():
        if time.monotonic() > deadline:
            raise EngineError(f"dockerd did not answer; {DOCKERD_LOG}:\n{_log_tail()}")
        time.sleep(0.1)


def start_dockerd(argv: list[str] | None = None, timeout: float = DEADLINE) -> None:
    """Start dockerd detached and wait until it answers.

    ``argv`` is the full command line (default: ``dockerd`` with
    :data:`DOCKERD_FLAGS`).  Output is appended to :data:`DOCKERD_LOG`.
    """
    deadline = time.monotonic() + timeout
    if argv is None:
        argv = [shutil.which("dockerd") or "/usr/sbin/dockerd", *DOCKERD_FLAGS]
    DOCKERD_LOG.parent.mkdir(parents=True, exist_ok=True)
    with DOCKERD_LOG.open("ab") as log:
        log.write(f"==== {time.strftime('%F %T')} starting: {' '.join(argv)}\n".encode())
        log.flush()
        # setsid -f: dockerd gets its own session and outlives this process
        # (and pytest's process group) without becoming our zombie.
        subprocess.run(
            ["setsid", "-f", *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            check=True,
        )
    _wait_answer(deadline)


def stop_dockerd(timeout: float = DEADLINE) -> list[str] | None:
    """SIGTERM the running dockerd and wait until it and its children exit.

    Returns dockerd's command line, to start it again the same way, or
    ``None`` if no dockerd was running.  With live-restore the containers
    (and their containerd shims) keep running.
    """
    pid = dockerd_pid()
    if pid is None:
        return None
    deadline = time.monotonic() + timeout
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    kids = _children(pid)
    os.kill(pid, signal.SIGTERM)
    _wait_exit([pid, *kids], deadline)
    DOCKERD_PIDFILE.unlink(missing_ok=True)
    return argv


def ensure_dockerd(timeout: float = DEADLINE) -> None:
    """Make sure a Docker daemon answers, starting one if needed.

    A dockerd that holds the pid file but does not answer is either starting
    (wait for it to answer) or shutting down (wait for it to exit, then start
    a new one).  Idempotent.
    """
    deadline = time.monotonic() + timeout
    while not docker_answers():
        pid = dockerd_pid()
        if pid is None:
            start_dockerd(timeout=max(1.0, deadline - time.monotonic()))
            return
        if time.monotonic() > deadline:
            raise EngineError(f"dockerd {pid} neither answers nor exits:\n{_log_tail()}")
        time.sleep(0.1)
    if not Path("/sys/class/net/docker0").exists():
        # The default bridge is gone: a running dockerd does not recreate it, a restarted one
        # does.  A second dockerd started with an address pool and without live-restore deletes
        # it (tests/swarm_engine.py explains and avoids it); say so rather than repair silently.
        print("engine.py: docker0 is gone; restarting dockerd to recreate it", file=sys.stderr)
        restart_dockerd(max(1.0, deadline - time.monotonic()))


def restart_dockerd(timeout: float = DEADLINE) -> None:
    """Stop dockerd with SIGTERM and start it again with the same command line.

    Containers started before keep running thanks to ``--live-restore``.
    Starts dockerd with :data:`DOCKERD_FLAGS` if none was running.
    """
    argv = stop_dockerd(timeout)
    start_dockerd(argv, timeout)


def _is_static_elf(path: Path) -> bool:
    """Tell whether ``path`` is an ELF file without a program interpreter."""
    with path.open("rb") as f:
        data = f.read(64)
        if data[:4] != b"\x7fELF":
            return False
        end = "<" if data[5] == 1 else ">"
        if data[4] == 2:  # ELFCLASS64
            (phoff,) = struct.unpack_from(end + "Q", data, 32)
            phentsize, phnum = struct.unpack_from(end + "HH", data, 54)
        else:
            (phoff,) = struct.unpack_from(end + "I", data, 28)
            phentsize, phnum = struct.unpack_from(end + "HH", data, 42)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    pt_interp = 3
    return all(struct.unpack_from(end + "I", table, i * phentsize)[0] != pt_interp for i in range(phnum))


def busybox_tarball(busybox: Path = BUSYBOX_BINARY) -> bytes:
    """Return the image's root filesystem as a reproducible tar archive."""
    if not _is_static_elf(busybox):
        raise EngineError(f"{busybox} is not a static binary: apt-get install busybox-static")
    applets = subprocess.run(
        [str(busybox), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:

        def add(name: str, kind: bytes, mode: int = 0o755, data: bytes = b"", link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.size, info.linkname = kind, mode, len(data), link
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        for d in (
            "bin",
            "dev",
            "etc",
            "proc",
            "root",
            "sys",
            "usr",
            "var",
            "www",
            "www/cgi-bin",
        ):
            add(d, tarfile.DIRTYPE)
        add("tmp", tarfile.DIRTYPE, 0o1777)
        for name, target in (
            ("sbin", "bin"),
            ("usr/bin", "../bin"),
            ("usr/sbin", "../bin"),
        ):
            add(name, tarfile.SYMTYPE, 0o777, link=target)
        add("bin/busybox", tarfile.REGTYPE, data=busybox.read_bytes())
        for applet in sorted(set(applets) - {"busybox"}):
            add(f"bin/{applet}", tarfile.SYMTYPE, 0o777, link="busybox")
        passwd = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
        add("etc/passwd", tarfile.REGTYPE, 0o644, passwd)
        add("etc/group", tarfile.REGTYPE, 0o644, b"root:x:0:\nnogroup:x:65534:\n")
        add("www/cgi-bin/echo", tarfile.REGTYPE, 0o755, ECHO_CGI.encode())
    return buf.getvalue()


def ensure_busybox_image(tag: str = BUSYBOX_IMAGE) -> str:
    """Build ``tag`` by ``docker import`` unless it exists and is up to date.

    The tarball's sha256 is kept in the image's environment, so a new
    busybox or a change to the image's recipe rebuilds it.  Returns ``tag``.
    """
    tarball = busybox_tarball()
    digest = sha256(tarball + repr(HTTPD_CMD).encode()).hexdigest()[:16]
    try:
        old = docker("image", "inspect", "--format", "{{.Id}} {{json .Config.Env}}", tag)
    except EngineError:
        old = ""
    if f"{_HASH_ENV}={digest}" in old:
        return tag
    changes = [f"ENV PATH={_PATH}", f"ENV {_HASH_ENV}={digest}", "EXPOSE 80"]
    changes.append(f"CMD {json.dumps(list(HTTPD_CMD))}")
    docker("import", *(f"--change={c}" for c in changes), "-", tag, stdin=tarball)
    if old:
        with contextlib.suppress(EngineError):  # still used by a container
            docker("image", "rm", old.split()[0])
    return tag


def container_ip(container: str) -> str:
    """Return the IP address of ``container`` on its (first) network."""
    fmt = "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}"
    return docker("inspect", "--format", fmt, container).split()[0]


def parse_echo(body: str) -> dict[str, str]:
    """Parse the echo CGI's KEY=value lines into a dict."""
    pairs = (line.partition("=") for line in body.splitlines() if "=" in line)
    return {key: value for key, _, value in pairs}


def http_get(host: str, path: str = "/", headers: dict[str, str] | None = None) -> str:
    """GET ``http://host:80/path`` and return the body; raise unless 200."""
    conn = http.client.HTTPConnection(host, 80, timeout=5)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read().decode()
    finally:
        conn.close()
    if resp.status != HTTPStatus.OK:
        raise EngineError(f"GET http://{host}{path}: {resp.status} {body!r}")
    return body


def check() -> None:
    """Run an echo backend, fetch its page and CGI from the host, remove it."""
    cid = docker("run", "-d", "--init", "--rm", BUSYBOX_IMAGE).strip()
    try:
        ip = container_ip(cid)
        deadline = time.monotonic() + 10
        while True:
            try:
                index = http_get(ip).strip()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        echo = parse_echo(http_get(ip, "/cgi-bin/echo/p?q=1", {"X-Test": "yes"}))
        ok = cid.startswith(index) and echo.get("HTTP_X_TEST") == "yes"
        if not ok or echo.get("REQUEST_URI") != "/cgi-bin/echo/p?q=1":
            raise EngineError(f"unexpected answers: {index!r}, {echo}")
        print(f"ok: {ip} served {index!r} and echoed {echo['REQUEST_URI']}")
    finally:
        docker("rm", "-f", cid)


def _warn_without_live_restore() -> None:
    """Warn if the daemon (say, one systemd started) lacks live-restore."""
    if docker("info", "--format", "{{.LiveRestoreEnabled}}").strip() != "true":
        print(
            "engine.py: warning: dockerd runs without --live-restore, so a test"
            " that restarts it loses its containers; fix with: echo"
            """ '{"live-restore": true}' > /etc/docker/daemon.json"""
            " && systemctl reload docker",
            file=sys.stderr,
        )


def main(argv: list[str]) -> int:
    """Command line: ``ensure``, ``restart``, ``stop`` or ``check``."""
    commands = ("ensure", "restart", "stop", "check")
    if len(argv) != 1 or argv[0] not in commands:
        print(f"usage: engine.py {{{'|'.join(commands)}}}", file=sys.stderr)
        return 2
    try:
        if argv[0] == "stop":
            stop_dockerd()
            return 0
        if argv[0] == "restart":
            restart_dockerd()
        else:
            ensure_dockerd()
            _warn_without_live_restore()
        ensure_busybox_image()
        if argv[0] == "check":
            check()
    except (EngineError, subprocess.SubprocessError, OSError) as exc:
        print(f"engine.py {argv[0]}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
