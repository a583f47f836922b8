"""`edgeproxy check`: lint the gateway labels of compose files offline, as the proxy would read them."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TextIO

import yaml

from edgeproxy.routes.labels import KEYS, LabelError, LabelsInvalid, Routing, parse_labels
from edgeproxy.routes.model import RouteSpec

# What a valid value looks like, per key: shown in fix hints, and standing in for a value that
# needs an environment variable we don't have, so the service's other labels can still be checked.
_EXAMPLES: dict[str, str] = {
    "enable": "true",
    "path": "/orders",
    "host": "api.example.com",
    "port": "8080",
    "network": "backend",
    "strip_prefix": "true",
    "lb": "least_conn",
    "weight": "10",
    "retries": "2",
    "timeout.connect": "2s",
    "timeout.read": "30s",
    "health.path": "/healthz",
    "health.interval": "5s",
    "health.timeout": "2s",
    "health.status": "200-399",
    "health.fails": "3",
    "health.passes": "2",
    # A real bcrypt entry (password 's3cret'): stand-ins must parse. Compose needs each $ as $$.
    "auth.users": "alice:$2y$05$7o6Sr7.B2kikTintmK7TKOq0KJalRPdT1GcqCC1evJPlVNNeTNm36",
    "auth.users_file": "/etc/edgeproxy/admin.htpasswd",
    "auth.realm": "Admin",
    "auth.keep_authorization": "true",
    "auth.url": "http://authelia:9091/api/authz/forward-auth",
    "auth.response_headers": "Remote-User,Remote-Groups,Remote-Email",
    "auth.request_headers": "Cookie,Authorization",
    "auth.timeout": "5s",
    "ip.allow": "10.0.0.0/8,192.168.0.0/16",
    "ip.deny": "192.168.1.13",
}
_SECTIONS = ("labels", "deploy.labels")


class _InputError(Exception):
    """A file that can't be read or isn't a compose file: exit 2."""


# --- YAML: compose reads YAML 1.2, so only true/false are booleans and 1:30 is a string ---------

class _Reset:
    """`!reset`: drop what earlier files said."""


@dataclass(frozen=True, slots=True)
class _Override:
    """`!override value`: replace what earlier files said instead of merging into it."""

    value: object


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans, no sexagesimal numbers, and compose's merge tags."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers
            if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int",
                           "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _construct_reset(loader: yaml.SafeLoader, node: yaml.Node) -> _Reset:
    return _Reset()


def _construct_override(loader: yaml.SafeLoader, node: yaml.Node) -> _Override:
    if isinstance(node, yaml.MappingNode):
        return _Override(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return _Override(loader.construct_sequence(node, deep=True))
    assert isinstance(node, yaml.ScalarNode)  # noqa: S101 - the only other kind of node
    return _Override(loader.construct_scalar(node))


_Loader.add_constructor("!reset", _construct_reset)
_Loader.add_constructor("!override", _construct_override)


def _load(path: str) -> object:
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except OSError as exc:
        raise _InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise _InputError(f"{path}: cannot read: not UTF-8 text ({exc.reason} at byte {exc.start})"
                          ) from None
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        problem = exc.problem or exc.context or "syntax error"
        context = ""
        if exc.context and exc.problem and exc.context_mark:
            context = f" ({exc.context} that starts at line {exc.context_mark.line + 1})"
        elif exc.context and exc.problem:
            context = f" ({exc.context})"
        raise _InputError(f"{where}: invalid YAML: {problem}{context}") from None
    except yaml.YAMLError as exc:
        raise _InputError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None


# --- merging several files the way `docker compose -f a -f b` does, for labels ----------------

@dataclass(frozen=True, slots=True)
class _Problem:
    file: str
    who: str  # "service api" or "services api, web"
    subject: str  # "label gateway.port='x'", or "" for what concerns the service as a whole
    reason: str
    fix: str
    services: frozenset[str]

    def lines(self) -> list[str]:
        subject = f"{self.subject}: " if self.subject else ""
        return [f"{self.file}: {self.who}: {subject}{self.reason}", "  fix: " + self.fix]


def _problem(file: str, service: str, subject: str, reason: str, fix: str) -> _Problem:
    return _Problem(file, f"service {service}", subject, reason, fix, frozenset((service,)))


@dataclass(slots=True)
class _Service:
    # section -> label -> (value as compose passes it to Docker, index of the file it came from)
    sections: dict[str, dict[str, tuple[str, int]]] = field(
        default_factory=lambda: {s: {} for s in _SECTIONS})
    networks: dict[str, None] = field(default_factory=dict)  # keys as written, in order
    network_mode: str | None = None


@dataclass(slots=True)
class _Network:
    """A top-level `networks:` entry: the name Compose gives it on containers."""

    name: str | None = None  # `name:`
    external: bool = False


@dataclass(slots=True)
class _Top:
    """What the files say beyond services: the project's name and its networks."""

    name: str | None = None
    networks: dict[str, _Network] = field(default_factory=dict)
    has_services: bool = False


