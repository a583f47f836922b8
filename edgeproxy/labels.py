"""Container labels (or routes-file keys) -> a route spec, or errors naming label, value and why."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from edgeproxy.model import RouteSpec
from edgeproxy.paths import PathError, normalize_path


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


@dataclass(frozen=True, slots=True)
class NotRouted:
    """The labels deliberately don't route this container."""

    reason: str


_HOST = re.compile(r"^(\*\.)?(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*$")
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
    if not value.strip().isdigit() or not 0 < int(value) < 65536:
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


# Keys under the prefix that the core understands, with their parsers. An unknown key is an
# error: a typo must not silently drop a policy (gateway.auht=jwt would expose a service).
KEYS: dict[str, Callable[[str], object]] = {
    "enable": parse_flag,
    "path": parse_paths,
    "host": parse_hosts,
    "port": parse_port,
    "network": parse_network,
    "strip_prefix": parse_flag,
}


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
    close = [k for k in KEYS if _similar(k, key)]
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return "unknown key; known keys are " + ", ".join(sorted(KEYS)) + hint


def _similar(a: str, b: str) -> bool:
    if abs(len(a) - len(b)) > 2:
        return False
    distance = sum(x != y for x, y in zip(a, b, strict=False)) + abs(len(a) - len(b))
    return distance <= 2 or sorted(a) == sorted(b)


def build_routing(values: Mapping[str, object]) -> Routing:
    """Parsed values -> Routing (callers have checked that path or host is present)."""
    hosts = values.get("host", ())
    paths = values.get("path", ("/",))
    if not isinstance(hosts, tuple) or not isinstance(paths, tuple):
        raise TypeError("host and path values must be parsed tuples")
    port = values.get("port")
    network = values.get("network")
    return Routing(
        spec=RouteSpec(hosts=hosts, paths=paths, strip_prefix=bool(values.get("strip_prefix"))),
        port=port if isinstance(port, int) else None,
        network=network if isinstance(network, str) else None,
    )


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
    return build_routing(values)
