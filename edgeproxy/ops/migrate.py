"""`edgeproxy migrate`: Traefik labels and nginx-proxy variables in compose files -> gateway.* labels.

Pure: compose text in, compose text out. The output is the input file with the equivalent
`gateway.*` labels added to each service (beside the old ones, or instead of the ones carried
over with `replace`), and one `# edgeproxy migrate:` comment for every label or variable that
could not be carried over, saying why. Nothing is dropped silently, and a rule the labels
cannot express is reported, never approximated.
"""

from __future__ import annotations

import ipaddress
import json
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, TextIO

import yaml

from edgeproxy.routes.labels import parse_paths

COMMENT = "# edgeproxy migrate:"
# Compose writes a literal `$` as `$$`; inside the migrator a literal `$` is this character,
# so `${VAR}` interpolation and escaped dollars (bcrypt hashes, `$1` in a regex) stay apart.
_DOLLAR = "\x00"
# The entry points Traefik's documentation names for plain HTTP and HTTPS: edgeproxy serves
# every route on its HTTP listener and, when set, its HTTPS one; other names are reported.
_USUAL_ENTRYPOINTS = frozenset({"web", "websecure", "http", "https"})
# nginx-proxy's documented "internal" networks for NETWORK_ACCESS=internal.
_NGINX_INTERNAL = "127.0.0.0/8,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16"
_BCRYPT = re.compile(r"^\x002[aby]?\x00\d\d\x00")


class MigrateError(Exception):
    """A file that can't be read or isn't a compose file."""


@dataclass(frozen=True, slots=True)
class Dropped:
    """One label or variable that was not carried over, and why."""

    key: str
    value: str
    reason: str

    def line(self) -> str:
        """The comment line that reports it."""
        shown = _to_compose(self.value)
        if len(shown) > 120:
            shown = shown[:117] + "..."
        return f"{COMMENT} not carried over: {self.key}={shown}: {self.reason}"