def _merge_top(top: _Top, doc: dict[object, object]) -> None:
    name = doc.get("name")
    if isinstance(name, str | int) and not isinstance(name, bool):
        top.name = str(name)
    nets = doc.get("networks")
    if not isinstance(nets, dict):
        return
    for key, spec in nets.items():
        net = top.networks.setdefault(str(key), _Network())
        if not isinstance(spec, dict):
            continue
        if isinstance(spec.get("name"), str):
            net.name = spec["name"]
        external = spec.get("external")
        if isinstance(external, dict):  # the old form: external: {name: x}
            net.external = True
            if isinstance(external.get("name"), str):
                net.name = external["name"]
        elif isinstance(external, bool):
            net.external = external


def _merge_networks(service: _Service, spec: dict[object, object]) -> None:
    mode = spec.get("network_mode")
    if isinstance(mode, str):
        service.network_mode = mode
    nets = spec.get("networks")
    if isinstance(nets, _Reset | _Override):
        service.networks.clear()
        nets = nets.value if isinstance(nets, _Override) else None
    if isinstance(nets, list | dict):  # a list of keys, or keys with per-network options
        service.networks.update(dict.fromkeys(str(n) for n in nets))


def _label_value(value: object) -> str | None:
    """A YAML scalar -> the string compose would set (true -> 'true'); None for non-scalars."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e21 else repr(value)
    if isinstance(value, str):
        return value
    return None


def _label_dict(value: object) -> dict[str, str] | str:
    """A compose labels value (mapping or list of key=value) -> dict, or why it can't be one."""
    out: dict[str, str] = {}
    if isinstance(value, dict):
        for key, raw in value.items():
            text = _label_value(raw)
            if text is None:
                return f"the value of {key} must be a string, a number or true/false"
            out[str(key)] = text
        return out
    if isinstance(value, list):
        for item in value:
            text = _label_value(item)
            if text is None:
                return "a list of labels must hold key=value strings"
            key, _, val = text.partition("=")
            out[key] = val
        return out
    return "must be a mapping (key: value) or a list of key=value strings"


