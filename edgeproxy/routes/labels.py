"""Container labels (or routes-file keys) -> a route spec, or errors naming label, value and why."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from edgeproxy.core.paths import PathError, normalize_path
from edgeproxy.core.settings import parse_bool, parse_duration, parse_size
from edgeproxy.core.state import fast_state
from edgeproxy.policies.basic import BasicAuthSpec, parse_realm, parse_users, parse_users_file
from edgeproxy.policies.forwardauth import ForwardAuthSpec, parse_auth_url, parse_copied_headers
from edgeproxy.policies.iplist import IpRules, parse_cidrs
from edgeproxy.policies.ratelimit import RateLimitSpec, parse_ratelimit, parse_ratelimit_key
from edgeproxy.routes.model import AuthSpec, HealthSpec, RouteSpec
from edgeproxy.routes.transform import (
    SIMPLE_METHODS,
    CorsSpec,
    HeaderRules,
    parse_header_list,
    parse_header_name,
    parse_header_value,
    parse_methods,
    parse_origins,
    parse_prefix,
    parse_rewrite,
)


@fast_state
@dataclass(frozen=True, slots=True)
class LabelError:
    """One bad label: which, its value, and what was expected."""

    label: str
    value: str
    reason: str

    def __str__(self) -> str:
        return f"{self.label}={self.value!r}: {self.reason}"


class LabelsInvalid(ValueError):
    """A container's labels cannot be routed; the container is skipped, others are not."""

    def __init__(self, errors: list[LabelError]) -> None:
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = errors


@dataclass(frozen=True, slots=True)
class Routing:
    """What a container's labels ask for: the shared spec plus per-replica port and network."""

    spec: RouteSpec
    port: int | None
    network: str | None
    weight: int = 1


@dataclass(frozen=True, slots=True)
class NotRouted:
    """The labels deliberately don't route this container."""

    reason: str


