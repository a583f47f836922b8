"""Request/response transformations compiled from labels: headers, path rewrites, CORS, gzip."""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from multidict import CIMultiDict

from edgeproxy.core.paths import PathError, normalize_path
from edgeproxy.core.state import fast_state

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Headers the proxy owns: labels may not set or remove them (framing, routing, identity).
_RESERVED = frozenset(("host", "content-length", "transfer-encoding", "connection", "upgrade",
                       "x-auth-subject", "x-auth-scopes", "x-request-id", "te", "trailer",
                       "keep-alive", "proxy-connection"))
_COMPRESSIBLE = re.compile(
    r"^(text/|application/(json|javascript|ecmascript|xml|x-javascript|wasm|manifest\+json|"
    r"ld\+json|graphql-response\+json|problem\+json|x-ndjson|rss\+xml|atom\+xml)|"
    r"image/svg\+xml|application/[a-z0-9.+-]+\+(json|xml))", re.IGNORECASE)
MIN_COMPRESS = 256
SIMPLE_METHODS = ("GET", "HEAD", "POST")


def parse_header_name(name: str) -> str:
    """A header name a label may set: an HTTP token, not one the proxy owns."""
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"header name {name!r} is not an HTTP token (letters, digits, -)")
    if name.lower() in _RESERVED:
        raise ValueError(f"header {name!r} is managed by the proxy and cannot be set by a label")
    return name


def parse_header_value(value: str) -> str:
    """A header value: no CR, LF, NUL or other control characters (header injection)."""
    for ch in value:
        if (ord(ch) < 0x20 and ch != "\t") or ord(ch) == 0x7F:
            raise ValueError("header values may not hold control characters such as CR or LF")
    return value.strip()


@fast_state
@dataclass(frozen=True, slots=True)
class Rewrite:
    """`REGEX => REPLACEMENT` applied to the forwarded path (query kept)."""

    pattern: re.Pattern[str]
    replacement: str

    def apply(self, path: str) -> str:
        """The rewritten path; raise PathError if it is not a clean absolute path."""
        out = self.pattern.sub(self.replacement, path, count=1)
        if not out.startswith("/"):
            raise PathError(f"the rewrite produced {out!r}, which does not start with '/'")
        if normalize_path(out) != out:
            raise PathError(f"the rewrite produced {out!r}, which is not a canonical path "
                            "(dot segments, '//' or an encoded separator)")
        return out


def parse_rewrite(value: str) -> Rewrite:
    """'^/v1/(.*) => /api/\\1' -> Rewrite."""
    pattern, sep, replacement = value.partition("=>")
    if not sep:
        raise ValueError("REGEX => REPLACEMENT, e.g. ^/v1/(.*) => /api/\\1")
    pattern, replacement = pattern.strip(), replacement.strip()
    if not pattern or not replacement.startswith("/"):
        raise ValueError("REGEX => REPLACEMENT where the replacement starts with '/', "
                         "e.g. ^/v1/(.*) => /api/\\1")
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"the regular expression {pattern!r} is invalid: {exc}") from None
    try:  # group references must exist; checked now, not on the first request
        compiled.sub(replacement, "")
        _check_groups(compiled, replacement)
        literal = re.sub(r"\\([1-9][0-9]?)|\\g<\w+>", "", replacement)
        expanded = re.sub("x", literal, "x")
    except (re.error, IndexError) as exc:
        raise ValueError(f"the replacement {replacement!r} is invalid: {exc}") from None
    if any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in expanded):
        raise ValueError(f"the replacement {replacement!r} produces control characters or "
                         "spaces (header/path injection)")
    return Rewrite(compiled, replacement)


def _check_groups(pattern: re.Pattern[str], replacement: str) -> None:
    for m in re.finditer(r"\\(\d+)|\\g<(\w+)>", replacement):
        ref = m.group(1) or m.group(2)
        if ref.isdigit():
            if int(ref) > pattern.groups:
                raise re.error(f"group \\{ref} does not exist (the pattern has "
                               f"{pattern.groups})")
        elif ref not in pattern.groupindex:
            raise re.error(f"group {ref!r} does not exist")


def parse_prefix(value: str) -> str:
    """'/internal' -> a canonical prefix without a trailing '/'."""
    v = value.strip()
    if not v.startswith("/"):
        raise ValueError("a path starting with '/', e.g. /internal")
    try:
        norm = normalize_path(v)
    except PathError as exc:
        raise ValueError(f"path {v!r}: {exc}") from None
    if norm.rstrip("/") != v.rstrip("/"):
        raise ValueError(f"path {v!r} is not canonical; write {norm.rstrip('/')!r}")
    return norm.rstrip("/")