def _merge(services: dict[str, _Service], top: _Top, doc: object, index: int, path: str,
           problems: list[_Problem | str]) -> None:
    if doc is None:
        return
    if not isinstance(doc, dict):
        raise _InputError(f"{path}: not a compose file: the top level must be a mapping")
    _merge_top(top, doc)
    body = doc.get("services")
    if body is None:
        return
    if not isinstance(body, dict):
        raise _InputError(f"{path}: not a compose file: services must be a mapping")
    top.has_services = True
    for key, spec in body.items():
        name = str(key)
        if isinstance(spec, _Reset):
            services.pop(name, None)
            continue
        if isinstance(spec, _Override):
            services.pop(name, None)
            spec = spec.value
        service = services.setdefault(name, _Service())
        if spec is None:
            continue
        if not isinstance(spec, dict):
            problems.append(_problem(path, name, "", "must be a mapping",
                                     "write the service as a mapping with image, labels, ..."))
            continue
        _merge_networks(service, spec)
        deploy = spec.get("deploy")
        if isinstance(deploy, _Reset):
            service.sections["deploy.labels"].clear()
            deploy = None
        elif isinstance(deploy, _Override):
            service.sections["deploy.labels"].clear()
            deploy = deploy.value
        for section, value in (("labels", spec.get("labels")),
                               ("deploy.labels", deploy.get("labels")
                                if isinstance(deploy, dict) else None)):
            merged = service.sections[section]
            if isinstance(value, _Reset | _Override):
                merged.clear()
                value = value.value if isinstance(value, _Override) else None
            if value is None:
                continue
            labels = _label_dict(value)
            if isinstance(labels, str):
                problems.append(_problem(path, name, section, labels,
                                         f"write {section} as a mapping (gateway.path: /orders) "
                                         "or a list (- gateway.path=/orders)"))
                continue
            for label, text in labels.items():
                merged[label] = (text, index)


# --- compose variable interpolation -----------------------------------------------------------

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _interpolate(value: str) -> tuple[str, list[str]]:
    """Apply compose's ${VAR:-default} defaults; also return the variables we can't resolve."""
    out: list[str] = []
    missing: list[str] = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch != "$" or i + 1 == len(value):
            out.append(ch)
            i += 1
            continue
        nxt = value[i + 1]
        if nxt == "$":
            out.append("$")
            i += 2
            continue
        if nxt != "{":
            m = _NAME.match(value, i + 1)
            if m:
                missing.append("$" + m.group())
                out.append("$" + m.group())
                i = m.end()
            else:
                out.append("$")
                i += 1
            continue
        end = _closing_brace(value, i + 2)
        if end < 0:  # unterminated: left as written, the label check will say it's wrong
            out.append(value[i:])
            break
        inner = value[i + 2:end]
        m = _NAME.match(inner)
        op = inner[m.end():] if m else ""
        if m and op.startswith((":-", "-")):
            default, more = _interpolate(op[2:] if op.startswith(":-") else op[1:])
            out.append(default)
            missing += more
        else:
            missing.append(value[i:end + 1])
            out.append(value[i:end + 1])
        i = end + 1
    return "".join(out), missing


def _closing_brace(value: str, start: int) -> int:
    depth = 1
    for j in range(start, len(value)):
        if value.startswith("${", j):
            depth += 1
        elif value[j] == "}":
            depth -= 1
            if depth == 0:
                return j
    return -1


# --- checking one service's labels --------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Claim:
    """A routed label set: who asks for which route, and the last file that shaped it."""

    service: str
    section: str
    spec: RouteSpec
    file: int


def _accepts(key: str, value: str) -> bool:
    if key not in KEYS:
        return False
    try:
        KEYS[key](value)
    except ValueError:
        return False
    return True


def _expectation(key: str) -> str | None:
    try:
        KEYS[key]("")
    except ValueError as exc:
        return str(exc)
    return None


def _fix(err: LabelError, key: str, value: str | None, prefix: str) -> str:
    """A concrete next step for one LabelError."""
    label = err.label
    if key not in KEYS:
        close = re.search(r"did you mean '([^']+)'\?", err.reason)
        if close:
            return f"rename it to {prefix}.{close.group(1)}"
        return "remove it, or use a known key: " + ", ".join(f"{prefix}.{k}" for k in sorted(KEYS))
    if value is None:  # a label the service lacks
        if key in ("path", "host"):
            return (f"add {prefix}.path={_EXAMPLES['path']} or {prefix}.host={_EXAMPLES['host']}, "
                    f"or {prefix}.enable=false to leave the service unrouted")
        return f"add {label}={_EXAMPLES.get(key, '...')}"
    rewrite = re.search(r"'([^']*)' is not canonical; write '([^']*)'", err.reason)
    if rewrite:
        return f"write {label}={value.replace(rewrite.group(1), rewrite.group(2), 1)}"
    needs = re.match(r"needs (\S+)", err.reason)
    if needs:
        other = needs.group(1)
        return f"add {other}={_EXAMPLES.get(other[len(prefix) + 1:], '...')}, or remove {label}"
    if _accepts(key, value):  # fine alone, wrong with the service's other labels
        # "it must not be longer ..." reads; "it browsers refuse ..." does not.
        predicate = err.reason.split(" ", 1)[0] in ("must", "keys", "is", "cannot")
        return f"change {label}: {'it ' if predicate else ''}{err.reason}"
    example = f", e.g. {label}={_EXAMPLES[key]}" if key in _EXAMPLES else ""
    return f"{label} expects {_expectation(key) or err.reason}{example}"