_HOST = re.compile(r"^(\*\.)?(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*$")
_DIGITS = re.compile(r"[0-9]{1,9}")
_NETWORK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _split_list(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def parse_paths(value: str) -> tuple[str, ...]:
    """'/orders,/v1/orders' -> normalised prefixes."""
    parts = _split_list(value)
    if not parts:
        raise ValueError("one or more path prefixes such as /orders, comma-separated")
    out: list[str] = []
    for part in parts:
        if not part.startswith("/"):
            raise ValueError(f"path {part!r} must start with '/'")
        if "?" in part or "#" in part:
            raise ValueError(f"path {part!r} must not hold a query or fragment")
        try:
            norm = normalize_path(part)
        except PathError as exc:
            raise ValueError(f"path {part!r}: {exc}") from None
        trimmed = norm.rstrip("/") or "/"
        if trimmed != (part.rstrip("/") or "/"):
            raise ValueError(f"path {part!r} is not canonical; write {trimmed!r}")
        if trimmed not in out:
            out.append(trimmed)
    return tuple(out)


def parse_hosts(value: str) -> tuple[str, ...]:
    """'api.example.com,*.example.com' -> lower-case host patterns."""
    parts = _split_list(value)
    if not parts:
        raise ValueError("one or more host names such as api.example.com, comma-separated")
    out: list[str] = []
    for part in parts:
        host = part.lower().rstrip(".")
        if len(host) > 253 or not _HOST.match(host):
            raise ValueError(
                f"host {part!r} is not a host name (letters, digits, '-', dots; "
                "'*.' allowed as the first label; no port)"
            )
        if host not in out:
            out.append(host)
    return tuple(out)


def parse_port(value: str) -> int:
    """'8080' -> 8080."""
    if not _DIGITS.fullmatch(value.strip()) or not 0 < int(value) < 65536:
        raise ValueError("a port number between 1 and 65535")
    return int(value)


parse_flag = parse_bool  # one bool grammar for labels and settings: true/false, yes/no, on/off, 1/0


def parse_network(value: str) -> str:
    """A Docker network name."""
    v = value.strip()
    if not _NETWORK.match(v):
        raise ValueError("a Docker network name")
    return v


def _int_in(low: int, high: int, what: str) -> Callable[[str], int]:
    def parse(value: str) -> int:
        v = value.strip()
        if not _DIGITS.fullmatch(v) or not low <= int(v) <= high:
            raise ValueError(f"{what}: a whole number from {low} to {high}")
        return int(v)

    return parse


def parse_duration_label(value: str) -> float:
    """'2s', '250ms', '1m' -> seconds (greater than zero)."""
    try:
        seconds = parse_duration(value)
    except ValueError:
        raise ValueError("a duration such as 250ms, 2s or 1m") from None
    if seconds <= 0:
        raise ValueError("a duration greater than zero, such as 2s")
    return seconds


def parse_status_range(value: str) -> tuple[int, int]:
    """'200-399' or '200' -> (low, high)."""
    m = re.fullmatch(r"\s*([1-5][0-9][0-9])\s*(?:-\s*([1-5][0-9][0-9])\s*)?", value)
    if not m:
        raise ValueError("a status or status range such as 200 or 200-399")
    low = int(m.group(1))
    high = int(m.group(2) or low)
    if high < low:
        raise ValueError("a status range low-high with low <= high, such as 200-399")
    return low, high


def parse_health_path(value: str) -> str:
    """'/healthz' (a query is allowed) -> the path to probe."""
    v = value.strip()
    path, _, query = v.partition("?")
    if not path.startswith("/"):
        raise ValueError("a path starting with '/', such as /healthz")
    try:
        norm = normalize_path(path)
    except PathError as exc:
        raise ValueError(f"path {path!r}: {exc}") from None
    return norm + ("?" + query if query else "")


def parse_lb(value: str) -> str:
    """round_robin or least_conn."""
    v = value.strip().lower()
    if v not in ("round_robin", "least_conn"):
        raise ValueError("round_robin or least_conn")
    return v


AUTH_KINDS = ("jwt", "basic", "forward")
# The keys each auth kind reads; a key of another kind on the same route is an error.
AUTH_KEYS: dict[str, tuple[str, ...]] = {
    "jwt": ("auth.scopes", "auth.audience"),
    "basic": ("auth.users", "auth.users_file", "auth.realm", "auth.keep_authorization"),
    "forward": ("auth.url", "auth.response_headers", "auth.request_headers", "auth.timeout"),
}


def parse_auth(value: str) -> str:
    """jwt, basic or forward: one kind per route."""
    v = value.strip().lower()
    if v not in AUTH_KINDS:
        several = [p.strip() for p in re.split(r"[,\s]+", v) if p.strip()]
        if len(several) > 1 and all(p in AUTH_KINDS for p in several):
            raise ValueError("one of jwt, basic or forward: a route has one auth kind (put "
                             "routes that need another kind on another path or host)")
        raise ValueError("jwt, basic or forward")
    return v


def parse_scopes(value: str) -> tuple[str, ...]:
    """'orders:read orders:write' (spaces or commas) -> scopes, all required."""
    scopes = tuple(dict.fromkeys(s for s in re.split(r"[\s,]+", value.strip()) if s))
    if not scopes:
        raise ValueError("one or more scopes separated by spaces, e.g. orders:read orders:write")
    for s in scopes:
        if not re.fullmatch(r"[\x21\x23-\x5B\x5D-\x7E]+", s):
            raise ValueError(f"scope {s!r} holds characters a scope may not have (RFC 6749 3.3)")
    return scopes


def parse_audience(value: str) -> str:
    """A JWT audience value."""
    v = value.strip()
    if not v or any(ord(ch) < 0x20 for ch in v):
        raise ValueError("a non-empty audience such as https://api.example.com")
    return v


def parse_scheme(value: str) -> str:
    """How to reach the replicas: http, https, h2c (HTTP/2 cleartext) or h2 (HTTP/2 over TLS)."""
    v = value.strip().lower()
    if v not in ("http", "https", "h2c", "h2"):
        raise ValueError("http, https, h2c or h2")
    return v


def parse_ca_path(value: str) -> str:
    """An absolute path inside the proxy's container."""
    v = value.strip()
    if not v.startswith("/") or any(ord(ch) < 0x20 for ch in v):
        raise ValueError("an absolute path to a PEM CA bundle inside the proxy container")
    return v


def parse_server_name(value: str) -> str:
    """The TLS server name to verify the replicas' certificates against."""
    hosts = parse_hosts(value)
    if len(hosts) != 1 or hosts[0].startswith("*."):
        raise ValueError("one host name, e.g. orders.internal")
    return hosts[0]


def parse_edge_tls(value: str) -> str | None:
    """acme (automatic certificates), true (certificates from files) or false."""
    v = value.strip().lower()
    if v == "acme":
        return "acme"
    if v in ("true", "1", "yes", "on", "files"):
        return "files"
    if v in ("false", "0", "no", "off"):
        return None
    raise ValueError("acme, true (certificates from files) or false")


def parse_hsts(value: str) -> int:
    """'365d' or seconds -> Strict-Transport-Security max-age."""
    try:
        seconds = parse_duration(value)
    except ValueError:
        raise ValueError("a max-age such as 365d, 180d or 31536000") from None
    return int(seconds)


def parse_body_size(value: str) -> int:
    """'10m', '512k', '0' (unlimited)."""
    try:
        return parse_size(value)
    except ValueError:
        raise ValueError("a size such as 512k, 10m or 1g (0 = unlimited)") from None


def _ratelimit(value: str) -> tuple[int, float, int]:
    return parse_ratelimit(value)


# Keys under the prefix that the core understands, with their parsers. An unknown key is an
# error: a typo must not silently drop a policy (gateway.auht=jwt would expose a service).
KEYS: dict[str, Callable[[str], object]] = {
    "enable": parse_flag,
    "path": parse_paths,
    "host": parse_hosts,
    "port": parse_port,
    "network": parse_network,
    "strip_prefix": parse_flag,
    "lb": parse_lb,
    "weight": _int_in(1, 100, "replica weight"),
    "retries": _int_in(0, 10, "extra tries"),
    "timeout.connect": parse_duration_label,
    "timeout.read": parse_duration_label,
    "health.path": parse_health_path,
    "health.interval": parse_duration_label,
    "health.timeout": parse_duration_label,
    "health.status": parse_status_range,
    "health.fails": _int_in(1, 100, "failures in a row"),
    "health.passes": _int_in(1, 100, "successes in a row"),
    "auth": parse_auth,
    "auth.scopes": parse_scopes,
    "auth.audience": parse_audience,
    "auth.users": parse_users,
    "auth.users_file": parse_users_file,
    "auth.realm": parse_realm,
    "auth.keep_authorization": parse_flag,
    "auth.url": parse_auth_url,
    "auth.response_headers": parse_copied_headers,
    "auth.request_headers": parse_copied_headers,
    "auth.timeout": parse_duration_label,
    "ip.allow": parse_cidrs,
    "ip.deny": parse_cidrs,
    "ratelimit": _ratelimit,
    "ratelimit.key": parse_ratelimit_key,
    "rewrite": parse_rewrite,
    "add_prefix": parse_prefix,
    "cors.origins": parse_origins,
    "cors.methods": parse_methods,
    "cors.headers": parse_header_list,
    "cors.expose": parse_header_list,
    "cors.credentials": parse_flag,
    "cors.max_age": _int_in(0, 86400, "seconds"),
    "compress": parse_flag,
    "scheme": parse_scheme,
    "tls.verify": parse_flag,
    "tls.ca": parse_ca_path,
    "tls.server_name": parse_server_name,
    "max_body": parse_body_size,
    "tls": parse_edge_tls,
    "tls.redirect": parse_flag,
    "tls.hsts": parse_hsts,
    "tls.hsts.subdomains": parse_flag,
}
# Families of keys whose last part is a header name: gateway.request.headers.X-Env=prod.
HEADER_FAMILIES = ("request.headers.", "response.headers.")



def parse_options(
    options: Mapping[str, str], label_of: Callable[[str], str]
) -> tuple[dict[str, object], list[LabelError]]:
    """Parse unprefixed keys -> values; every bad or unknown key becomes a LabelError."""
    values: dict[str, Any] = {}
    errors: list[LabelError] = []
    for key in sorted(options):
        raw = options[key]
        parser = KEYS.get(key)
        if parser is None:
            family = next((f for f in HEADER_FAMILIES if key.startswith(f)), None)
            if family is None:
                errors.append(LabelError(label_of(key), raw, _unknown_key_reason(key)))
                continue
            try:
                name = parse_header_name(key[len(family):])
                values.setdefault(family, []).append((name, parse_header_value(raw)))
            except ValueError as exc:
                errors.append(LabelError(label_of(key), raw, str(exc)))
            continue
        try:
            values[key] = parser(raw)
        except (OverflowError, RecursionError, MemoryError):
            # Hostile values (a{4294967296}, 1000 nested groups, 400 nines): one container's
            # problem, never the watcher's.
            errors.append(LabelError(label_of(key), raw[:200], "value too large or too complex"))
        except ValueError as exc:
            errors.append(LabelError(label_of(key), raw, str(exc)))
    return values, errors


# Words other proxies use for our keys: a hint for people coming from Traefik or Caddy.
_ALIASES = {"url": "path", "uri": "path", "endpoint": "path", "prefix": "path", "rule": "path",
            "domain": "host", "hostname": "host", "server.port": "port", "loadbalancer": "lb",
            "strip": "strip_prefix", "stripprefix": "strip_prefix", "rate": "ratelimit",
            "rate_limit": "ratelimit",
            # Traefik's and nginx-proxy's words for the access keys
            "auth.address": "auth.url", "auth.authresponseheaders": "auth.response_headers",
            "auth.authrequestheaders": "auth.request_headers", "auth.user": "auth.users",
            "auth.usersfile": "auth.users_file", "auth.htpasswd": "auth.users_file",
            "auth.removeheader": "auth.keep_authorization", "ip.allowlist": "ip.allow",
            "ip.whitelist": "ip.allow", "ip.sourcerange": "ip.allow", "ip.denylist": "ip.deny",
            "ip.blacklist": "ip.deny", "ipallowlist": "ip.allow", "ipwhitelist": "ip.allow",
            "ip": "ip.allow", "allow": "ip.allow", "deny": "ip.deny"}


_FAMILY_MAIN = {"health": "health.path", "cors": "cors.origins", "timeout": "timeout.read",
                "ip": "ip.allow"}


def suggest_key(key: str) -> str | None:
    """The known key a typo most likely meant, or None when nothing is convincingly close."""
    words = frozenset(w for w in re.split(r"[._-]", key) if w)
    for known in KEYS:  # same words in another order: read_timeout -> timeout.read
        if words == frozenset(re.split(r"[._-]", known)):
            return known
    alias = _ALIASES.get(key)
    if alias:
        return alias
    group, dot, last = key.rpartition(".")
    if dot:
        # Only siblings in the same family: a shared 'health.' must not make health.host
        # look like health.status.
        alias = _ALIASES.get(last)
        if alias and f"{group}.{alias}" in KEYS:
            return f"{group}.{alias}"
        siblings = {k.rpartition(".")[2]: k for k in KEYS if k.rpartition(".")[0] == group}
        return _closest(last, siblings)
    family = sorted(k for k in KEYS if k.startswith(key + "."))
    if family:  # 'health' alone: the family's main key
        return _FAMILY_MAIN.get(key, family[0])
    tails = [k for k in KEYS if k.rpartition(".")[2] == key]
    if len(tails) == 1:  # 'scopes' -> auth.scopes
        return tails[0]
    return _closest(key, {k: k for k in KEYS if "." not in k})


def _closest(word: str, candidates: Mapping[str, str]) -> str | None:
    """A candidate the word is a typo, prefix or stem of (retry -> retries, status_code ->
    status); None when nothing is convincingly close."""
    for name, key in candidates.items():
        stem = name.rstrip("s")
        if len(word) >= 3 and len(stem) >= 4 and (
                word.startswith(stem) or name.startswith(word.rstrip("y"))):
            return key
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.75)
    return candidates[close[0]] if close else None


