"""edgeproxy.core.settings.load_settings and the command line that reports a bad setting."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edgeproxy.core.settings import (
    OPTIONS,
    Address,
    Settings,
    SettingsError,
    load_settings,
    unknown_settings,
)

# EDGEPROXY_WORKERS defaults to 'auto', one worker per core this process may run on.
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
DEFAULTS = Settings()


def test_defaults() -> None:
    s = load_settings({})
    assert s == DEFAULTS
    assert s.workers == CORES
    # One source of defaults: what the dataclass gives is what an empty environment reads.
    assert Settings() == s and Settings().workers == CORES
    assert (s.hold_period, s.eject_time, s.retries) == (30.0, 5.0, 2)
    assert s.listen == Address("0.0.0.0", 8080)
    assert s.admin_listen == Address("127.0.0.1", 8081)
    assert s.label_prefix == "gateway"
    assert s.network is None
    assert s.exposed_by_default is True
    assert s.docker is True
    assert s.connect_timeout == 5.0
    assert s.read_timeout == 60.0
    assert s.drain_timeout == 8.0
    assert s.debounce == 0.1
    assert s.docker_backoff_max == 30.0
    assert s.docker_events_idle == 60.0
    assert s.routes_file is None
    assert s.routes_file_poll == 1.0
    assert s.max_body_size == 10 * 1024 * 1024
    assert (s.max_response_header_size, s.max_response_headers) == (64 * 1024, 100)
    assert s.trusted_proxies == ()
    assert (s.log_level, s.log_format, s.access_log, s.retry_after) == ("info", "json", True, 5)


def test_every_option_default_parses_to_the_settings_default() -> None:
    # The documented default (shown by --help) and the dataclass default must agree (but for the
    # machine-dependent worker count).
    defaults = DEFAULTS
    for opt in OPTIONS:
        assert opt.parse(opt.default) == getattr(defaults, opt.attr), opt.env


def test_unrelated_environment_is_ignored() -> None:
    assert load_settings({"PATH": "/bin", "LISTEN": "bad", "edgeproxy_listen": "bad"}) == DEFAULTS


def _one(env: str, value: str) -> Any:
    opt = next(o for o in OPTIONS if o.env == env)
    return getattr(load_settings({env: value}), opt.attr)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("250ms", 0.25), ("5s", 5.0), ("2m", 120.0), ("1h", 3600.0), ("10", 10.0), ("1.5s", 1.5),
     (" 3s ", 3.0), ("0.5", 0.5), ("100 ms", 0.1)],
)
def test_durations(value: str, seconds: float) -> None:
    assert _one("EDGEPROXY_CONNECT_TIMEOUT", value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "size"),
    [("512k", 512 * 1024), ("10m", 10 * 1024**2), ("1g", 1024**3), ("1048576", 1048576),
     ("0", 0), ("10M", 10 * 1024**2), ("10mb", 10 * 1024**2), ("512KB", 512 * 1024),
     ("100b", 100)],
)
def test_sizes(value: str, size: int) -> None:
    assert _one("EDGEPROXY_MAX_BODY_SIZE", value) == size


@pytest.mark.parametrize(
    ("value", "address", "text"),
    [
        ("0.0.0.0:8080", Address("0.0.0.0", 8080), "0.0.0.0:8080"),
        ("127.0.0.1:80", Address("127.0.0.1", 80), "127.0.0.1:80"),
        ("localhost:8080", Address("localhost", 8080), "localhost:8080"),
        ("[::]:8080", Address("::", 8080), "[::]:8080"),
        ("[::1]:9000", Address("::1", 9000), "[::1]:9000"),
        (":9000", Address("0.0.0.0", 9000), "0.0.0.0:9000"),
        (" :65535 ", Address("0.0.0.0", 65535), "0.0.0.0:65535"),
    ],
)
def test_addresses(value: str, address: Address, text: str) -> None:
    parsed = _one("EDGEPROXY_LISTEN", value)
    assert parsed == address
    assert str(parsed) == text


@pytest.mark.parametrize(
    ("value", "expected"),
    [(v, True) for v in ("true", "TRUE", "yes", "on", "1", " True ")]
    + [(v, False) for v in ("false", "False", "no", "off", "0")],
)
def test_bools(value: str, expected: bool) -> None:
    assert _one("EDGEPROXY_EXPOSED_BY_DEFAULT", value) is expected
    assert _one("EDGEPROXY_ACCESS_LOG", value) is expected


@pytest.mark.parametrize(
    ("value", "networks"),
    [
        ("", ()),
        ("10.0.0.0/8", ("10.0.0.0/8",)),
        ("10.0.0.0/8,172.16.0.0/12", ("10.0.0.0/8", "172.16.0.0/12")),
        (" 10.0.0.0/8 , 192.168.1.10 ,", ("10.0.0.0/8", "192.168.1.10/32")),
        ("10.1.2.3/8", ("10.0.0.0/8",)),
        ("fd00::/8,::1", ("fd00::/8", "::1/128")),
    ],
)
def test_cidr_lists(value: str, networks: tuple[str, ...]) -> None:
    assert _one("EDGEPROXY_TRUSTED_PROXIES", value) == tuple(ipaddress.ip_network(n) for n in networks)


@pytest.mark.parametrize(
    ("env", "value", "attr", "expected"),
    [
        ("EDGEPROXY_NETWORK", "backend", "network", "backend"),
        ("EDGEPROXY_NETWORK", "  ", "network", None),
        ("EDGEPROXY_ROUTES_FILE", "/etc/edgeproxy/routes.toml", "routes_file",
         Path("/etc/edgeproxy/routes.toml")),
        ("EDGEPROXY_ROUTES_FILE", "", "routes_file", None),
        ("EDGEPROXY_LABEL_PREFIX", "edge", "label_prefix", "edge"),
        ("EDGEPROXY_LABEL_PREFIX", "com.example.gw", "label_prefix", "com.example.gw"),
        ("EDGEPROXY_LOG_LEVEL", "DEBUG", "log_level", "debug"),
        ("EDGEPROXY_LOG_FORMAT", "console", "log_format", "console"),
        ("EDGEPROXY_RETRY_AFTER", "30", "retry_after", 30),
        ("EDGEPROXY_DRAIN_TIMEOUT", "0s", "drain_timeout", 0.0),
        ("EDGEPROXY_DEBOUNCE", "0", "debounce", 0.0),
        ("EDGEPROXY_DOCKER", "false", "docker", False),
        ("EDGEPROXY_DOCKER_EVENTS_IDLE", "2s", "docker_events_idle", 2.0),
        ("EDGEPROXY_DOCKER_EVENTS_IDLE", "5m", "docker_events_idle", 300.0),
        ("EDGEPROXY_DOCKER_EVENTS_IDLE", "0", "docker_events_idle", 0.0),
        ("EDGEPROXY_ADMIN_LISTEN", "[::1]:8081", "admin_listen", Address("::1", 8081)),
        ("EDGEPROXY_ADMIN_HOSTS", "", "admin_hosts", ()),
        ("EDGEPROXY_ADMIN_HOSTS", " Admin.Internal , proxy:8081,[::1]:9000 ", "admin_hosts",
         (("admin.internal", None), ("proxy", 8081), ("::1", 9000))),
        ("EDGEPROXY_WORKERS", "1", "workers", 1),
        ("EDGEPROXY_WORKERS", " 4 ", "workers", 4),
        ("EDGEPROXY_WORKERS", "256", "workers", 256),
        ("EDGEPROXY_WORKERS", "AUTO", "workers", CORES),
        ("EDGEPROXY_HOLD_PERIOD", "0", "hold_period", 0.0),
        ("EDGEPROXY_HOLD_PERIOD", "2m", "hold_period", 120.0),
        ("EDGEPROXY_EJECT_TIME", "250ms", "eject_time", 0.25),
        ("EDGEPROXY_RETRIES", "0", "retries", 0),
        ("EDGEPROXY_RETRIES", "5", "retries", 5),
        ("EDGEPROXY_MAX_RESPONSE_HEADER_SIZE", "32k", "max_response_header_size", 32768),
        ("EDGEPROXY_MAX_RESPONSE_HEADERS", "200", "max_response_headers", 200),
    ],
)
def test_other_options(env: str, value: str, attr: str, expected: object) -> None:
    assert getattr(load_settings({env: value}), attr) == expected


DURATION = "a duration such as 250ms, 5s, 2m, 1h or 30d"
SIZE = "a size such as 1048576, 512k, 10m or 1g"
ADDRESS = "host:port, e.g. 0.0.0.0:8080 or [::]:8080"
CIDRS = "comma-separated CIDRs, e.g. 10.0.0.0/8,172.16.0.0/12"
WORKERS = "auto (one per core) or a whole number from 1 to 256"
ADMIN_HOSTS = ("comma-separated host names or addresses with an optional port, e.g. "
               "admin.internal,proxy:8081")


@pytest.mark.parametrize(
    ("env", "value", "expected"),
    [
        ("EDGEPROXY_CONNECT_TIMEOUT", "5 sec", DURATION),
        ("EDGEPROXY_CONNECT_TIMEOUT", "-1s", DURATION),
        ("EDGEPROXY_CONNECT_TIMEOUT", "1w", DURATION),
        ("EDGEPROXY_CONNECT_TIMEOUT", "", DURATION),
        ("EDGEPROXY_CONNECT_TIMEOUT", "0s", "a duration greater than zero, e.g. 5s"),
        ("EDGEPROXY_READ_TIMEOUT", "0", "a duration greater than zero, e.g. 5s"),
        ("EDGEPROXY_DRAIN_TIMEOUT", "soon", DURATION),
        ("EDGEPROXY_DOCKER_EVENTS_IDLE", "-5s", DURATION),
        ("EDGEPROXY_DOCKER_EVENTS_IDLE", "never", DURATION),
        ("EDGEPROXY_DOCKER_EVENTS_IDLE", "", DURATION),
        ("EDGEPROXY_MAX_BODY_SIZE", "1.5m", SIZE),
        ("EDGEPROXY_MAX_BODY_SIZE", "10t", SIZE),
        ("EDGEPROXY_MAX_BODY_SIZE", "-1", SIZE),
        ("EDGEPROXY_MAX_BODY_SIZE", "lots", SIZE),
        ("EDGEPROXY_LISTEN", "bad", ADDRESS),
        ("EDGEPROXY_LISTEN", "8080", ADDRESS),
        ("EDGEPROXY_LISTEN", "0.0.0.0:", ADDRESS),
        ("EDGEPROXY_LISTEN", "0.0.0.0:http", ADDRESS),
        ("EDGEPROXY_LISTEN", "0.0.0.0:0", ADDRESS + " (port 1-65535)"),
        ("EDGEPROXY_LISTEN", "0.0.0.0:65536", ADDRESS + " (port 1-65535)"),
        ("EDGEPROXY_LISTEN", "my host:80", ADDRESS),
        ("EDGEPROXY_LISTEN", "[::1]", ADDRESS),
        ("EDGEPROXY_LISTEN", "0.0.0.0:\u00b2", ADDRESS),
        ("EDGEPROXY_ADMIN_LISTEN", "localhost", ADDRESS),
        ("EDGEPROXY_ADMIN_HOSTS", "admin.internal,evil/x", ADMIN_HOSTS),
        ("EDGEPROXY_ADMIN_HOSTS", "admin.internal:", ADMIN_HOSTS),
        ("EDGEPROXY_ADMIN_HOSTS", "http://admin.internal", ADMIN_HOSTS),
        ("EDGEPROXY_EXPOSED_BY_DEFAULT", "maybe", "true or false"),
        ("EDGEPROXY_DOCKER", "", "true or false"),
        ("EDGEPROXY_TRUSTED_PROXIES", "10.0.0.0/33", CIDRS),
        ("EDGEPROXY_TRUSTED_PROXIES", "10.0.0.0/8,proxy", CIDRS),
        ("EDGEPROXY_LOG_LEVEL", "verbose", "one of debug, info, warning, error"),
        ("EDGEPROXY_LOG_FORMAT", "xml", "one of json, console"),
        ("EDGEPROXY_LABEL_PREFIX", "Gateway",
         "a label namespace of lowercase letters, digits, '.', '-' or '_', e.g. gateway"),
        ("EDGEPROXY_LABEL_PREFIX", "gateway.",
         "a label namespace of lowercase letters, digits, '.', '-' or '_', e.g. gateway"),
        ("EDGEPROXY_RETRY_AFTER", "0", "a whole number of at least 1"),
        ("EDGEPROXY_RETRY_AFTER", "5s", "a whole number of at least 1"),
        ("EDGEPROXY_RETRY_AFTER", "\u00b2", "a whole number of at least 1"),
        ("EDGEPROXY_WORKERS", "0", WORKERS),
        ("EDGEPROXY_WORKERS", "257", WORKERS),
        ("EDGEPROXY_WORKERS", "many", WORKERS),
        ("EDGEPROXY_WORKERS", "", WORKERS),
        ("EDGEPROXY_HOLD_PERIOD", "forever", DURATION),
        ("EDGEPROXY_EJECT_TIME", "0s", "a duration greater than zero, e.g. 5s"),
        ("EDGEPROXY_RETRIES", "-1", "a whole number of 0 or more"),
        ("EDGEPROXY_RETRIES", "two", "a whole number of 0 or more"),
        ("EDGEPROXY_MAX_RESPONSE_HEADER_SIZE", "0", "a size of at least 1 byte, such as 64k"),
        ("EDGEPROXY_MAX_RESPONSE_HEADER_SIZE", "big", SIZE),
        ("EDGEPROXY_MAX_RESPONSE_HEADERS", "0", "a whole number of at least 1"),
    ],
)
def test_invalid_value(env: str, value: str, expected: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({env: value})
    err = info.value
    assert (err.env, err.value, err.expected) == (env, value, expected)
    assert str(err) == f"{env}={value!r} is invalid: expected {expected}"


def test_invalid_value_message_example() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({"EDGEPROXY_READ_TIMEOUT": "forever"})
    assert str(info.value) == (
        "EDGEPROXY_READ_TIMEOUT='forever' is invalid: expected a duration such as 250ms, 5s, 2m, 1h or 30d"
    )
    assert isinstance(info.value, ValueError)


def test_unknown_settings_lists_typos() -> None:
    env = {
        "EDGEPROXY_LISTEN": ":8080",
        "EDGEPROXY_LISTN": ":8080",
        "EDGEPROXY_TRUSTED_PROXY": "10.0.0.0/8",
        "EDGEPROXY_": "",
        "PATH": "/usr/bin",
        "edgeproxy_listen": "x",
    }
    assert unknown_settings(env) == ["EDGEPROXY_", "EDGEPROXY_LISTN", "EDGEPROXY_TRUSTED_PROXY"]
    assert unknown_settings({opt.env: opt.default for opt in OPTIONS}) == []
    assert unknown_settings({}) == []


# --- command line -----------------------------------------------------------------------------

def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPROXY_")}
    env.update(extra)
    return env


def test_cli_bad_setting_exits_2_with_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "edgeproxy"],
        env=_clean_env(EDGEPROXY_LISTEN="bad", EDGEPROXY_DOCKER="false"),
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("edgeproxy: EDGEPROXY_LISTEN=")
    assert lines[0] == (
        "edgeproxy: EDGEPROXY_LISTEN='bad' is invalid: expected host:port, e.g. 0.0.0.0:8080 or [::]:8080"
    )
    assert proc.stdout == ""


@pytest.mark.parametrize("host", ["tcp://", "unix", "/var/run/docker.sock",
                                  "tcp://proxy:port", "http//x"])
def test_malformed_docker_host_is_a_setting_error(host: str) -> None:
    with pytest.raises(SettingsError) as exc:
        load_settings({"DOCKER_HOST": host})
    assert str(exc.value) == (
        f"DOCKER_HOST={host!r} is invalid: expected unix:///path/to/docker.sock, tcp://HOST:PORT "
        "or ssh://USER@HOST (or EDGEPROXY_DOCKER=false)")
    load_settings({"DOCKER_HOST": host, "EDGEPROXY_DOCKER": "false"})  # not used: not checked


@pytest.mark.parametrize("host", ["", "unix:///run/docker.sock", "tcp://socket-proxy:2375",
                                  "ssh://ops@docker-host"])
def test_usable_docker_host(host: str) -> None:
    assert load_settings({"DOCKER_HOST": host}).docker is True


def test_cli_malformed_docker_host_exits_2_at_start() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "edgeproxy"], env=_clean_env(DOCKER_HOST="tcp://"),
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        "edgeproxy: DOCKER_HOST='tcp://' is invalid: expected unix:///path/to/docker.sock, "
        "tcp://HOST:PORT or ssh://USER@HOST (or EDGEPROXY_DOCKER=false)"]


def _edgeproxy_command() -> list[str]:
    script = Path(sys.executable).parent / "edgeproxy"
    return [str(script)] if script.exists() else [sys.executable, "-m", "edgeproxy"]


def test_cli_help_lists_every_setting() -> None:
    proc = subprocess.run(
        [*_edgeproxy_command(), "--help"],
        env=_clean_env(), capture_output=True, text=True, timeout=30, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    missing = [opt.env for opt in OPTIONS if opt.env not in proc.stdout]
    assert missing == []
    for opt in OPTIONS:
        if opt.default:
            assert f"[default: {opt.default}]" in proc.stdout