@dataclass(slots=True)
class _Findings:
    """What the check found, in the order it is printed: problems and notes (plain lines)."""

    items: list[_Problem | str] = field(default_factory=list)
    claims: list[_Claim] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Routed:
    """A label set that routes its service: the network it asks for, if known here."""

    network: str | None
    network_known: bool  # False: the label needs a variable from the environment
    file: int  # the last file that shaped the labels


def _check_section(name: str, section: str, labels: dict[str, tuple[str, int]], paths: list[str],
                   prefix: str, found: _Findings) -> _Routed | None:
    """Check one label set of one service; what it asks for when it routes the service."""
    dotted = prefix + "."
    ours = {k: v for k, v in labels.items() if k.startswith(dotted)}
    if not ours:
        return None
    kind = "label" if section == "labels" else section
    values: dict[str, str] = {}
    unresolved: set[str] = set()
    for label, (raw, index) in ours.items():
        value, missing = _interpolate(raw)
        values[label] = value
        if missing:
            # Check the rest with a valid stand-in; the real value is known only at deploy time.
            unresolved.add(label)
            key = label[len(dotted):]
            if key in _EXAMPLES:
                values[label] = _EXAMPLES[key]
            else:
                del values[label]
            found.items.append(f"{paths[index]}: service {name}: note: {kind} {label}={raw!r} "
                               f"not checked: it needs {', '.join(missing)} from the environment")
    latest = max(index for _, index in ours.values())
    endpoint = f"{prefix}.swarm.endpoint"
    if section == "deploy.labels" and endpoint in values:
        # A Swarm provider's key, not a label the core parses (edgeproxy/control/providers/swarm.py).
        value = values.pop(endpoint)
        if value.strip().lower() not in ("vip", "tasks") and endpoint not in unresolved:
            found.items.append(_problem(paths[ours[endpoint][1]], name,
                                        f"{kind} {endpoint}={value!r}", "vip or tasks",
                                        f"{endpoint} expects vip or tasks, e.g. {endpoint}=vip"))
            return None
    try:
        result = parse_labels(values, prefix)
    except LabelsInvalid as exc:
        errors = [e for e in exc.errors if e.label not in unresolved and not (
            # a combination error may come from a stand-in value
            unresolved and e.label in ours and _accepts(e.label[len(dotted):], values[e.label]))]
        for err in errors:
            key = err.label[len(dotted):]
            given: str | None = None
            if err.label in ours:
                raw, index = ours[err.label]
                given = values[err.label]
                shown = repr(given) + (f" (from {raw!r})" if raw != given else "")
                subject = f"{kind} {err.label}={shown}"
            else:
                subject, index = f"{kind} {err.label}", latest
            reason = "unknown key" if key not in KEYS else err.reason
            found.items.append(_problem(paths[index], name, subject, reason,
                                           _fix(err, key, given, prefix)))
        return None if errors else _Routed(None, False, latest)
    if not isinstance(result, Routing):
        return None
    port = f"{prefix}.port"
    if section == "deploy.labels" and port not in ours:
        found.items.append(_problem(
            paths[latest], name, f"{kind} {port}", "missing: Swarm does no port detection, so "
            "the service is skipped without it",
            f"add {port} under deploy.labels, e.g. {port}=8080 (the port the service listens on)"))
        return None
    if not unresolved:
        found.claims.append(_Claim(name, section, result.spec, latest))
    return _Routed(result.network, f"{dotted}network" not in unresolved, latest)