@fast_state
@dataclass(frozen=True, slots=True)
class CorsSpec:
    """Cross-origin rules; `origins` None means any origin ('*')."""

    origins: frozenset[str] | None
    methods: tuple[str, ...] = SIMPLE_METHODS
    headers: tuple[str, ...] = ()
    credentials: bool = False
    max_age: int | None = None
    expose: tuple[str, ...] = ()

    def allow_origin(self, origin: str) -> str | None:
        """The Access-Control-Allow-Origin value for this origin, or None (not allowed)."""
        if self.origins is None:
            return origin if self.credentials else "*"
        return origin if origin in self.origins else None

    def preflight_headers(self, origin: str, request_headers: str | None) -> dict[str, str]:
        """Headers of a preflight answer; empty when the origin is not allowed."""
        allowed = self.allow_origin(origin)
        if allowed is None:
            return {"Vary": "Origin"}
        out = {"Access-Control-Allow-Origin": allowed,
               "Access-Control-Allow-Methods": ", ".join(self.methods),
               "Vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"}
        if self.headers:
            out["Access-Control-Allow-Headers"] = ", ".join(self.headers)
        elif request_headers:
            # No list given: reflect what the browser asks for (the common gateway default).
            out["Access-Control-Allow-Headers"] = request_headers
        if self.credentials:
            out["Access-Control-Allow-Credentials"] = "true"
        if self.max_age is not None:
            out["Access-Control-Max-Age"] = str(self.max_age)
        return out

    def response_headers(self, origin: str) -> dict[str, str]:
        """Headers added to an actual (non-preflight) response."""
        allowed = self.allow_origin(origin)
        if allowed is None:
            return {}
        out = {"Access-Control-Allow-Origin": allowed}
        if allowed != "*":
            out["Vary"] = "Origin"
        if self.credentials:
            out["Access-Control-Allow-Credentials"] = "true"
        if self.expose:
            out["Access-Control-Expose-Headers"] = ", ".join(self.expose)
        return out


_ORIGIN = re.compile(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?")


def parse_origins(value: str) -> frozenset[str] | None:
    """'https://a.example,https://b.example' or '*'."""
    parts = [p.strip().rstrip("/") for p in value.split(",") if p.strip()]
    if parts == ["*"]:
        return None
    if not parts or "*" in parts:
        raise ValueError("'*' alone, or comma-separated origins such as https://app.example.com")
    for p in parts:
        if not _ORIGIN.fullmatch(p):
            raise ValueError(f"origin {p!r} is not scheme://host[:port], e.g. "
                             "https://app.example.com")
    return frozenset(parts)


def parse_methods(value: str) -> tuple[str, ...]:
    """'GET, POST, PUT' -> upper-case method tokens."""
    methods = tuple(dict.fromkeys(m.strip().upper() for m in value.split(",") if m.strip()))
    if not methods or not all(_TOKEN.fullmatch(m) for m in methods):
        raise ValueError("comma-separated methods such as GET, POST, PUT")
    return methods


def parse_header_list(value: str) -> tuple[str, ...]:
    """'Content-Type, X-Api-Key' -> header names."""
    names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    if not names or not all(_TOKEN.fullmatch(n) for n in names):
        raise ValueError("comma-separated header names such as Content-Type, X-Api-Key")
    return names


@fast_state
@dataclass(frozen=True, slots=True)
class HeaderRules:
    """Headers to set (value) or remove (empty value), compiled once per route."""

    set: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    @classmethod
    def build(cls, items: Iterable[tuple[str, str]]) -> HeaderRules:
        """From (name, value) pairs: an empty value means remove."""
        sets, removes = [], []
        for name, value in sorted(items, key=lambda kv: kv[0].lower()):
            (removes.append(name) if value == "" else sets.append((name, value)))
        return cls(tuple(sets), tuple(removes))

    def apply(self, headers: CIMultiDict[str]) -> None:
        """Change `headers` in place."""
        for name in self.remove:
            headers.popall(name, None)
        for name, value in self.set:
            headers[name] = value

    def __bool__(self) -> bool:
        return bool(self.set or self.remove)


NO_HEADER_RULES = HeaderRules()  # immutable, so one shared default


def wants_gzip(accept_encoding: str) -> bool:
    """True when the client accepts gzip (q > 0); an explicit gzip entry beats '*'."""
    weights: dict[str, float] = {}
    for part in accept_encoding.lower().split(","):
        coding, _, params = part.strip().partition(";")
        coding = coding.strip()
        if coding not in ("gzip", "*"):
            continue
        q = 1.0
        params = params.strip()
        if params.startswith("q="):
            try:
                q = float(params[2:])
            except ValueError:
                q = 0.0
        weights[coding] = q
    return weights.get("gzip", weights.get("*", 0.0)) > 0


def should_compress(method: str, status: int, headers: Mapping[str, str],
                    accept_encoding: str, content_length: int | None = None) -> bool:
    """Whether to gzip this response on the way out (`content_length` when headers lack it)."""
    if method == "HEAD" or status < 200 or status in (204, 206, 304):
        return False
    if "content-encoding" in {k.lower() for k in headers}:
        return False
    ctype = headers.get("Content-Type", "")
    if not ctype or not _COMPRESSIBLE.match(ctype):
        return False
    length = headers.get("Content-Length")
    if length is not None and length.isdigit():
        content_length = int(length)
    if content_length is not None and content_length < MIN_COMPRESS:
        return False
    return wants_gzip(accept_encoding)


def gzip_compressor() -> zlib._Compress:
    """A streaming gzip compressor (level 5: most of the ratio for a fraction of level 9's CPU)."""
    return zlib.compressobj(5, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
