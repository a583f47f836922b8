"""Request-path normalisation: one canonical path that is matched, authorised and forwarded."""

from __future__ import annotations

import re

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# RFC 3986 pchar without '%', plus '/' as separator. ';' is legal but stays a character.
_PCHAR = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/"
)
_HEX = frozenset(b"0123456789ABCDEFabcdef")
# Encoded characters that change a path's meaning for some backend: '/', '\', NUL, ';', '%'.
_REFUSED_ENCODED = {"2F": "an encoded slash (%2F)", "5C": "an encoded backslash (%5C)",
                    "00": "an encoded NUL (%00)", "3B": "an encoded semicolon (%3B)",
                    "25": "an encoded percent sign (%25)"}
_TRIPLET = re.compile(r"%([0-9A-Fa-f]{2})")
# Segments of path characters (no '%' or ';'), none empty (except a trailing '/'), none
# starting with '.': such a path is its own canonical form.
_CLEAN = re.compile(r"(?:/[A-Za-z0-9\-_~!$&'()*+,=:@][A-Za-z0-9\-._~!$&'()*+,=:@]*)*/?")


class PathError(ValueError):
    """A request path we refuse to route (answered with 400)."""


def normalize_path(raw: str) -> str:
    """Return the canonical form of a raw (still percent-encoded) path, without query.

    Unreserved characters are decoded, other escapes upper-cased, empty segments merged and
    dot segments resolved (RFC 3986 5.2.4). Escapes that hide a separator or a control byte,
    dot segments that climb above the root, and bytes outside RFC 3986 are refused.
    """
    if not raw.startswith("/"):
        raise PathError("the path must start with '/'")
    if "%" in raw:
        raw = _decode_unreserved(raw)
    elif _CLEAN.fullmatch(raw):
        # The common case: only path characters, no '//', no dot segment, no ';': already
        # canonical (checked by one regex instead of a Python loop per byte).
        return raw
    else:
        _check_chars(raw)
    segments = raw.split("/")
    out: list[str] = []
    for seg in segments[1:]:
        if ";" in seg and seg.split(";", 1)[0] in (".", ".."):
            # Servlet containers drop ';params' and then resolve '..': /public/..;/admin
            # would be matched as /public but served as /admin.
            raise PathError("the path holds a dot segment with parameters (..;)")
        if seg == "" or seg == ".":
            continue
        if seg == "..":
            if not out:
                raise PathError("the path climbs above the root with '..'")
            out.pop()
            continue
        out.append(seg)
    trailing = segments[-1] in ("", ".", "..") and len(out) > 0
    path = "/" + "/".join(out)
    if trailing:
        path += "/"
    return path


def _check_chars(raw: str) -> None:
    data = raw.encode("utf-8", "surrogateescape")
    for byte in data:
        if byte not in _PCHAR:
            raise PathError(f"the path holds a character that is not allowed: {chr(byte)!r}")


def _decode_unreserved(raw: str) -> str:
    data = raw.encode("utf-8", "surrogateescape")
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        byte = data[i]
        if byte == 0x25:  # '%'
            if i + 2 >= n:
                raise PathError("the path holds a malformed percent escape")
            hi, lo = data[i + 1], data[i + 2]
            if hi not in _HEX or lo not in _HEX:
                raise PathError("the path holds a malformed percent escape")
            code = bytes((hi, lo)).decode().upper()
            if code in _REFUSED_ENCODED:
                raise PathError(f"the path holds {_REFUSED_ENCODED[code]}")
            value = int(code, 16)
            if value in _UNRESERVED:
                out.append(value)
            else:
                out += b"%" + code.encode()
            i += 3
            continue
        if byte not in _PCHAR:
            raise PathError(f"the path holds a character that is not allowed: {chr(byte)!r}")
        out.append(byte)
        i += 1
    return out.decode("ascii")


def split_target(target: str) -> tuple[str, str]:
    """Split a raw request target into (path, query); a fragment is dropped, never forwarded."""
    if "?" not in target and "#" not in target:  # the common case: two scans, no new objects
        return target, ""
    target = target.split("#", 1)[0]
    path, _, query = target.partition("?")
    return path, query


# host[:port] of an absolute-form target: a DNS name or IPv4 address, or an [IPv6] literal.
_AUTHORITY = re.compile(r"(?:[A-Za-z0-9_][A-Za-z0-9_.-]*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def split_absolute(target: str) -> tuple[str, str] | None:
    """The (authority, origin-form target) of an absolute-form request target
    (`http://host:port/path?query`, RFC 9112 3.2.2), or None for any other form.

    Servers must accept this form, and its authority replaces the Host header. An authority
    with userinfo (`user@host`), an empty one or one that is not a host name or address
    raises PathError."""
    head = target[:8].lower()
    if head.startswith("http://"):
        rest = target[7:]
    elif head.startswith("https://"):
        rest = target[8:]
    else:
        return None
    end = len(rest)
    for sep in "/?#":
        i = rest.find(sep)
        if 0 <= i < end:
            end = i
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:
        raise PathError("the request target carries userinfo ('user@host'), which is refused")
    if not _AUTHORITY.fullmatch(authority):
        raise PathError(f"the request target's authority {authority!r} is not a host name or "
                        "address")
    return authority, tail if tail.startswith("/") else "/" + tail


def prefixes_of(path: str) -> list[str]:
    """Segment-boundary prefixes of a normalised path, longest first: /a/b/ -> /a/b, /a, /."""
    trimmed = path.rstrip("/")
    out: list[str] = []
    while trimmed:
        out.append(trimmed)
        trimmed = trimmed[: trimmed.rfind("/")]
    out.append("/")
    return out


def strip_prefix(path: str, prefix: str) -> str:
    """Remove a matched prefix from a path, keeping it absolute."""
    if prefix == "/":
        return path
    rest = path[len(prefix):]
    return rest if rest.startswith("/") else "/" + rest


CHALLENGE_PREFIX = "/.well-known/acme-challenge/"
_CHALLENGE_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")  # base64url, RFC 8555 section 8.3


def challenge_token(path: str) -> str | None:
    """The token of an ACME HTTP-01 request path, or None if `path` is not a challenge path."""
    if not path.startswith(CHALLENGE_PREFIX):
        return None
    token = path[len(CHALLENGE_PREFIX):]
    return token if _CHALLENGE_TOKEN.fullmatch(token) else None