# --- networks, as Compose names them on containers ------------------------------------------------

def project_name(flag: str | None, declared: str | None, first_file: str) -> str:
    """The Compose project name: -p, else COMPOSE_PROJECT_NAME, else `name:`, else the folder.

    The folder's name is normalised as Compose does: lower case, only a-z 0-9 _ -."""
    if flag:
        return flag
    env = os.environ.get("COMPOSE_PROJECT_NAME")
    if env:
        return env
    if declared:
        return declared
    folder = os.path.basename(os.path.dirname(os.path.abspath(first_file)))
    return re.sub(r"[^-_a-z0-9]", "", folder.lower()).lstrip("-_")


def _network_names(service: _Service, top: _Top, project: str) -> dict[str, str]:
    """The service's networks: key as written -> name on its containers."""
    out: dict[str, str] = {}
    for key in service.networks or {"default": None}:
        net = top.networks.get(key)
        if net is not None and net.name:
            out[key] = net.name
        elif net is not None and net.external:
            out[key] = key
        else:
            out[key] = f"{project}_{key}"
    return out


def _network_problem(name: str, service: _Service, routed: _Routed, top: _Top, project: str,
                     file: str, prefix: str) -> _Problem | None:
    """Why the proxy would find no network to reach the service's containers on, if it would."""
    label = f"{prefix}.network"
    mode = service.network_mode
    if mode in ("host", "none"):
        return _problem(file, name, "", f"network_mode: {mode} leaves its containers no address "
                        "on a network the proxy can reach; the proxy skips it",
                        "remove network_mode and put the service on a network the proxy shares")
    if mode is not None:
        return None  # service:/container:/bridge: decided outside this file
    names = _network_names(service, top, project)
    wanted = routed.network
    if wanted is not None:
        if not routed.network_known or wanted in names.values() \
                or f"{project}_{wanted}" in names.values():
            return None
        subject = f"label {label}={wanted!r}"
        if wanted in names:
            return _problem(file, name, subject, f"network {wanted!r} is named {names[wanted]!r} "
                            "on the containers (by its name: or external: in the file)",
                            f"write {label}={names[wanted]}")
        return _problem(file, name, subject, f"the service is not on network {wanted!r} "
                        f"(its networks: {', '.join(names)})",
                        f"add {wanted} to the service's networks, or write {label}= one of "
                        f"{', '.join(names)}")
    default = os.environ.get("EDGEPROXY_NETWORK")
    if len(names) > 1 and not (default and default in names.values()):
        return _problem(file, name, "", f"on several networks ({', '.join(names)}) and no "
                        f"{label} label: the proxy skips it",
                        f"add {label}= the one the proxy shares with it, e.g. "
                        f"{label}={next(iter(names))}")
    return None


def _deploy_only(name: str, service: _Service, paths: list[str], prefix: str) -> str | None:
    """A warning for gateway labels only under deploy.labels: plain Compose drops those."""
    dotted = prefix + "."
    plain = service.sections["labels"]
    swarm_only = f"{dotted}swarm.endpoint"  # a Swarm provider key: never one for containers
    missing = [(k, i) for k, (v, i) in service.sections["deploy.labels"].items()
               if k.startswith(dotted) and k != swarm_only and plain.get(k, ("", -1))[0] != v]
    if not missing:
        return None
    file = paths[max(i for _, i in missing)]
    return (f"{file}: service {name}: warning: deploy.labels {', '.join(k for k, _ in missing)} "
            "are not put on containers by `docker compose up` (only `docker stack deploy` reads "
            "deploy.labels, for Swarm services)\n  fix: give them under labels: as well")


