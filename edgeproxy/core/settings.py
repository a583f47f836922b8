"""EDGEPROXY_* environment variables -> one frozen, typed Settings, validated once at start."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class SettingsError(ValueError):
    """An EDGEPROXY_* variable holds a value we cannot use."""

    def __init__(self, env: str, value: str, expected: str) -> None:
        super().__init__(f"{env}={value!r} is invalid: expected {expected}")
        self.env = env
        self.value = value
        self.expected = expected


@dataclass(frozen=True, slots=True)
class Address:
    """A host and port to listen on."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


# --- value parsers: each raises ValueError with what was expected -------------------------

_DIGITS = re.compile(r"[0-9]{1,9}")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]?)b?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_duration(text: str) -> float:
    """'250ms', '5s', '2m', '1h' or bare seconds -> seconds."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError("a duration such as 250ms, 5s, 2m, 1h or 30d")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_size(text: str) -> int:
    """'512k', '10m', '1g' or bare bytes -> bytes."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError("a size such as 1048576, 512k, 10m or 1g")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


def parse_address(text: str) -> Address:
    """'host:port', '[v6]:port' or ':port' -> Address."""
    expected = "host:port, e.g. 0.0.0.0:8080 or [::]:8080"
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not _DIGITS.fullmatch(port_text):
        raise ValueError(expected)
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(expected + " (port 1-65535)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    host = host or "0.0.0.0"
    if not re.fullmatch(r"[A-Za-z0-9.:_-]+", host):
        raise ValueError(expected)
    return Address(host, port)


def parse_bool(text: str) -> bool:
    """true/false, yes/no, on/off, 1/0 -> bool."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("true or false")


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    """Comma-separated CIDRs or addresses -> networks."""
    nets: list[IPNetwork] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            nets.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError("comma-separated CIDRs, e.g. 10.0.0.0/8,172.16.0.0/12") from None
    return tuple(nets)


def _choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in options:
            raise ValueError("one of " + ", ".join(options))
        return value

    return parse


def _label_prefix(text: str) -> str:
    value = text.strip()
    if not re.fullmatch(r"[a-z0-9]+(?:[._-][a-z0-9]+)*", value):
        raise ValueError("a label namespace of lowercase letters, digits, '.', '-' or '_', e.g. gateway")
    return value


def _optional_str(text: str) -> str | None:
    return text.strip() or None


def _optional_address(text: str) -> Address | None:
    return parse_address(text) if text.strip() else None


def _port(text: str) -> int:
    if not _DIGITS.fullmatch(text.strip()) or not 0 < int(text) < 65536:
        raise ValueError("a port number between 1 and 65535")
    return int(text)


_HTTP_URL = re.compile(r"https?://[^\s/?#]+[^\s]*")


def _http_url(expected: str, optional: bool = False) -> Callable[[str], Any]:
    """A parser for http(s) URLs; `expected` is the message's example."""

    def parse(text: str) -> str | None:
        value = text.strip()
        if optional and not value:
            return None
        if not _HTTP_URL.fullmatch(value):
            raise ValueError(expected)
        return value

    return parse


_https_url = _http_url("an ACME directory URL such as "
                       "https://acme-v02.api.letsencrypt.org/directory")
_optional_url = _http_url("an http(s) URL such as https://auth.example.com/.well-known/jwks.json",
                          optional=True)


def _optional_secret(text: str) -> str | None:
    return text if text.strip() else None


def _redis_url(text: str) -> str:
    value = text.strip()
    if not re.fullmatch(r"(redis|rediss|unix)://\S+", value):
        raise ValueError("a Redis URL such as redis://redis:6379/0")
    return value


def _algorithms(text: str) -> tuple[str, ...]:
    if not text.strip():
        return ()
    from edgeproxy.core.jws import parse_algorithms

    return parse_algorithms(text)


def parse_hosts(text: str) -> tuple[tuple[str, int | None], ...]:
    """'admin.internal, proxy:8081' -> ((name, port or None), ...), names lower-cased."""
    from edgeproxy.core.hosts import HostError, parse_host

    out: list[tuple[str, int | None]] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(parse_host(part))
        except HostError:
            raise ValueError("comma-separated host names or addresses with an optional port, "
                             "e.g. admin.internal,proxy:8081") from None
    return tuple(out)


def _optional_path(text: str) -> Path | None:
    return Path(text.strip()) if text.strip() else None


def _positive(parse: Callable[[str], float]) -> Callable[[str], float]:
    def check(text: str) -> float:
        value = parse(text)
        if value <= 0:
            raise ValueError("a duration greater than zero, e.g. 5s")
        return value

    return check


def _count(text: str) -> int:
    if not _DIGITS.fullmatch(text.strip()):
        raise ValueError("a whole number of 0 or more")
    return int(text)


def _workers(text: str) -> int:
    value = text.strip().lower()
    if value == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
    if not _DIGITS.fullmatch(value) or not 1 <= int(value) <= 256:
        raise ValueError("auto (one per core) or a whole number from 1 to 256")
    return int(value)


def _positive_size(text: str) -> int:
    value = parse_size(text)
    if value < 1:
        raise ValueError("a size of at least 1 byte, such as 64k")
    return value


def _positive_int(text: str) -> int:
    if not _DIGITS.fullmatch(text.strip()) or int(text) < 1:
        raise ValueError("a whole number of at least 1")
    return int(text)


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: its env var, default (as the user would write it), parser and doc line."""

    attr: str
    default: str
    parse: Callable[[str], Any]
    doc: str

    @property
    def env(self) -> str:
        return "EDGEPROXY_" + self.attr.upper()


OPTIONS: tuple[Option, ...] = (
    Option("listen", "0.0.0.0:8080", parse_address, "address for proxied traffic"),
    Option("admin_listen", "127.0.0.1:8081", parse_address,
           "address for /healthz and /routes (keep it private)"),
    Option("admin_hosts", "", parse_hosts,
           "extra Host names the admin listener answers (DNS-rebinding guard), e.g. "
           "admin.internal,proxy:8081"),
    Option("workers", "auto", _workers,
           "processes serving the listen port (SO_REUSEPORT); auto = one per core"),
    Option("tls_listen", "", _optional_address,
           "address for HTTPS (e.g. 0.0.0.0:8443); unset = no TLS listener"),
    Option("tls_certs_dir", "", _optional_path, "folder of name.crt + name.key pairs (SNI)"),
    Option("tls_cert", "", _optional_path, "one certificate (PEM), the default for unknown names"),
    Option("tls_key", "", _optional_path, "its private key (PEM)"),
    Option("tls_reload", "2s", _positive(parse_duration), "how often certificate files are checked"),
    Option("tls_redirect_port", "443", _port, "port in https redirects (the published HTTPS port)"),
    Option("acme_directory", "https://acme-v02.api.letsencrypt.org/directory", _https_url,
           "ACME directory for gateway.tls=acme (default: Let's Encrypt)"),
    Option("acme_email", "", _optional_str, "contact e-mail for the ACME account"),
    Option("acme_ca_bundle", "", _optional_path,
           "CA bundle to trust the ACME server with (a private CA such as Pebble's)"),
    Option("acme_renew_before", "30d", _positive(parse_duration),
           "renew ACME certificates this long before they expire"),
    Option("state_dir", "/var/lib/edgeproxy", lambda t: Path(t.strip() or "/var/lib/edgeproxy"),
           "where ACME account, certificates and locks are kept (a volume)"),
    Option("label_prefix", "gateway", _label_prefix, "label namespace read from containers"),
    Option("network", "", _optional_str,
           "Docker network to reach containers on when they have several (default: their only one)"),
    Option("exposed_by_default", "true", parse_bool,
           "route labelled containers unless gateway.enable=false; false: only gateway.enable=true"),
    Option("docker", "true", parse_bool, "discover containers from Docker (DOCKER_HOST etc. apply)"),
    Option("swarm", "auto", _choice("auto", "true", "false"),
           "discover Swarm services and tasks: auto = when the daemon is an active manager"),
    Option("swarm_poll", "1s", _positive(parse_duration),
           "how often Swarm tasks are listed (Docker emits no task events)"),
    Option("connect_timeout", "5s", _positive(parse_duration), "upstream connect timeout"),
    Option("read_timeout", "60s", _positive(parse_duration),
           "upstream inactivity timeout (no bytes for this long -> 504); streams may run longer"),
    Option("drain_timeout", "8s", parse_duration,
           "on SIGTERM, how long in-flight requests may finish before they are cut"),
    Option("debounce", "100ms", parse_duration,
           "minimum time between two route-table swaps (bursts of events coalesce)"),
    Option("docker_backoff_max", "30s", _positive(parse_duration),
           "longest wait between Docker reconnect attempts"),
    Option("docker_events_idle", "60s", parse_duration,
           "re-open a Docker event stream silent this long, with a fresh list (a socket proxy "
           "or tcp:// link that went dead without closing); 0 = never"),
    Option("routes_file", "", _optional_path, "TOML file with static routes, reloaded on change"),
    Option("routes_file_poll", "1s", _positive(parse_duration), "how often the routes file is checked"),
    Option("max_body_size", "10m", parse_size, "largest request body accepted (0 = unlimited) -> 413"),
    Option("header_timeout", "30s", parse_duration,
           "a request head must arrive within this long, else 408 and close (0 = off)"),
    Option("ws_max_message", "4m", parse_size,
           "largest WebSocket message relayed (bigger: closed with 1009); 0 = unlimited"),
    Option("max_header_size", "32k", _positive_size,
           "largest request head (request line and all headers) -> 431 (nginx's 4 x 8k)"),
    Option("max_headers", "100", _positive_int, "most header lines in a request head -> 431 (Envoy)"),
    Option("max_uri_size", "8k", _positive_size, "longest request target -> 414 (nginx's 8k)"),
    Option("keepalive_timeout", "75s", _positive(parse_duration),
           "how long an idle client connection is kept between requests (nginx's 75s)"),
    Option("max_response_header_size", "64k", _positive_size,
           "largest response head a replica may send (status line, headers, 1xx heads, "
           "trailers) -> 502"),
    Option("max_response_headers", "100", _positive_int,
           "most header lines in a replica's response head (Envoy's max_headers_count) -> 502"),
    Option("trusted_proxies", "", parse_networks,
           "CIDRs whose X-Forwarded-* headers are trusted (default: none)"),
    Option("jwt_secret", "", _optional_secret, "HMAC secret for gateway.auth=jwt (HS256/384/512)"),
    Option("jwt_public_key", "", _optional_secret,
           "PEM public key(s) for gateway.auth=jwt (RSA, EC, EdDSA)"),
    Option("jwt_public_key_file", "", _optional_path, "file holding PEM public key(s)"),
    Option("jwks_url", "", _optional_url, "JWKS URL; keys cached by kid, refetched on an unknown kid"),
    Option("jwt_algorithms", "", _algorithms,
           "allowed algorithms, comma-separated (default: those that fit the configured keys)"),
    Option("jwt_issuer", "", _optional_str, "required iss claim"),
    Option("jwt_audience", "", _optional_str, "required aud claim (gateway.auth.audience overrides)"),
    Option("jwt_leeway", "30s", parse_duration, "clock skew allowed for exp/nbf/iat"),
    Option("jwks_timeout", "3s", _positive(parse_duration), "JWKS fetch timeout"),
    Option("jwks_cooldown", "30s", parse_duration, "least time between two JWKS refetches"),
    Option("ratelimit_backend", "memory", _choice("memory", "redis"),
           "where rate-limit buckets live: memory (per process) or redis (shared by replicas)"),
    Option("redis_url", "redis://127.0.0.1:6379/0", _redis_url,
           "Redis for EDGEPROXY_RATELIMIT_BACKEND=redis"),
    Option("ratelimit_failure", "open", _choice("open", "closed"),
           "when Redis is unreachable: open (admit) or closed (refuse with 503)"),
    Option("ratelimit_max_keys", "100000", _positive_int,
           "most rate-limit buckets kept in memory (least recently used are dropped)"),
    Option("log_level", "info", _choice("debug", "info", "warning", "error"), "log level"),
    Option("log_format", "json", _choice("json", "console"), "log format"),
    Option("access_log", "true", parse_bool, "one log event per proxied request"),
    Option("hold_period", "30s", parse_duration,
           "how long a route whose containers are all gone answers 503 before it becomes 404"),
    Option("eject_time", "5s", _positive(parse_duration),
           "first passive ejection of a replica after a connection failure (doubles, max 60s)"),
    Option("retries", "2", lambda t: _count(t),
           "extra tries on another replica when a connection fails (idempotent requests also "
           "after a reset)"),
    Option("retry_after", "5", _positive_int, "Retry-After seconds on 503 when a route has no replica"),
    # --- edgeproxy-h2: HTTP/2 at the edge and to the replicas ---
    Option("h2c", "false", parse_bool,
           "accept HTTP/2 with prior knowledge (h2c, e.g. gRPC) on the plain listener"),
    Option("h2_max_concurrent_streams", "128", _positive_int,
           "SETTINGS_MAX_CONCURRENT_STREAMS at the edge (nginx's http2_max_concurrent_streams); "
           "a stream over it gets RST_STREAM REFUSED_STREAM"),
    Option("h2_max_header_list_size", "60k", _positive_size,
           "largest HTTP/2 request header list, and header block before decoding (Envoy's "
           "max_request_headers_kb) -> GOAWAY"),
    Option("h2_max_resets", "256", _positive_int,
           "client RST_STREAMs and refused streams per connection per second before GOAWAY "
           "(rapid reset, CVE-2023-44487; 2x the streams, as nginx's fix)"),
    Option("h2_max_control_frames", "1000", _positive_int,
           "PING and SETTINGS frames per connection per second before GOAWAY (Envoy's "
           "max_outbound_control_frames)"),
    Option("h2_idle_timeout", "75s", parse_duration,
           "close an HTTP/2 connection with no open stream after this long (nginx's "
           "keepalive_timeout)"),
    Option("h2_upstream_streams", "100", _positive_int,
           "most concurrent streams per HTTP/2 connection to a replica (gateway.scheme=h2c/h2)"),
)


_BY_ATTR = {opt.attr: opt for opt in OPTIONS}


def _default(attr: str, repr: bool = True) -> Any:
    """The dataclass default of a setting: its OPTIONS default, parsed (one source of truth)."""
    opt = _BY_ATTR[attr]
    return field(default_factory=lambda: opt.parse(opt.default), repr=repr)


@dataclass(frozen=True, slots=True)
class Settings:
    """Every EDGEPROXY_* setting, parsed and typed. Each default is its OPTIONS default, parsed:
    `Settings()` is what `load_settings({})` reads."""

    listen: Address = _default("listen")
    admin_listen: Address = _default("admin_listen")
    admin_hosts: tuple[tuple[str, int | None], ...] = _default("admin_hosts")
    workers: int = _default("workers")
    tls_listen: Address | None = _default("tls_listen")
    tls_certs_dir: Path | None = _default("tls_certs_dir")
    tls_cert: Path | None = _default("tls_cert")
    tls_key: Path | None = _default("tls_key")
    tls_reload: float = _default("tls_reload")
    tls_redirect_port: int = _default("tls_redirect_port")
    acme_directory: str = _default("acme_directory")
    acme_email: str | None = _default("acme_email")
    acme_ca_bundle: Path | None = _default("acme_ca_bundle")
    acme_renew_before: float = _default("acme_renew_before")
    state_dir: Path = _default("state_dir")
    label_prefix: str = _default("label_prefix")
    network: str | None = _default("network")
    exposed_by_default: bool = _default("exposed_by_default")
    docker: bool = _default("docker")
    swarm: str = _default("swarm")
    swarm_poll: float = _default("swarm_poll")
    connect_timeout: float = _default("connect_timeout")
    read_timeout: float = _default("read_timeout")
    drain_timeout: float = _default("drain_timeout")
    debounce: float = _default("debounce")
    docker_backoff_max: float = _default("docker_backoff_max")
    docker_events_idle: float = _default("docker_events_idle")
    routes_file: Path | None = _default("routes_file")
    routes_file_poll: float = _default("routes_file_poll")
    max_body_size: int = _default("max_body_size")
    header_timeout: float = _default("header_timeout")
    ws_max_message: int = _default("ws_max_message")
    max_header_size: int = _default("max_header_size")
    max_headers: int = _default("max_headers")
    max_uri_size: int = _default("max_uri_size")
    keepalive_timeout: float = _default("keepalive_timeout")
    max_response_header_size: int = _default("max_response_header_size")
    max_response_headers: int = _default("max_response_headers")
    trusted_proxies: tuple[IPNetwork, ...] = _default("trusted_proxies")
    jwt_secret: str | None = _default("jwt_secret", repr=False)
    jwt_public_key: str | None = _default("jwt_public_key", repr=False)
    jwt_public_key_file: Path | None = _default("jwt_public_key_file")
    jwks_url: str | None = _default("jwks_url")
    jwt_algorithms: tuple[str, ...] = _default("jwt_algorithms")
    jwt_issuer: str | None = _default("jwt_issuer")
    jwt_audience: str | None = _default("jwt_audience")
    jwt_leeway: float = _default("jwt_leeway")
    jwks_timeout: float = _default("jwks_timeout")
    jwks_cooldown: float = _default("jwks_cooldown")
    ratelimit_backend: str = _default("ratelimit_backend")
    redis_url: str = _default("redis_url")
    ratelimit_failure: str = _default("ratelimit_failure")
    ratelimit_max_keys: int = _default("ratelimit_max_keys")
    log_level: str = _default("log_level")
    log_format: str = _default("log_format")
    access_log: bool = _default("access_log")
    hold_period: float = _default("hold_period")
    eject_time: float = _default("eject_time")
    retries: int = _default("retries")
    retry_after: int = _default("retry_after")

    h2c: bool = _default("h2c")
    h2_max_concurrent_streams: int = _default("h2_max_concurrent_streams")
    h2_max_header_list_size: int = _default("h2_max_header_list_size")
    h2_max_resets: int = _default("h2_max_resets")
    h2_max_control_frames: int = _default("h2_max_control_frames")
    h2_idle_timeout: float = _default("h2_idle_timeout")
    h2_upstream_streams: int = _default("h2_upstream_streams")


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read every EDGEPROXY_* variable; raise SettingsError naming the first bad one."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        raw = env.get(opt.env)
        if raw is None:
            values[opt.attr] = opt.parse(opt.default)
            continue
        try:
            values[opt.attr] = opt.parse(raw)
        except ValueError as exc:
            raise SettingsError(opt.env, raw, str(exc)) from None
    settings = Settings(**values)
    if settings.docker:
        check_docker_host(env.get("DOCKER_HOST"))
    return settings


def check_docker_host(value: str | None) -> None:
    """Raise SettingsError for a DOCKER_HOST the docker SDK cannot use: retrying won't fix it."""
    if not value:
        return  # the SDK's default, unix:///var/run/docker.sock
    from docker.utils.utils import parse_host  # the SDK's own parser: what it refuses, fails

    try:
        parse_host(value, False, False)
    except Exception:  # noqa: BLE001 - DockerException or ValueError, same meaning
        raise SettingsError("DOCKER_HOST", value,
                            "unix:///path/to/docker.sock, tcp://HOST:PORT or ssh://USER@HOST "
                            "(or EDGEPROXY_DOCKER=false)") from None


def unknown_settings(environ: Mapping[str, str] | None = None) -> list[str]:
    """EDGEPROXY_* names that no option reads: likely typos, logged as warnings at start."""
    env = os.environ if environ is None else environ
    known = {opt.env for opt in OPTIONS}
    return sorted(n for n in env if n.startswith("EDGEPROXY_") and n not in known)