def known_keys_text() -> str:
    """The known keys, families folded: 'auth, auth.*, enable, health.*, ...'."""
    families: dict[str, int] = {}
    for k in KEYS:
        head, dot, _ = k.partition(".")
        if dot:
            families[head] = families.get(head, 0) + 1
    shown = set()
    for k in KEYS:
        head, dot, _ = k.partition(".")
        shown.add(f"{head}.*" if dot and families[head] > 1 else k)
    shown.update(f"{family}<Name>" for family in HEADER_FAMILIES)
    return ", ".join(sorted(shown))


def _unknown_key_reason(key: str) -> str:
    close = suggest_key(key)
    if close:
        return f"unknown key; did you mean {close!r}?"
    return f"unknown key; known keys are {known_keys_text()}"


def build_routing(
    values: Mapping[str, Any],
    label_of: Callable[[str], str] = lambda key: key,
    raw: Mapping[str, str] | None = None,
) -> Routing:
    """Parsed values -> Routing; raise LabelsInvalid for combinations that make no sense.

    `raw` holds the values as written, so errors quote what the user wrote."""
    errors: list[LabelError] = []

    def written(key: str) -> str:
        if raw is not None and key in raw:
            return raw[key]
        return _text(values[key]) if key in values else "(default)"

    health: HealthSpec | None = None
    health_keys = sorted(k for k in values if k.startswith("health."))
    if "health.path" in values:
        low, high = values.get("health.status", (200, 399))
        health = HealthSpec(
            path=values["health.path"],
            interval=values.get("health.interval", 5.0),
            timeout=values.get("health.timeout", 2.0),
            status_min=low, status_max=high,
            fails=values.get("health.fails", 3),
            passes=values.get("health.passes", 2),
        )
        if health.timeout > health.interval:
            shown = written("health.timeout") if "health.timeout" in values else (
                f"{health.timeout:g}s")
            errors.append(LabelError(label_of("health.timeout"), shown,
                                     "must not be longer than the health check interval "
                                     f"({health.interval:g}s)"))
    elif health_keys:
        errors.append(LabelError(label_of(health_keys[0]), written(health_keys[0]),
                                 f"needs {label_of('health.path')} to say what to probe"))
    auth = _auth_spec(values, label_of, written, errors)
    ip: IpRules | None = None
    if "ip.allow" in values or "ip.deny" in values:
        ip = IpRules(values.get("ip.allow", ()), values.get("ip.deny", ()))
    ratelimit: RateLimitSpec | None = None
    key = values.get("ratelimit.key", "ip")
    if "ratelimit" in values:
        limit, period, burst = values["ratelimit"]
        ratelimit = RateLimitSpec(limit, period, burst, key)
        if key == "sub" and auth is None:
            errors.append(LabelError(label_of("ratelimit.key"), written("ratelimit.key"),
                                     f"keys by the verified JWT subject, so it needs "
                                     f"{label_of('auth')}=jwt on the same container"))
        elif key == "sub" and auth is not None and auth.kind == "forward":
            errors.append(LabelError(label_of("ratelimit.key"), written("ratelimit.key"),
                                     f"keys by the verified subject, which "
                                     f"{label_of('auth')}=forward does not have: use jwt or "
                                     "basic, or key by ip or header:<Name>"))
    elif "ratelimit.key" in values:
        errors.append(LabelError(label_of("ratelimit.key"), written("ratelimit.key"),
                                 f"needs {label_of('ratelimit')}, e.g. 100/m"))
    cors: CorsSpec | None = None
    cors_keys = sorted(k for k in values if k.startswith("cors."))
    if "cors.origins" in values:
        cors = CorsSpec(
            origins=values["cors.origins"],
            methods=values.get("cors.methods", SIMPLE_METHODS),
            headers=values.get("cors.headers", ()),
            credentials=values.get("cors.credentials", False),
            max_age=values.get("cors.max_age"),
            expose=values.get("cors.expose", ()),
        )
        if cors.origins is None and cors.credentials:
            errors.append(LabelError(label_of("cors.credentials"), written("cors.credentials"),
                                     f"browsers refuse credentials with {label_of('cors.origins')}"
                                     "=*: list the allowed origins instead"))
    elif cors_keys:
        errors.append(LabelError(label_of(cors_keys[0]), written(cors_keys[0]),
                                 f"needs {label_of('cors.origins')} (e.g. https://app.example.com)"))
    scheme = values.get("scheme", "http")
    if scheme not in ("https", "h2"):  # the schemes over TLS
        for key in ("tls.verify", "tls.ca", "tls.server_name"):
            if key in values:
                errors.append(LabelError(label_of(key), written(key),
                                         f"needs {label_of('scheme')}=https or h2"))
    edge_tls = values.get("tls")
    hosts = values.get("host", ())
    if edge_tls == "acme" and (not hosts or any(h.startswith("*.") for h in hosts)):
        errors.append(LabelError(label_of("tls"), written("tls"),
                                 f"needs {label_of('host')} with exact host names (ACME HTTP-01 "
                                 "cannot issue wildcards)"))
    for key in ("tls.redirect", "tls.hsts", "tls.hsts.subdomains"):
        if key in values and edge_tls is None:
            errors.append(LabelError(label_of(key), written(key),
                                     f"needs {label_of('tls')}=acme or {label_of('tls')}=true"))
    if errors:
        raise LabelsInvalid(errors)
    spec = RouteSpec(
        hosts=values.get("host", ()),
        paths=values.get("path", ("/",)),
        strip_prefix=bool(values.get("strip_prefix", False)),
        lb=values.get("lb", "round_robin"),
        retries=values.get("retries"),
        connect_timeout=values.get("timeout.connect"),
        read_timeout=values.get("timeout.read"),
        health=health,
        auth=auth,
        ip=ip,
        ratelimit=ratelimit,
        request_headers=HeaderRules.build(values.get("request.headers.", ())),
        response_headers=HeaderRules.build(values.get("response.headers.", ())),
        rewrite=values.get("rewrite"),
        add_prefix=values.get("add_prefix"),
        cors=cors,
        compress=values.get("compress", False),
        scheme=scheme,
        tls_verify=values.get("tls.verify", True),
        tls_ca=values.get("tls.ca"),
        tls_server_name=values.get("tls.server_name"),
        max_body=values.get("max_body"),
        tls=edge_tls,
        tls_redirect=values.get("tls.redirect", edge_tls is not None),
        hsts=values.get("tls.hsts"),
        hsts_subdomains=values.get("tls.hsts.subdomains", False),
    )
    return Routing(spec=spec, port=values.get("port"), network=values.get("network"),
                   weight=values.get("weight", 1))


