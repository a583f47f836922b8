"""Container labels (or routes-file keys) -> a route spec, or errors naming label, value and why."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from edgeproxy.model import HealthSpec, RouteSpec
from edgeproxy.paths import PathError, normalize_path
from edgeproxy.settings import parse_duration


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


def parse_flag(value: str) -> bool:
    """'true'/'false' (also yes/no, 1/0) -> bool."""
    v = value.strip().lower()
    if v in ("true", "1", "yes", "on"):
        return True
    if v in ("false", "0", "no", "off"):
        return False
    raise ValueError("true or false")


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
}
# Keys that describe one replica rather than the route (replicas may differ in them).
REPLICA_KEYS = frozenset(("port", "network", "weight", "enable"))


def parse_options(
    options: Mapping[str, str], label_of: Callable[[str], str]
) -> tuple[dict[str, object], list[LabelError]]:
    """Parse unprefixed keys -> values; every bad or unknown key becomes a LabelError."""
    values: dict[str, object] = {}
    errors: list[LabelError] = []
    for key in sorted(options):
        raw = options[key]
        parser = KEYS.get(key)
        if parser is None:
            errors.append(LabelError(label_of(key), raw, _unknown_key_reason(key)))
            continue
        try:
            values[key] = parser(raw)
        except ValueError as exc:
            errors.append(LabelError(label_of(key), raw, str(exc)))
    return values, errors


def _unknown_key_reason(key: str) -> str:
    close = difflib.get_close_matches(key, list(KEYS), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return "unknown key; known keys are " + ", ".join(sorted(KEYS)) + hint


def build_routing(
    values: Mapping[str, Any], label_of: Callable[[str], str] = lambda key: key
) -> Routing:
    """Parsed values -> Routing; raise LabelsInvalid for combinations that make no sense."""
    errors: list[LabelError] = []
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
            errors.append(LabelError(label_of("health.timeout"), f"{health.timeout:g}s",
                                     "must not be longer than the health check interval "
                                     f"({health.interval:g}s)"))
    elif health_keys:
        errors.append(LabelError(label_of(health_keys[0]), str(values[health_keys[0]]),
                                 f"needs {label_of('health.path')} to say what to probe"))
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
    )
    return Routing(spec=spec, port=values.get("port"), network=values.get("network"),
                   weight=values.get("weight", 1))


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
    return build_routing(values, lambda key: dotted + key)