def _conflicts(claims: list[_Claim], paths: list[str]) -> Iterator[_Problem]:
    """Services claiming one host + path with different settings: at runtime the first wins."""
    owners: dict[tuple[str | None, str], dict[RouteSpec, list[_Claim]]] = {}
    for claim in claims:
        for host in claim.spec.hosts or (None,):
            for path in claim.spec.paths:
                owners.setdefault((host, path), {}).setdefault(claim.spec, []).append(claim)
    clashes: dict[tuple[_Claim, ...], list[tuple[str | None, str]]] = {}
    for where, by_spec in owners.items():
        if len(by_spec) > 1:
            group = tuple(sorted((c for cs in by_spec.values() for c in cs), key=claims.index))
            clashes.setdefault(group, []).append(where)
    for group, wheres in clashes.items():
        names = ", ".join(dict.fromkeys(
            c.service if c.section == "labels" else f"{c.service} ({c.section})" for c in group))
        places = ", ".join(("path " if host is None else f"host {host} path ") + path
                           for host, path in wheres)
        yield _Problem(paths[max(c.file for c in group)], f"services {names}", "",
                       f"claim {places} with different settings; which one gets it depends on "
                       "which container is created first", "give one of them another path or host",
                       frozenset(c.service for c in group))


# --- the command ----------------------------------------------------------------------------------

def run_check(paths: list[str], *, label_prefix: str = "gateway", project: str | None = None,
              out: TextIO | None = None) -> int:
    """Check the gateway labels of the compose files `paths`, merged like `docker compose -f ...`.

    The files are read as the proxy will see their containers: network names carry the project
    prefix (`project`, else as Compose picks it), a service on several networks needs a network
    label, and deploy.labels are not on containers (a warning). Prints a header naming the
    files, one line per problem (`FILE: service NAME: label L='V': why`) each followed by a
    `  fix: ...` line, and a summary line. Returns 0 when there are no problems, 1 when there
    are, 2 when a file can't be read, isn't YAML or has no services (one line per file).
    """
    out = out if out is not None else sys.stdout
    if not paths:
        print("edgeproxy check: no compose files given", file=out)
        return 2
    docs: list[tuple[str, object]] = []
    failed = False
    for path in paths:
        try:
            docs.append((path, _load(path)))
        except _InputError as exc:
            print(exc, file=out)
            failed = True
    services: dict[str, _Service] = {}
    top = _Top()
    found = _Findings()
    if not failed:
        try:
            for index, (path, doc) in enumerate(docs):
                _merge(services, top, doc, index, path, found.items)
        except _InputError as exc:
            print(exc, file=out)
            failed = True
    if not failed and not services:
        # `ok: 0 routed` would pass a file that routes nothing: most likely not the right file.
        print(f"{', '.join(paths)}: not a compose file: no services "
              f"({'an empty services: mapping' if top.has_services else 'no services: key'})",
              file=out)
        failed = True
    if failed:
        return 2

    name_of_project = project_name(project, top.name, paths[0])
    routed = 0
    for name, service in services.items():
        plain = _check_section(name, "labels", service.sections["labels"], paths, label_prefix,
                               found)
        swarm = _check_section(name, "deploy.labels", service.sections["deploy.labels"], paths,
                               label_prefix, found)
        if swarm is not None or service.sections["deploy.labels"]:
            warning = _deploy_only(name, service, paths, label_prefix)
            if warning is not None:
                found.items.append(warning)
        if plain is None:
            continue
        problem = _network_problem(name, service, plain, top, name_of_project,
                                   paths[plain.file], label_prefix)
        if problem is not None:
            found.items.append(problem)
            continue
        routed += 1
    found.items += _conflicts(found.claims, paths)
    problems = [item for item in found.items if isinstance(item, _Problem)]

    if len(paths) == 1:
        print(f"checking {paths[0]}", file=out)
    else:
        print(f"checking {', '.join(paths)} (merged in this order)", file=out)
    for item in found.items:
        for line in item.lines() if isinstance(item, _Problem) else [item]:
            print(line, file=out)
    if problems:
        bad = set().union(*(p.services for p in problems))
        print(f"{len(problems)} problem(s) in {len(bad)} service(s)", file=out)
        return 1
    print(f"ok: {routed} service(s) routed, {len(services) - routed} not routed", file=out)
    return 0