def _auth_spec(values: Mapping[str, Any], label_of: Callable[[str], str],
               written: Callable[[str], str], errors: list[LabelError]) -> AuthSpec | None:
    """The route's one auth kind from gateway.auth and its keys; problems go to `errors`."""
    kind = values.get("auth")
    for other, keys in AUTH_KEYS.items():
        if other == kind:
            continue
        for key in keys:
            if key in values:
                reason = (f"needs {label_of('auth')}={other}" if kind is None else
                          f"belongs to {label_of('auth')}={other}, but this route has "
                          f"{label_of('auth')}={kind} (one auth kind per route)")
                errors.append(LabelError(label_of(key), written(key), reason))
    if kind == "basic":
        if "auth.users" not in values and "auth.users_file" not in values:
            errors.append(LabelError(label_of("auth"), written("auth"),
                                     f"needs {label_of('auth.users')} (htpasswd lines) or "
                                     f"{label_of('auth.users_file')}"))
        return AuthSpec(kind="basic", basic=BasicAuthSpec(
            users=values.get("auth.users", ()), users_file=values.get("auth.users_file"),
            realm=values.get("auth.realm"),
            keep_authorization=values.get("auth.keep_authorization", False)))
    if kind == "forward":
        if "auth.url" not in values:
            errors.append(LabelError(label_of("auth"), written("auth"),
                                     f"needs {label_of('auth.url')} (the auth service, e.g. "
                                     "http://authelia:9091/api/authz/forward-auth)"))
            return None
        return AuthSpec(kind="forward", forward=ForwardAuthSpec(
            url=values["auth.url"], response_headers=values.get("auth.response_headers", ()),
            request_headers=values.get("auth.request_headers"),
            timeout=values.get("auth.timeout")))
    if kind == "jwt":
        return AuthSpec(scopes=values.get("auth.scopes", ()), audience=values.get("auth.audience"))
    return None


def parse_labels(
    labels: Mapping[str, str], prefix: str = "gateway", exposed_by_default: bool = True
) -> Routing | NotRouted:
    """A container's labels -> Routing, NotRouted, or raise LabelsInvalid with every problem."""
    dotted = prefix + "."
    options = {k[len(dotted):]: v for k, v in labels.items() if k.startswith(dotted)}
    if not options:
        return NotRouted(f"no {prefix}.* labels")
    values, errors = parse_options(options, lambda key: dotted + key)
    enable = values.get("enable")
    if enable is False:
        return NotRouted(f"{prefix}.enable=false")
    if errors:
        raise LabelsInvalid(errors)
    if enable is None and not exposed_by_default:
        return NotRouted(f"{prefix}.enable=true is required (EDGEPROXY_EXPOSED_BY_DEFAULT=false)")
    if "path" not in values and "host" not in values:
        raise LabelsInvalid([
            LabelError(f"{prefix}.path", "", f"missing: a routed container needs {prefix}.path "
                       f"or {prefix}.host (or set {prefix}.enable=false)")
        ])
    return build_routing(values, lambda key: dotted + key, options)


def _text(value: object) -> str:
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value)
    return str(value)