@dataclass(slots=True)
class ServiceMigration:
    """What one service's labels and environment became."""

    labels: dict[str, str] = field(default_factory=dict)  # gateway key (no prefix) -> value
    carried: set[str] = field(default_factory=set)  # source keys fully carried over
    dropped: list[Dropped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # differences worth knowing, not losses


# --- Traefik rules ------------------------------------------------------------------------------

class RuleError(ValueError):
    """A router rule the gateway labels cannot express."""


_TOKEN = re.compile(r"\s*(?:(&&)|(\|\|)|(!)|(\()|(\))|(,)|`([^`]*)`|\"((?:[^\"\\]|\\.)*)\"|"
                    r"([A-Za-z][A-Za-z0-9]*))")


def _tokens(rule: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    rule = rule.rstrip()
    while pos < len(rule):
        m = _TOKEN.match(rule, pos)
        if not m:
            raise RuleError(f"cannot read the rule at {rule[pos:pos + 20]!r}")
        pos = m.end()
        kinds = ("and", "or", "not", "(", ")", ",", "str", "str", "name")
        for kind, text in zip(kinds, m.groups(), strict=True):
            if text is not None:
                out.append((kind, text))
                break
    return out


class _RuleParser:
    """Rule -> disjunctive normal form: a list of conjunctions of (matcher, arguments)."""

    def __init__(self, rule: str) -> None:
        self.toks = _tokens(rule)
        self.pos = 0

    def parse(self) -> list[list[tuple[str, tuple[str, ...]]]]:
        if not self.toks:
            raise RuleError("the rule is empty")
        dnf = self._or()
        if self.pos != len(self.toks):
            raise RuleError(f"unexpected {self.toks[self.pos][1]!r} in the rule")
        return dnf

    def _peek(self) -> str | None:
        return self.toks[self.pos][0] if self.pos < len(self.toks) else None

    def _take(self, kind: str) -> str:
        if self._peek() != kind:
            raise RuleError(f"expected {kind!r} in the rule")
        self.pos += 1
        return self.toks[self.pos - 1][1]

    def _or(self) -> list[list[tuple[str, tuple[str, ...]]]]:
        out = self._and()
        while self._peek() == "or":
            self.pos += 1
            out = out + self._and()
        return out

    def _and(self) -> list[list[tuple[str, tuple[str, ...]]]]:
        out = self._unary()
        while self._peek() == "and":
            self.pos += 1
            right = self._unary()
            out = [a + b for a in out for b in right]
        return out

    def _unary(self) -> list[list[tuple[str, tuple[str, ...]]]]:
        kind = self._peek()
        if kind == "not":
            raise RuleError("negation (!) has no gateway label")
        if kind == "(":
            self.pos += 1
            inner = self._or()
            self._take(")")
            return inner
        name = self._take("name")
        self._take("(")
        args: list[str] = []
        while self._peek() != ")":
            args.append(self._take("str"))
            if self._peek() == ",":
                self.pos += 1
        self._take(")")
        return [[(name.lower(), tuple(args))]]


def rule_routes(rule: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A Traefik v2/v3 rule -> (hosts, path prefixes); empty means any. RuleError when the rule
    asks for something gateway.host x gateway.path cannot say."""
    pairs: set[tuple[str | None, str | None]] = set()
    for conj in _RuleParser(rule).parse():
        hosts: set[str] | None = None
        paths: set[str] | None = None
        for name, args in conj:
            if not args:
                raise RuleError(f"{name} without arguments")
            if name == "host":
                alts = {a.lower().rstrip(".") for a in args}
                hosts = alts if hosts is None else hosts & alts
            elif name == "pathprefix":
                alts = {_prefix(a) for a in args}
                paths = alts if paths is None else paths & alts
            else:
                raise RuleError(f"{_MATCHER_NAMES.get(name, name)}(...) has no gateway label "
                                "(edgeproxy routes by host and path prefix only)")
            if hosts == set() or paths == set():
                raise RuleError("two Host or PathPrefix matchers joined by && that never "
                                "match together")
        for h in sorted(hosts) if hosts is not None else [None]:
            for p in sorted(paths) if paths is not None else [None]:
                pairs.add((h, p))
    host_set = {h for h, _ in pairs}
    path_set = {p for _, p in pairs}
    if (None in host_set and len(host_set) > 1) or (None in path_set and len(path_set) > 1) or (
            len(pairs) != len(host_set) * len(path_set)):
        raise RuleError("it matches host/path combinations that are not every listed host with "
                        "every listed path (gateway.host and gateway.path combine each host "
                        "with each path); split it across services")
    hosts_out = tuple(sorted(h for h in host_set if h is not None))
    paths_out = tuple(sorted(p for p in path_set if p is not None))
    return hosts_out, paths_out


_MATCHER_NAMES = {"path": "Path", "pathregexp": "PathRegexp", "hostregexp": "HostRegexp",
                  "headers": "Headers", "header": "Header", "headersregexp": "HeadersRegexp",
                  "headerregexp": "HeaderRegexp", "method": "Method", "query": "Query",
                  "queryregexp": "QueryRegexp", "clientip": "ClientIP", "hostheader": "HostHeader"}


def _prefix(arg: str) -> str:
    if "{" in arg:
        raise RuleError(f"PathPrefix(`{arg}`) holds a regular expression")
    value = arg.rstrip("/") or "/"
    try:
        return parse_paths(value)[0]
    except ValueError as exc:
        raise RuleError(f"PathPrefix(`{arg}`): {exc}") from None


# --- Traefik labels -----------------------------------------------------------------------------

@dataclass(slots=True)
class Middleware:
    """One middleware defined by labels: its type, options (lower-case keys) and source keys."""

    name: str
    kind: str
    options: dict[str, str] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # option -> the label as written
    service: str = ""


def middleware_definitions(labels: Mapping[str, str], service: str = "") -> dict[str, Middleware]:
    """The middlewares a container's labels define (`traefik.http.middlewares.<name>.<type>...`)."""
    out: dict[str, Middleware] = {}
    for key, value in labels.items():
        parts = key.split(".")
        if len(parts) < 5 or [p.lower() for p in parts[:3]] != ["traefik", "http", "middlewares"]:
            continue
        name, kind = parts[3], parts[4].lower()
        mw = out.setdefault(name, Middleware(name, kind, service=service))
        option = ".".join(parts[5:])
        lowered = option.lower()
        # Header names keep their case: they become gateway.request.headers.<Name>.
        for family in ("customrequestheaders.", "customresponseheaders."):
            if lowered.startswith(family):
                lowered = family + option[len(family):]
        mw.options[lowered] = value
        mw.keys[lowered] = key
    return out


@dataclass(slots=True)
class _Router:
    name: str
    options: dict[str, str] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class _Route:
    """What one router became."""

    router: _Router
    hosts: tuple[str, ...]
    paths: tuple[str, ...]
    labels: dict[str, str]
    carried: set[str]
    dropped: list[Dropped]
    notes: list[str]
    redirect_only: bool
    tls: bool
    fail_closed: bool = False


def _split(value: str) -> list[str]:
    return [p.strip() for p in value.split(",") if p.strip()]


def _traefik_duration(value: str) -> float | None:
    """A Go duration (`1s`, `500ms`, `1m30s`) or bare seconds -> seconds, or None."""
    v = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", v):
        return float(v)
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", v)
    if not parts or "".join(n + u for n, u in parts) != v:
        return None
    return sum(float(n) * units[u] for n, u in parts)


def _seconds_label(seconds: float) -> str:
    if seconds >= 1 and seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


class _MiddlewareMapper:
    """Maps one router's middlewares onto gateway keys, reporting what has no equivalent."""

    # Middlewares that decide who gets in: if one cannot be carried whole, the migrated route
    # is disabled rather than exposed without it.
    ACCESS = frozenset({"basicauth", "digestauth", "forwardauth", "ipallowlist", "ipwhitelist"})

    def __init__(self, route: _Route, defined: Mapping[str, Middleware],
                 used: set[str]) -> None:
        self.route = route
        self.defined = defined
        self.used = used
        self.path_order: list[tuple[int, str]] = []

    def drop(self, mw: Middleware, option: str, reason: str) -> None:
        key = mw.keys.get(option, f"traefik.http.middlewares.{mw.name}.{mw.kind}"
                          + (f".{option}" if option else ""))
        self.route.dropped.append(Dropped(key, mw.options.get(option, ""), reason))
        if mw.kind in self.ACCESS:
            self.route.fail_closed = True

    def apply(self, references: list[str], depth: int = 0) -> None:
        for ref in references:
            name, _, provider = ref.partition("@")
            mw = self.defined.get(name)
            if (provider and provider.lower() != "docker") or mw is None:
                where = (f"defined by the {provider} provider" if provider and
                         provider.lower() != "docker" else "not defined in these files")
                self.route.dropped.append(Dropped(
                    self.route.router.keys["middlewares"], ref,
                    f"middleware {ref!r} is {where}; migrate it by hand (unknown middlewares "
                    "may be access control, so the route is disabled until then)"))
                self.route.fail_closed = True
                continue
            self.used.add(name)
            if mw.kind == "chain" and depth < 5:
                self.route.carried.update(mw.keys.values())
                self.apply(_split(mw.options.get("middlewares", "")), depth + 1)
                continue
            handler = getattr(self, "_" + mw.kind, None)
            if handler is None:
                access = mw.kind in self.ACCESS or mw.kind == "plugin"
                for option in mw.options or {"": ""}:
                    self.drop(mw, option, f"the {mw.kind} middleware has no edgeproxy equivalent"
                              + ("; the route is disabled rather than exposed without it"
                                 if access else ""))
                if access:
                    self.route.fail_closed = True
                continue
            before = len(self.route.dropped)
            handler(mw)
            dropped_keys = {d.key for d in self.route.dropped[before:]}
            self.route.carried.update(k for k in mw.keys.values() if k not in dropped_keys)
        if depth == 0:
            ranks = [rank for rank, _ in self.path_order]
            if ranks != sorted(ranks):
                order = " then ".join(kind for _, kind in self.path_order)
                self.route.notes.append(
                    f"router {self.route.router.name} applies {order}; edgeproxy always strips "
                    "the prefix, then rewrites, then adds a prefix: check the forwarded paths")

    def _set(self, key: str, value: str) -> None:
        self.route.labels[key] = value

    def _unknown(self, mw: Middleware, known: Iterable[str]) -> None:
        for option in mw.options:
            if option not in known and not any(option.startswith(k + ".") for k in known):
                self.drop(mw, option, f"{mw.kind} option {option!r} has no edgeproxy equivalent")

    def _stripprefix(self, mw: Middleware) -> None:
        self.path_order.append((0, "stripprefix"))
        prefixes = {p.rstrip("/") or "/" for p in _split(mw.options.get("prefixes", ""))}
        paths = set(self.route.paths)
        if not paths or paths == {"/"}:
            self.drop(mw, "prefixes", "the route has no PathPrefix to strip (gateway.strip_prefix "
                      "removes the matched gateway.path)")
        elif not paths <= prefixes:
            self.drop(mw, "prefixes", f"strips {', '.join(sorted(prefixes))} but the route matches "
                      f"{', '.join(sorted(paths))}; gateway.strip_prefix removes exactly the "
                      "matched prefix")
        else:
            self._set("strip_prefix", "true")
        self._unknown(mw, {"prefixes", "forceslash"})

    def _addprefix(self, mw: Middleware) -> None:
        self.path_order.append((2, "addprefix"))
        prefix = mw.options.get("prefix", "").rstrip("/")
        if prefix.startswith("/"):
            self._set("add_prefix", prefix)
        elif "prefix" in mw.options:
            self.drop(mw, "prefix", "the prefix must start with '/'")
        self._unknown(mw, {"prefix"})

    def _replacepathregex(self, mw: Middleware) -> None:
        self.path_order.append((1, "replacepathregex"))
        regex = mw.options.get("regex", "")
        replacement = mw.options.get("replacement", "")
        # Go's $1 / ${1} (written $$1 in compose) -> Python's \1; a literal $ stays literal.
        py = re.sub(_DOLLAR + r"\{?(\d+)\}?", r"\\\1", replacement)
        if _DOLLAR in py or _DOLLAR + "{" in replacement:
            self.drop(mw, "replacement", "named groups in the replacement have no equivalent")
        elif not py.startswith("/"):
            self.drop(mw, "replacement", "gateway.rewrite needs a replacement starting with '/'")
        elif not regex:
            self.drop(mw, "replacement", "no regex given")
        else:
            self._set("rewrite", f"{regex} => {py}")
        self._unknown(mw, {"regex", "replacement"})

    def _replacepath(self, mw: Middleware) -> None:
        self.path_order.append((1, "replacepath"))
        path = mw.options.get("path", "")
        if path.startswith("/"):
            self._set("rewrite", f"^.*{_DOLLAR} => {path}")
        else:
            self.drop(mw, "path", "gateway.rewrite needs a path starting with '/'")
        self._unknown(mw, {"path"})

    _HEADER_FLAGS: ClassVar[dict[str, tuple[str, str]]] = {"framedeny": ("X-Frame-Options", "DENY"),
                     "contenttypenosniff": ("X-Content-Type-Options", "nosniff"),
                     "browserxssfilter": ("X-XSS-Protection", "1; mode=block")}
    _HEADER_VALUES: ClassVar[dict[str, str]] = {"customframeoptionsvalue": "X-Frame-Options",
                      "contentsecuritypolicy": "Content-Security-Policy",
                      "referrerpolicy": "Referrer-Policy",
                      "permissionspolicy": "Permissions-Policy"}
    _CORS: ClassVar[dict[str, str]] = {"accesscontrolalloworiginlist": "cors.origins",
             "accesscontrolallowmethods": "cors.methods",
             "accesscontrolallowheaders": "cors.headers",
             "accesscontrolexposeheaders": "cors.expose",
             "accesscontrolallowcredentials": "cors.credentials",
             "accesscontrolmaxage": "cors.max_age"}

    def _headers(self, mw: Middleware) -> None:
        for option, value in mw.options.items():
            family, dot, name = option.partition(".")
            if dot and family == "customrequestheaders":
                self._set(f"request.headers.{name}", value)
            elif dot and family == "customresponseheaders":
                self._set(f"response.headers.{name}", value)
            elif option in self._CORS:
                self._set(self._CORS[option], value)
            elif option in self._HEADER_FLAGS:
                if value.strip().lower() == "true":
                    header, text = self._HEADER_FLAGS[option]
                    self.route.labels.setdefault(f"response.headers.{header}", text)
            elif option in self._HEADER_VALUES:
                self._set(f"response.headers.{self._HEADER_VALUES[option]}", value)
            elif option == "stsseconds":
                if not self.route.tls:
                    self.drop(mw, option, "gateway.tls.hsts needs gateway.tls; this router has "
                              "no tls")
                elif value.strip().isdigit() and int(value) > 0:
                    self._set("tls.hsts", value.strip())
            elif option == "stsincludesubdomains":
                if value.strip().lower() == "true" and self.route.tls:
                    self._set("tls.hsts.subdomains", "true")
                elif value.strip().lower() == "true":
                    self.drop(mw, option, "gateway.tls.hsts.subdomains needs gateway.tls")
            else:
                self.drop(mw, option, f"headers option {option!r} has no edgeproxy equivalent")

    def _ratelimit(self, mw: Middleware) -> None:
        average = mw.options.get("average", "0").strip()
        period = _traefik_duration(mw.options.get("period", "1s"))
        burst = mw.options.get("burst", "1").strip()  # Traefik's default burst is 1
        if not average.isdigit() or not burst.isdigit():
            self.drop(mw, "average", "average and burst must be whole numbers")
            return
        if int(average) == 0:
            self.drop(mw, "average", "average=0 means no limit in Traefik: nothing to carry over")
            return
        if period is None or period <= 0:
            self.drop(mw, "period", "not a duration such as 1s or 1m")
            return
        for unit, seconds in (("s", 1), ("m", 60), ("h", 3600)):
            per_unit = int(average) * seconds / period
            if per_unit >= 1 and abs(per_unit - round(per_unit)) < 1e-9:
                self._set("ratelimit", f"{round(per_unit)}/{unit};burst={max(int(burst), 1)}")
                break
        else:
            self.drop(mw, "period", f"{average} per {mw.options.get('period')} is not a whole "
                      "number of requests per second, minute or hour")
        header = mw.options.get("sourcecriterion.requestheadername")
        if header:
            self._set("ratelimit.key", f"header:{header.strip()}")
        self._unknown(mw, {"average", "period", "burst", "sourcecriterion.requestheadername"})

    def _basicauth(self, mw: Middleware) -> None:
        self._set("auth", "basic")
        kept: list[str] = []
        for entry in _split(mw.options.get("users", "")):
            user, _, hash_ = entry.partition(":")
            if _BCRYPT.match(hash_):
                kept.append(entry)
                continue
            kind = ("an MD5 (apr1)" if hash_.startswith(f"{_DOLLAR}apr1{_DOLLAR}") else
                    "a SHA1" if hash_.startswith("{SHA}") else "a non-bcrypt")
            self.route.dropped.append(Dropped(
                mw.keys["users"], entry,
                f"user {user!r} has {kind} hash; edgeproxy accepts bcrypt only: make one with "
                f"`htpasswd -nbB {user} 'PASSWORD'` (double every $ in a compose file)"))
        if kept:
            self._set("auth.users", ",".join(kept))
        users_file = mw.options.get("usersfile", "").strip()
        if users_file:
            self._set("auth.users_file", users_file)
            self.route.notes.append(f"router {self.route.router.name}: {users_file} was a path "
                                    "in Traefik's container: mount it into edgeproxy's (bcrypt "
                                    "entries only)")
        if not kept and not users_file:
            self.route.fail_closed = True
            if "users" not in mw.options:
                self.drop(mw, "", "no users")
            else:
                self.route.notes.append(f"router {self.route.router.name}: no bcrypt user left; "
                                        "the route is disabled until gateway.auth.users is set")
        realm = mw.options.get("realm", "").strip()
        if realm:
            self._set("auth.realm", realm)
        # Traefik forwards the Authorization header unless removeHeader=true; edgeproxy
        # removes it unless told to keep it.
        if mw.options.get("removeheader", "false").strip().lower() != "true":
            self._set("auth.keep_authorization", "true")
            self.route.notes.append(f"router {self.route.router.name}: the replica keeps "
                                    "getting the client's Authorization header, as with Traefik; "
                                    "drop gateway.auth.keep_authorization if it does not read it")
        self._unknown(mw, {"users", "usersfile", "realm", "removeheader"})

    def _forwardauth(self, mw: Middleware) -> None:
        address = mw.options.get("address", "").strip()
        if not address:
            self.drop(mw, "", "forwardauth without an address")
            return
        self._set("auth", "forward")
        self._set("auth.url", address)
        for option, key in (("authresponseheaders", "auth.response_headers"),
                            ("authrequestheaders", "auth.request_headers")):
            headers = mw.options.get(option)
            if headers:
                self._set(key, ",".join(_split(headers)))
        for option in mw.options:
            if option not in ("address", "authresponseheaders", "authrequestheaders"):
                # Not access-deciding: the check itself is carried over.
                key = mw.keys[option]
                self.route.dropped.append(Dropped(key, mw.options[option],
                                                  f"forwardauth option {option!r} has no "
                                                  "edgeproxy equivalent"))

    def _ipallowlist(self, mw: Middleware) -> None:
        nets: list[str] = []
        for part in _split(mw.options.get("sourcerange", "")):
            try:
                nets.append(str(ipaddress.ip_network(part, strict=False)))
            except ValueError:
                self.drop(mw, "sourcerange", f"{part!r} is not an address or CIDR range")
                return
        if not nets:
            self.drop(mw, "sourcerange", "no source range")
            return
        self._set("ip.allow", ",".join(nets))
        for option in mw.options:
            if option.startswith("ipstrategy"):
                self.route.dropped.append(Dropped(
                    mw.keys[option], mw.options[option],
                    "edgeproxy takes the client address from EDGEPROXY_TRUSTED_PROXIES, not per "
                    "route"))
            elif option != "sourcerange":
                self.drop(mw, option, f"{mw.kind} option {option!r} has no edgeproxy equivalent")

    _ipwhitelist = _ipallowlist

    def _redirectscheme(self, mw: Middleware) -> None:
        scheme = mw.options.get("scheme", "").strip().lower()
        if scheme != "https":
            self.drop(mw, "scheme", "edgeproxy redirects plain HTTP to https only")
            return
        self._set("tls.redirect", "true")
        port = mw.options.get("port", "").strip()
        if port and port != "443":
            self.drop(mw, "port", "the redirect port is proxy-wide: EDGEPROXY_TLS_REDIRECT_PORT")
        if mw.options.get("permanent", "").strip().lower() == "false":
            self.drop(mw, "permanent", "edgeproxy's redirect is always permanent (308)")
        self._unknown(mw, {"scheme", "port", "permanent"})

    def _compress(self, mw: Middleware) -> None:
        self._set("compress", "true")
        for option in mw.options:
            if option:
                self.drop(mw, option, "edgeproxy compresses text, JSON, JS, XML and SVG with "
                          "gzip; compress options have no equivalent")

    def _retry(self, mw: Middleware) -> None:
        attempts = mw.options.get("attempts", "").strip()
        if not attempts.isdigit() or int(attempts) < 1:
            self.drop(mw, "attempts", "a whole number of attempts, at least 1")
        else:
            # Traefik counts every try; gateway.retries counts the extra ones (0-10).
            self._set("retries", str(min(int(attempts) - 1, 10)))
            if int(attempts) - 1 > 10:
                self.drop(mw, "attempts", "gateway.retries is at most 10")
        if "initialinterval" in mw.options:
            self.drop(mw, "initialinterval", "edgeproxy retries at once, on another replica")
        self._unknown(mw, {"attempts", "initialinterval"})

    def _buffering(self, mw: Middleware) -> None:
        size = mw.options.get("maxrequestbodybytes", "").strip()
        if size.isdigit():
            self._set("max_body", size)
        self._unknown(mw, {"maxrequestbodybytes"})


def _service_labels(options: Mapping[str, str], keys: Mapping[str, str],
                    dropped: list[Dropped]) -> dict[str, str]:
    out: dict[str, str] = {}
    for option, value in options.items():
        v = value.strip()
        if option == "loadbalancer.server.port":
            out["port"] = v
        elif option == "loadbalancer.server.scheme":
            if v.lower() in ("http", "https"):
                out["scheme"] = v.lower()
            else:
                dropped.append(Dropped(keys[option], value, "edgeproxy reaches replicas over "
                                       "http or https (no h2c)"))
        elif option == "loadbalancer.passhostheader":
            if v.lower() != "true":
                dropped.append(Dropped(keys[option], value, "edgeproxy always passes the "
                                       "client's Host"))
        elif option == "loadbalancer.healthcheck.path":
            out["health.path"] = v
        elif option in ("loadbalancer.healthcheck.interval", "loadbalancer.healthcheck.timeout"):
            seconds = _traefik_duration(v)
            if seconds is None or seconds <= 0:
                dropped.append(Dropped(keys[option], value, "not a duration such as 10s"))
            else:
                out["health." + option.rpartition(".")[2]] = _seconds_label(seconds)
        else:
            dropped.append(Dropped(keys[option], value,
                                   f"service option {option!r} has no edgeproxy equivalent"))
    if ("health.interval" in out or "health.timeout" in out) and "health.path" not in out:
        for k in ("health.interval", "health.timeout"):
            out.pop(k, None)
    return out


def migrate_traefik(labels: Mapping[str, str], middlewares: Mapping[str, Middleware],
                    used: set[str]) -> ServiceMigration:
    """One container's `traefik.*` labels -> gateway keys, reports and notes.

    `middlewares` are every middleware the files define (Traefik shares them across
    containers); the names this container's routers use are added to `used`."""
    result = ServiceMigration()
    routers: dict[str, _Router] = {}
    services: dict[str, tuple[dict[str, str], dict[str, str]]] = {}
    enable: str | None = None
    for key, value in labels.items():
        parts = key.split(".")
        low = [p.lower() for p in parts]
        if low[0] != "traefik":
            continue
        if low == ["traefik", "enable"]:
            enable = value.strip().lower()
            result.carried.add(key)
        elif low == ["traefik", "docker", "network"]:
            result.labels["network"] = value.strip()
            result.carried.add(key)
        elif len(parts) >= 5 and low[1:3] == ["http", "routers"]:
            router = routers.setdefault(parts[3], _Router(parts[3]))
            option = ".".join(low[4:])
            router.options[option] = value
            router.keys[option] = key
        elif len(parts) >= 5 and low[1:3] == ["http", "services"]:
            opts, keys = services.setdefault(parts[3], ({}, {}))
            option = ".".join(low[4:])
            opts[option] = value
            keys[option] = key
        elif len(parts) >= 4 and low[1:3] == ["http", "middlewares"]:
            pass  # definitions: carried where a router uses them (see migrate_files)
        elif len(parts) >= 2 and low[1] in ("tcp", "udp"):
            result.dropped.append(Dropped(key, value, f"edgeproxy proxies HTTP only; no "
                                          f"{low[1].upper()} routers"))
        else:
            result.dropped.append(Dropped(key, value, "no edgeproxy equivalent"))

    if enable == "false":
        result.labels["enable"] = "false"
    elif enable == "true":
        result.labels["enable"] = "true"

    routes: list[_Route] = []
    for router in sorted(routers.values(), key=lambda r: r.name):
        route = _route(router, services, middlewares, used)
        if isinstance(route, _Route):
            routes.append(route)
        else:
            result.dropped += route
    used_services: set[str] = set()
    for router in routers.values():
        used_services.add(router.options.get("service", "").partition("@")[0]
                          or (next(iter(services)) if len(services) == 1 else ""))

    if not routes:
        # Nothing to route: every label read is reported, none is carried.
        for key in sorted(result.carried):
            result.dropped.append(Dropped(key, labels[key], "no router here could be carried "
                                          "over, so there is no route for it"))
        result.carried.clear()
        result.labels.clear()
        for opts, keys in services.values():
            for option, value in opts.items():
                result.dropped.append(Dropped(keys[option], value, "no router with a rule that "
                                              "edgeproxy can express uses this service"))
        if not routers and enable == "true":
            result.dropped.append(Dropped("traefik.enable", "true", "no router rule: Traefik's "
                                          "default rule (Host(`<container name>`)) is not known "
                                          "here; set gateway.host or gateway.path"))
        return result

    primary = next((r for r in routes if r.tls and not r.redirect_only), None) or next(
        (r for r in routes if not r.redirect_only), routes[0])
    merged_hosts = set(primary.hosts)
    merged_paths = set(primary.paths)
    # Every (host, path) pair the merged routers match; the labels can say it only when it
    # is every host with every path.
    merged_pairs: set[tuple[str | None, str | None]] = {
        (h, p) for h in primary.hosts or (None,) for p in primary.paths or (None,)}
    result.labels.update(primary.labels)
    result.carried |= primary.carried
    result.dropped += primary.dropped
    result.notes += primary.notes
    fail_closed = primary.fail_closed
    plain_twin = False
    for route in routes:
        if route is primary:
            continue
        same_pairs = set(route.hosts) == set(primary.hosts) and set(route.paths) == set(
            primary.paths)
        settings = {k: v for k, v in route.labels.items() if k not in ("tls", "tls.redirect")}
        base = {k: v for k, v in primary.labels.items() if k not in ("tls", "tls.redirect")}
        if route.redirect_only and primary.tls and same_pairs:
            result.carried |= route.carried  # the HTTP -> HTTPS twin: gateway.tls.redirect
            result.labels["tls.redirect"] = "true"
            result.dropped += route.dropped
            continue
        if not route.tls and primary.tls and same_pairs and settings == base and not (
                route.dropped):
            result.carried |= route.carried  # the same route served over plain HTTP too
            plain_twin = True
            continue
        hosts = merged_hosts | set(route.hosts)
        paths = merged_paths | set(route.paths)
        wanted = merged_pairs | {(h, p) for h in route.hosts or (None,)
                                 for p in route.paths or (None,)}
        product = len(wanted) == max(len(hosts), 1) * max(len(paths), 1)
        if route.tls == primary.tls and settings == base and product and not (
                (not hosts) != (not merged_hosts) or (not paths) != (not merged_paths)):
            merged_hosts, merged_paths, merged_pairs = hosts, paths, wanted
            result.carried |= route.carried
            result.dropped += route.dropped
            fail_closed = fail_closed or route.fail_closed
            continue
        for option, value in route.router.options.items():
            result.dropped.append(Dropped(
                route.router.keys[option], value,
                f"router {route.router.name} is a second route on this container (edgeproxy "
                f"gives a container one route: carried over is router {primary.router.name}); "
                "put it on its own service or in the routes file"))
    if plain_twin and "tls.redirect" not in result.labels:
        result.labels["tls.redirect"] = "false"
    if merged_hosts:
        result.labels["host"] = ",".join(sorted(merged_hosts))
    if merged_paths:
        result.labels["path"] = ",".join(sorted(merged_paths))
    if fail_closed:
        result.labels["enable"] = "false"
        result.notes.append("migrated with gateway.enable=false: access control on this route "
                            "could not be carried over whole; fix what the comments say, then "
                            "remove gateway.enable=false")
    for name, (opts, keys) in services.items():
        if name not in used_services:
            for option, value in opts.items():
                result.dropped.append(Dropped(keys[option], value,
                                              f"service {name} is used by no router here"))
    return result


def _route(router: _Router, services: Mapping[str, tuple[dict[str, str], dict[str, str]]],
           middlewares: Mapping[str, Middleware], used: set[str]) -> _Route | list[Dropped]:
    """One router -> its route, or why the router (all its labels) is not carried over."""
    opts = router.options

    def whole(reason: str) -> list[Dropped]:
        return [Dropped(router.keys[o], v, reason if o == "rule" or o == "service"
                        else f"router {router.name} is not carried over (see its rule)")
                for o, v in opts.items()]

    if "rule" not in opts:
        return [Dropped(router.keys[o], v, f"router {router.name} has no rule: Traefik's default "
                        "rule (Host(`<container name>`)) is not known here; set gateway.host")
                for o, v in opts.items()]
    rule_text = opts["rule"].replace(_DOLLAR, "$")
    try:
        hosts, paths = rule_routes(rule_text)
    except RuleError as exc:
        return whole(str(exc))
    route = _Route(router, hosts, paths, {}, {router.keys["rule"]}, [], [], False,
                   tls=False)
    service_name = opts.get("service", "")
    if service_name:
        name, _, provider = service_name.partition("@")
        if provider or name not in services:
            return whole("the service is not defined by this container's labels (api@internal "
                         "and other providers' services have no edgeproxy equivalent)")
        route.carried.add(router.keys["service"])
    elif len(services) > 1:
        return whole(f"router {router.name} names no service and the container defines several")
    else:
        name = next(iter(services), "")
    if name in services:
        svc_opts, svc_keys = services[name]
        svc_dropped: list[Dropped] = []
        route.labels.update(_service_labels(svc_opts, svc_keys, svc_dropped))
        route.dropped += svc_dropped
        route.carried.update(k for k in svc_keys.values()
                             if k not in {d.key for d in svc_dropped})
    for option, value in opts.items():
        key = router.keys[option]
        v = value.strip()
        if option in ("rule", "service", "middlewares", "rulesyntax"):
            if option == "rulesyntax":
                route.carried.add(key)
            continue
        if option == "entrypoints":
            names = set(_split(v))
            if names <= _USUAL_ENTRYPOINTS:
                route.carried.add(key)
            else:
                route.dropped.append(Dropped(key, value, "edgeproxy serves every route on its "
                                             "HTTP listener (EDGEPROXY_LISTEN) and HTTPS listener "
                                             "(EDGEPROXY_TLS_LISTEN); no per-route entry points"))
            if names & {"websecure", "https"} and not any(o.startswith("tls") for o in opts):
                # TLS may come from the entry point's static configuration, not from labels.
                route.notes.append(f"router {router.name} is on entry point "
                                   f"{', '.join(sorted(names))} without tls labels: if Traefik's "
                                   "static configuration gives that entry point TLS, add "
                                   "gateway.tls=true or gateway.tls=acme")
        elif option == "tls":
            if v.lower() == "true":
                route.tls = True
                route.labels.setdefault("tls", "true")
            route.carried.add(key)
        elif option == "tls.certresolver":
            route.tls = True
            route.labels["tls"] = "acme"
            route.carried.add(key)
            route.notes.append(f"router {router.name}: certificate resolver {v!r} becomes "
                               "gateway.tls=acme (HTTP-01; the account and CA are "
                               "EDGEPROXY_ACME_* settings)")
        elif option == "priority":
            route.dropped.append(Dropped(key, value, "edgeproxy picks the longest path prefix "
                                         "(exact hosts before wildcards); no priorities"))
        else:
            route.dropped.append(Dropped(key, value,
                                         f"router option {option!r} has no edgeproxy equivalent"))
    references = _split(opts.get("middlewares", ""))
    if references:
        mapper = _MiddlewareMapper(route, middlewares, used)
        mapper.apply(references)
        route.carried.add(router.keys["middlewares"])
        kinds = {middlewares[name].kind if name in middlewares and provider.lower() in (
            "", "docker") else "?" for name, _, provider in (r.partition("@") for r in references)}
        route.redirect_only = kinds == {"redirectscheme"} and not route.tls
    if "tls.redirect" in route.labels and not route.tls and not route.redirect_only:
        route.dropped.append(Dropped(router.keys["middlewares"], opts["middlewares"],
                                     "a redirect to https needs gateway.tls on the route"))
        del route.labels["tls.redirect"]
    return route


# --- nginx-proxy environment --------------------------------------------------------------------

_NGINX_VARS = ("VIRTUAL_HOST", "VIRTUAL_PATH", "VIRTUAL_PORT", "VIRTUAL_PROTO", "VIRTUAL_DEST",
               "VIRTUAL_HOST_MULTIPORTS", "VIRTUAL_ROOT", "LETSENCRYPT_HOST", "LETSENCRYPT_EMAIL",
               "HTTPS_METHOD", "HSTS", "CERT_NAME", "NETWORK_ACCESS", "SSL_POLICY")


_NGINX_LABELS = ("com.github.nginx-proxy.", "com.github.jrcs.letsencrypt_nginx_proxy_companion.")


def migrate_nginx_proxy(env: Mapping[str, str],
                        labels: Mapping[str, str] | None = None) -> ServiceMigration:
    """One container's nginx-proxy variables (VIRTUAL_HOST, ...) -> gateway keys and reports;
    nginx-proxy's own labels (com.github.nginx-proxy.*) are reported, having no equivalent."""
    result = ServiceMigration()
    for key, value in (labels or {}).items():
        if key.startswith(_NGINX_LABELS):
            result.dropped.append(Dropped(key, value, "nginx-proxy configuration has no "
                                          "edgeproxy equivalent (gateway.lb picks round_robin "
                                          "or least_conn)"))
    mine = {k: v for k, v in env.items() if k in _NGINX_VARS}
    if not mine:
        return result
    if "VIRTUAL_HOST" not in mine:
        for k, v in mine.items():
            result.dropped.append(Dropped(k, v, "nginx-proxy routes only containers with "
                                          "VIRTUAL_HOST"))
        return result

    def take(k: str) -> None:
        result.carried.add(k)

    hosts = _split(mine["VIRTUAL_HOST"])
    bad = [h for h in hosts if h.startswith("~") or h.endswith(".*")]
    if bad or not hosts:
        result.dropped.append(Dropped("VIRTUAL_HOST", mine["VIRTUAL_HOST"],
                                      "regular expressions and trailing wildcards (foo.*) have "
                                      "no gateway.host equivalent" if bad else "empty"))
        for k, v in mine.items():
            if k != "VIRTUAL_HOST":
                result.dropped.append(Dropped(k, v, "its VIRTUAL_HOST was not carried over"))
        return result
    result.labels["host"] = ",".join(h.lower() for h in hosts)
    take("VIRTUAL_HOST")
    path = mine.get("VIRTUAL_PATH", "").strip()
    if path:
        if path.startswith("~"):
            result.dropped.append(Dropped("VIRTUAL_PATH", path, "a regular-expression location "
                                          "has no gateway.path equivalent"))
            result.labels["enable"] = "false"
            result.notes.append("migrated with gateway.enable=false: without its VIRTUAL_PATH "
                                "the route would claim every path of its host")
        else:
            try:
                result.labels["path"] = parse_paths(path.rstrip("/") or "/")[0]
                take("VIRTUAL_PATH")
            except ValueError as exc:
                result.dropped.append(Dropped("VIRTUAL_PATH", path, str(exc)))
    if "VIRTUAL_DEST" in mine:
        dest = mine["VIRTUAL_DEST"].strip()
        if not dest:
            take("VIRTUAL_DEST")
        elif "path" in result.labels and dest.startswith("/"):
            result.labels["strip_prefix"] = "true"
            if dest.rstrip("/"):
                result.labels["add_prefix"] = dest.rstrip("/")
            take("VIRTUAL_DEST")
        else:
            result.dropped.append(Dropped("VIRTUAL_DEST", dest, "needs a VIRTUAL_PATH carried "
                                          "over and a path starting with '/'"))
    if "VIRTUAL_PORT" in mine:
        result.labels["port"] = mine["VIRTUAL_PORT"].strip()
        take("VIRTUAL_PORT")
    proto = mine.get("VIRTUAL_PROTO", "").strip().lower()
    if proto in ("", "http"):
        if "VIRTUAL_PROTO" in mine:
            take("VIRTUAL_PROTO")
    elif proto == "https":
        result.labels["scheme"] = "https"
        # nginx does not verify upstream certificates unless told to (proxy_ssl_verify off).
        result.labels["tls.verify"] = "false"
        result.notes.append("VIRTUAL_PROTO=https: nginx does not verify the replica's "
                            "certificate, so neither does the migrated route "
                            "(gateway.tls.verify=false); set gateway.tls.ca to verify it")
        take("VIRTUAL_PROTO")
    else:
        result.dropped.append(Dropped("VIRTUAL_PROTO", proto, "edgeproxy speaks HTTP and HTTPS "
                                      "to replicas (no uwsgi, fastcgi or grpc)"))
        result.labels["enable"] = "false"
        result.notes.append("migrated with gateway.enable=false: edgeproxy cannot speak "
                            f"{proto} to this replica")
    le_hosts = _split(mine.get("LETSENCRYPT_HOST", ""))
    if le_hosts:
        if {h.lower() for h in le_hosts} <= set(result.labels["host"].split(",")):
            result.labels["tls"] = "acme"
            take("LETSENCRYPT_HOST")
        else:
            result.dropped.append(Dropped("LETSENCRYPT_HOST", mine["LETSENCRYPT_HOST"],
                                          "gateway.tls=acme certifies the route's own hosts; "
                                          "these differ from VIRTUAL_HOST"))
    method = mine.get("HTTPS_METHOD", "").strip().lower()
    if method:
        if method == "redirect":
            take("HTTPS_METHOD")
        elif method == "noredirect" and "tls" in result.labels:
            result.labels["tls.redirect"] = "false"
            take("HTTPS_METHOD")
        elif method == "nohttps" and "tls" not in result.labels:
            take("HTTPS_METHOD")
        else:
            result.dropped.append(Dropped("HTTPS_METHOD", method, "no equivalent for this "
                                          "container's TLS settings"))
    if mine.get("NETWORK_ACCESS", "").strip().lower() == "internal":
        result.labels["ip.allow"] = _NGINX_INTERNAL
        take("NETWORK_ACCESS")
    for k, v in mine.items():
        if k not in result.carried and not any(d.key == k for d in result.dropped):
            reason = {"LETSENCRYPT_EMAIL": "the ACME contact is proxy-wide: EDGEPROXY_ACME_EMAIL",
                      "VIRTUAL_HOST_MULTIPORTS": "several ports on one container need one "
                      "service per port with gateway.port",
                      "HSTS": "use gateway.tls.hsts (seconds or 365d) with gateway.tls"}.get(
                          k, "no edgeproxy equivalent")
            result.dropped.append(Dropped(k, v, reason))
    return result


# --- compose files as text ----------------------------------------------------------------------

def _from_compose(text: str) -> str:
    return text.replace("$$", _DOLLAR)


def _to_compose(text: str) -> str:
    return text.replace(_DOLLAR, "$$")


@dataclass(slots=True)
class _Entry:
    key: str
    value: str
    start: int  # offset of the entry's first line
    end: int  # offset just past its last line


@dataclass(slots=True)
class _Section:
    """A labels: or environment: node and where its entries sit in the text."""

    key_node: yaml.Node
    node: yaml.Node
    entries: list[_Entry]
    listed: bool  # the `- k=v` form
    block: bool


def _line_start(text: str, index: int) -> int:
    return text.rfind("\n", 0, index) + 1


def _line_end(text: str, index: int) -> int:
    if index > 0 and text[index - 1] == "\n":
        return index
    nl = text.find("\n", index)
    return len(text) if nl < 0 else nl + 1


def _last_index(node: yaml.Node) -> int:
    if isinstance(node, yaml.ScalarNode) or getattr(node, "flow_style", False):
        return int(node.end_mark.index)
    if isinstance(node, yaml.MappingNode) and node.value:
        k, v = node.value[-1]
        return max(_last_index(k), _last_index(v))
    if isinstance(node, yaml.SequenceNode) and node.value:
        return _last_index(node.value[-1])
    return int(node.end_mark.index)


def _section(text: str, key_node: yaml.Node, node: yaml.Node, pairs: bool) -> _Section | None:
    """Entries of a labels/environment node: `- K=V` items or `K: V` pairs."""
    entries: list[_Entry] = []
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            if not isinstance(item, yaml.ScalarNode):
                return None
            key, _, value = str(item.value).partition("=")
            entries.append(_Entry(key.strip(), value, _line_start(text, item.start_mark.index),
                                  _line_end(text, _last_index(item))))
        listed = True
    elif isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode) or not isinstance(v, yaml.ScalarNode):
                return None
            entries.append(_Entry(str(k.value), str(v.value or ""),
                                  _line_start(text, k.start_mark.index),
                                  _line_end(text, max(_last_index(k), _last_index(v)))))
        listed = False
    elif isinstance(node, yaml.ScalarNode) and node.value in ("", "~", "null"):
        listed = pairs is False
    else:
        return None
    block = not getattr(node, "flow_style", False) and bool(entries)
    return _Section(key_node, node, entries, listed, block)


def _child(node: yaml.Node, name: str) -> tuple[yaml.Node, yaml.Node] | None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == name:
                return k, v
    return None


@dataclass(slots=True)
class _Service:
    name: str
    node: yaml.MappingNode
    image: str
    sections: dict[str, _Section]  # "labels", "deploy.labels", "environment"


def _services(text: str, path: str) -> list[_Service]:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise MigrateError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None
    found = _child(root, "services") if root is not None else None
    if found is None or not isinstance(found[1], yaml.MappingNode) or not found[1].value:
        raise MigrateError(f"{path}: not a compose file: no services")
    out: list[_Service] = []
    for k, v in found[1].value:
        if not isinstance(v, yaml.MappingNode):
            continue
        image = _child(v, "image")
        sections: dict[str, _Section] = {}
        for name, parent in (("labels", v), ("environment", v)):
            hit = _child(parent, name)
            if hit is not None:
                sec = _section(text, hit[0], hit[1], name == "environment")
                if sec is not None:
                    sections[name] = sec
        deploy = _child(v, "deploy")
        if deploy is not None:
            hit = _child(deploy[1], "labels")
            if hit is not None:
                sec = _section(text, hit[0], hit[1], False)
                if sec is not None:
                    sections["deploy.labels"] = sec
        out.append(_Service(str(k.value), v,
                            str(image[1].value) if image and isinstance(image[1], yaml.ScalarNode)
                            else "", sections))
    return out


def _proxy_kind(image: str) -> str | None:
    repo = image.split("@")[0].rsplit(":", 1)[0] if "/" in image.split(":")[0] or ":" in image \
        else image
    last = repo.rsplit("/", 1)[-1].lower()
    if last == "traefik":
        return "Traefik"
    if last in ("nginx-proxy", "docker-gen", "acme-companion",
                "letsencrypt-nginx-proxy-companion"):
        return "nginx-proxy"
    return None


@dataclass(slots=True)
class FileReport:
    """Totals for one migrated file."""

    path: str
    carried: int = 0
    dropped: int = 0
    services: int = 0


@dataclass(slots=True)
class _Edit:
    start: int
    end: int
    text: str


def _render(key: str, value: str, listed: bool) -> str:
    if listed:
        return json.dumps(f"{key}={_to_compose(value)}", ensure_ascii=False)
    return f"{key}: {json.dumps(_to_compose(value), ensure_ascii=False)}"


def _entry_lines(labels: Mapping[str, str], comments: list[str], listed: bool, prefix: str,
                 indent: str, source: str) -> list[str]:
    lines = [f"{indent}{COMMENT} {prefix}.* labels carried over from the {source}"
             ] if labels else []
    for k in _ordered(labels):
        lines.append(indent + ("- " if listed else "") + _render(f"{prefix}.{k}", labels[k],
                                                                  listed))
    lines += [indent + c for c in comments]
    return lines


_ORDER = ("enable", "host", "path", "port", "network", "scheme", "tls")


def _ordered(labels: Mapping[str, str]) -> list[str]:
    return sorted(labels, key=lambda k: (_ORDER.index(k) if k in _ORDER else len(_ORDER), k))


def _indent_of(text: str, index: int) -> str:
    start = _line_start(text, index)
    line = text[start:index]
    return line[:len(line) - len(line.lstrip(" "))]


@dataclass(slots=True)
class Context:
    """What every file of one run shares: Traefik's middlewares are global to its Docker
    provider, so a middleware defined on one container may serve a router on another."""

    middlewares: dict[str, Middleware]
    used: set[str] = field(default_factory=set)  # middleware names some router uses
    carried: set[str] = field(default_factory=set)  # middleware labels carried somewhere
    final: bool = False  # the second pass, once `used` and `carried` are complete


def migrate_files(texts: list[tuple[str, str]], *, replace: bool = False,
                  prefix: str = "gateway") -> list[tuple[str, FileReport]]:
    """(path, compose text) pairs -> (migrated text, totals) per file. MigrateError when a file
    isn't a compose file."""
    ctx = Context(collect_middlewares(texts))
    for path, text in texts:  # first pass: which middlewares are used and carried
        migrate_text(text, path, ctx, replace=replace, prefix=prefix)
    ctx.final = True
    return [migrate_text(text, path, ctx, replace=replace, prefix=prefix) for path, text in texts]


def migrate_text(text: str, path: str, ctx: Context, *, replace: bool = False,
                 prefix: str = "gateway") -> tuple[str, FileReport]:
    """One compose file's text -> the migrated text and its totals."""
    report = FileReport(path)
    edits: list[_Edit] = []
    for service in _services(text, path):
        edits += _migrate_service(text, service, ctx, replace, prefix, report)
    for edit in sorted(edits, key=lambda e: (e.start, e.end), reverse=True):
        text = text[:edit.start] + edit.text + text[edit.end:]
    return text, report


def _migrate_service(text: str, service: _Service, ctx: Context, replace: bool, prefix: str,
                     report: FileReport) -> list[_Edit]:
    edits: list[_Edit] = []
    kind = _proxy_kind(service.image)
    service_indent = _indent_of(text, service.node.value[0][0].start_mark.index)
    if kind is not None:
        at = _line_start(text, service.node.value[0][0].start_mark.index)
        edits.append(_Edit(at, at, f"{service_indent}{COMMENT} this service runs {kind}; "
                           "edgeproxy replaces it (README: Deploying with Compose)\n"))
    env_sec = service.sections.get("environment")
    env = {e.key: _from_compose(e.value) for e in env_sec.entries} if env_sec else {}
    for name in ("labels", "deploy.labels"):
        sec = service.sections.get(name)
        labels = {e.key: _from_compose(e.value) for e in sec.entries} if sec else {}
        if any(k.startswith(prefix + ".") for k in labels):
            if any(k.lower().startswith("traefik.") for k in labels):
                assert sec is not None  # noqa: S101 - labels came from it
                edits.append(_comment_after(text, sec, [f"{COMMENT} left as is: this service "
                                                        f"already has {prefix}.* labels"]))
            continue
        nginx = migrate_nginx_proxy(env, labels) if name == "labels" and kind != "nginx-proxy" \
            else ServiceMigration()
        traefik = migrate_traefik(labels, ctx.middlewares, ctx.used) if sec else (
            ServiceMigration())
        if not ctx.final:
            ctx.carried.update(k for k in traefik.carried if k.lower().startswith(
                "traefik.http.middlewares."))
            continue
        defined = middleware_definitions(labels, service.name)
        for mw in defined.values():
            for key in mw.keys.values():
                if mw.name not in ctx.used:
                    traefik.dropped.append(Dropped(key, labels[key], f"middleware {mw.name} is "
                                                   "used by no router that was carried over"))
                elif key in ctx.carried:
                    traefik.carried.add(key)
        if traefik.labels and nginx.labels:
            for k in nginx.carried:
                nginx.dropped.append(Dropped(k, env[k], "the Traefik labels were carried over "
                                             "instead; a container has one route"))
            nginx.carried.clear()
            nginx.labels.clear()
        result = traefik if traefik.labels or not nginx.labels else nginx
        dropped = traefik.dropped + nginx.dropped
        notes = traefik.notes + nginx.notes
        if not result.labels and not dropped:
            # Only middleware definitions, carried over onto the services that use them.
            if replace and sec is not None and traefik.carried:
                gone = [e for e in sec.entries if e.key in traefik.carried]
                edits += _remove(text, sec, gone, keep_section=False)
                report.carried += len(gone)
            continue
        report.services += 1
        report.carried += len(traefik.carried) + len(nginx.carried)
        report.dropped += len(dropped)
        comments = [f"{COMMENT} note: {n}" for n in notes] + [d.line() for d in dropped]
        source = ("Traefik labels above" if result is traefik else
                  "nginx-proxy variables in environment")
        edits += _write_labels(text, service, name, sec, result.labels, comments, prefix,
                               service_indent, source)
        if replace:
            if sec is not None:
                gone = [e for e in sec.entries if e.key in traefik.carried]
                edits += _remove(text, sec, gone, keep_section=True)
            if env_sec is not None and nginx.carried:
                gone = [e for e in env_sec.entries if e.key in nginx.carried]
                edits += _remove(text, env_sec, gone, keep_section=False)
    return edits


def _comment_after(text: str, sec: _Section, comments: list[str]) -> _Edit:
    at = _line_end(text, _last_index(sec.node))
    indent = _indent_of(text, sec.entries[0].start) if sec.entries else ""
    if sec.entries:
        indent = _indent_of(text, _first_nonspace(text, sec.entries[0].start))
    return _Edit(at, at, "".join(f"{indent}{c}\n" for c in comments))


def _first_nonspace(text: str, start: int) -> int:
    i = start
    while i < len(text) and text[i] == " ":
        i += 1
    return i


def _write_labels(text: str, service: _Service, name: str, sec: _Section | None,
                  labels: Mapping[str, str], comments: list[str], prefix: str,
                  service_indent: str, source: str) -> list[_Edit]:
    if sec is not None and getattr(service.node, "flow_style", False):
        # The whole service is one flow mapping: no room for lines, so the labels stay a flow
        # node and the comments go above the service.
        kept = [text[a:b] for a, b in _spans(sec.node)]
        new = [_render(f"{prefix}.{k}", labels[k], sec.listed) for k in _ordered(labels)]
        body = ", ".join(kept + new)
        at = _line_start(text, service.node.start_mark.index)
        key_indent = _indent_of(text, service.node.start_mark.index)
        return [_Edit(sec.node.start_mark.index, _last_index(sec.node),
                      f"[{body}]" if sec.listed else "{" + body + "}"),
                _Edit(at, at, "".join(f"{key_indent}{c}\n" for c in comments))]
    if sec is not None and sec.block:
        indent = _indent_of(text, _first_nonspace(text, sec.entries[0].start))
        at = _line_end(text, _last_index(sec.node))
        lines = _entry_lines(labels, comments, sec.listed, prefix, indent, source)
        lead = "" if text[at - 1:at] == "\n" else "\n"
        return [_Edit(at, at, lead + "".join(line + "\n" for line in lines))]
    if sec is not None:
        # Flow style ({...} or [...]) or empty: rewrite the node as a block with the new entries.
        indent = service_indent + ("    " if name == "deploy.labels" else "  ")
        kept = [indent + ("- " if sec.listed else "") + text[a:b] for a, b in _spans(sec.node)]
        lines = kept + _entry_lines(labels, comments, sec.listed, prefix, indent, source)
        start = sec.key_node.end_mark.index + 1  # just past the ':'
        end = _last_index(sec.node) if sec.entries or sec.node.value else start
        return [_Edit(start, end, "\n" + "\n".join(lines))]
    # No labels: key yet (nginx-proxy variables): add one at the end of the service.
    at = _line_end(text, _last_index(service.node))
    indent = service_indent + "  "
    lines = _entry_lines(labels, comments, False, prefix, indent, source)
    lead = "" if text[at - 1:at] == "\n" else "\n"
    return [_Edit(at, at, lead + f"{service_indent}labels:\n" + "".join(f"{ln}\n" for ln in lines))]


def _spans(node: yaml.Node) -> list[tuple[int, int]]:
    if isinstance(node, yaml.SequenceNode):
        return [(n.start_mark.index, _last_index(n)) for n in node.value]
    return [(k.start_mark.index, max(_last_index(k), _last_index(v))) for k, v in node.value]


def _remove(text: str, sec: _Section, gone: list[_Entry], *, keep_section: bool) -> list[_Edit]:
    if not gone:
        return []
    if not sec.block:
        kept = [e for e in sec.entries if e not in gone]
        body = ", ".join(json.dumps(f"{e.key}={e.value}") if sec.listed else
                         f"{json.dumps(e.key)}: {json.dumps(e.value)}" for e in kept)
        start, end = sec.node.start_mark.index, sec.node.end_mark.index
        return [_Edit(start, end, f"[{body}]" if sec.listed else "{" + body + "}")]
    if len(gone) == len(sec.entries) and not keep_section:
        start = _line_start(text, sec.key_node.start_mark.index)
        return [_Edit(start, sec.entries[-1].end, "")]
    return [_Edit(e.start, e.end, "") for e in gone]


def collect_middlewares(texts: Iterable[tuple[str, str]]) -> dict[str, Middleware]:
    """Every middleware defined by labels in the files: Traefik shares them across containers."""
    out: dict[str, Middleware] = {}
    for path, text in texts:
        for service in _services(text, path):
            for name in ("labels", "deploy.labels"):
                sec = service.sections.get(name)
                if sec is not None:
                    labels = {e.key: _from_compose(e.value) for e in sec.entries}
                    out.update(middleware_definitions(labels, service.name))
    return out


def run_migrate(paths: list[str], *, replace: bool = False, prefix: str = "gateway",
                out: TextIO | None = None, err: TextIO | None = None,
                read: Callable[[str], str] | None = None) -> int:
    """Print each file migrated to gateway labels; a summary goes to `err`.

    Returns 0 when every Traefik label and nginx-proxy variable was carried over, 1 when some
    were not (each has a `# edgeproxy migrate:` comment in the output), 2 when a file can't be
    read or isn't a compose file."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    texts: list[tuple[str, str]] = []
    for path in paths:
        try:
            texts.append((path, read(path) if read else _read(path)))
        except MigrateError as exc:
            print(f"edgeproxy migrate: {exc}", file=err)
            return 2
    try:
        results = migrate_files(texts, replace=replace, prefix=prefix)
    except MigrateError as exc:
        print(f"edgeproxy migrate: {exc}", file=err)
        return 2
    dropped = 0
    for text, report in results:
        if len(paths) > 1:
            print(f"# ==> {report.path} <==", file=out)
        out.write(text if text.endswith("\n") else text + "\n")
        dropped += report.dropped
        print(f"edgeproxy migrate: {report.path}: {report.services} service(s), {report.carried} "
              f"label(s) carried over, {report.dropped} not carried over"
              + (f" (see the '{COMMENT}' comments)" if report.dropped else ""), file=err)
    return 1 if dropped else 0


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except OSError as exc:
        raise MigrateError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise MigrateError(f"{path}: cannot read: not UTF-8 text ({exc.reason})") from None
