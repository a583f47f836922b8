"""Header rules for both directions: hop-by-hop stripping, forwarded headers, client address."""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email.utils import formatdate
from typing import NamedTuple

from multidict import CIMultiDict, CIMultiDictProxy, istr

from edgeproxy.core.settings import IPNetwork

HOP_BY_HOP = frozenset(
    h.lower() for h in (
        "Connection", "Keep-Alive", "Proxy-Connection", "Proxy-Authenticate",
        "Proxy-Authorization", "TE", "Trailer", "Transfer-Encoding", "Upgrade",
    )
)
# Set only by the proxy; a client sending them is trying to impersonate an authenticated user.
RESERVED_REQUEST = frozenset(("x-auth-subject", "x-auth-scopes"))
# Replaced (the first four) or removed unless the peer is a trusted proxy: what a client says
# here about how it reached us is a claim only a proxy in front may make. Besides the ones we
# set, the aliases frameworks read for the same facts: the scheme (Rack prefers
# X-Forwarded-Ssl/-Scheme to X-Forwarded-Proto; Front-End-Https), the public path prefix
# (Spring, ASP.NET, Werkzeug), the forward-auth names, and the original URL (IIS, Zend and old
# Symfony route on X-Original-URL/X-Rewrite-URL: the replica would serve another path than
# the route we matched and protected).
FORWARDED = frozenset(("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
                       "x-forwarded-port", "x-real-ip", "forwarded", "x-forwarded-ssl",
                       "x-forwarded-scheme", "front-end-https", "x-forwarded-server",
                       "x-forwarded-prefix", "x-forwarded-uri", "x-forwarded-method",
                       "x-original-url", "x-original-uri", "x-rewrite-url"))
_RID_PREFIX = os.urandom(11).hex()
_rid_counter = itertools.count(1)


def _new_rid_prefix() -> None:
    global _RID_PREFIX
    _RID_PREFIX = os.urandom(11).hex()


os.register_at_fork(after_in_child=_new_rid_prefix)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

Headers = CIMultiDict[str] | CIMultiDictProxy[str]
# Names looked up on every request, as istr: a lookup by a plain str case-folds it each time.
HOST, X_REQUEST_ID, UPGRADE = istr("Host"), istr("X-Request-ID"), istr("Upgrade")
_DOWNSTREAM_DROP = frozenset(n.encode() for n in HOP_BY_HOP | {"content-length"})


def connection_tokens(headers: Headers) -> set[str]:
    """Lower-case header names listed in Connection (they are hop-by-hop too)."""
    return _tokens(headers.getall("Connection", ()))


def _tokens(values: Iterable[str]) -> set[str]:
    return {t for value in values for t in (p.strip().lower() for p in value.split(",")) if t}


def is_trusted(address: str | None, trusted: Iterable[IPNetwork]) -> bool:
    """True when an address lies inside one of the trusted proxy networks."""
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    return any(ip in net for net in trusted)


def client_address(peer: str | None, headers: Headers, trusted: tuple[IPNetwork, ...]) -> str:
    """The client's address: the peer, or, behind trusted proxies, the last untrusted hop."""
    peer = peer or ""
    if not trusted or not is_trusted(peer, trusted):
        return peer
    hops = [h.strip() for v in headers.getall("X-Forwarded-For", ()) for h in v.split(",")]
    for hop in reversed(hops):
        if not hop:
            continue
        if not is_trusted(hop, trusted):
            return hop
    return hops[0] if hops and hops[0] else peer


def request_id(headers: Headers) -> str:
    """The client's X-Request-ID when it looks like one, else a fresh one."""
    rid = headers.get(X_REQUEST_ID)
    if rid is not None and _REQUEST_ID.fullmatch(rid):
        return rid
    # A random per-process prefix and a counter: unique, and far cheaper than uuid4 per request.
    return f"{_RID_PREFIX}{next(_rid_counter):010x}"


# Precomputed per peer kind. The proxy handles Expect and sets X-Request-ID and X-Real-IP
# (the client address it worked out) itself, even behind a trusted peer.
_DROP_TRUSTED_B = frozenset(n.encode() for n in HOP_BY_HOP | RESERVED_REQUEST
                            | {"expect", "x-request-id", "x-real-ip"})
_DROP_UNTRUSTED_B = _DROP_TRUSTED_B | {n.encode() for n in FORWARDED}
# Names upstream_pairs notes on the way (its drop sets never hold them).
_NOTED = frozenset((b"host", b"content-length", b"x-forwarded-for", b"x-forwarded-proto",
                    b"x-forwarded-host"))
_UNDERSCORE = ord("_")  # `int in bytes` is several times faster than `b"_" in bytes`
# A client's Connection header may not remove what routing and framing rely on.
_PROTECTED_B = frozenset((b"host", b"content-length", b"content-type"))
RawHeaders = Sequence[tuple[bytes, bytes]]


class HopInfo(NamedTuple):
    """What the proxy tells the replica about this hop."""

    peer: str | None  # the address that connected to us
    client: str  # the client's address (behind trusted proxies, the last untrusted hop)
    scheme: str  # "http" or "https", as the client reached us
    rid: str  # the request id
    trusted_peer: bool  # the peer is a trusted proxy: its X-Forwarded-* are kept and extended


def _named_by_connection(lows: list[bytes], raw: RawHeaders) -> set[bytes]:
    """Lower-case header names listed in the Connection headers of a raw header list
    (`lows` holds its names, lowered)."""
    if lows.count(b"connection") == 1:  # the usual one token ("keep-alive", "close")
        value = raw[lows.index(b"connection")][1]
        if b"," not in value:
            token = value.strip().lower()
            return {token} if token else set()
    return {t for low, (_, v) in zip(lows, raw, strict=True) if low == b"connection"
            for t in (p.strip().lower() for p in v.split(b",")) if t}


@dataclass(slots=True)  # not frozen: built per request, and a frozen __init__ costs more
class UpstreamHead:
    """The request headers for a replica as pieces of `Name: value\r\n` lines.

    The pieces are the client's own header bytes where they pass unchanged, so a large head
    is not copied until the moment it is written (and that copy is dropped once written).
    The request line, a Host for clients that sent none, and chunked framing depend on the
    try (target, replica, body) and are added by `parts`. `pairs` holds the same headers as
    (name, value) pairs when they were built as such (an HTTP/2 replica takes them without
    the lines being split up again), else None."""

    pieces: list[bytes]
    has_host: bool
    has_length: bool
    pairs: list[tuple[bytes, bytes]] | None = None

    @classmethod
    def of(cls, headers: CIMultiDict[str]) -> UpstreamHead:
        """From a multidict (after header rules rewrote it)."""
        return cls(["".join(f"{n}: {v}\r\n" for n, v in headers.items()).encode(
            "utf-8", "surrogateescape")], "Host" in headers, "Content-Length" in headers)

    def parts(self, method: str, target: str, host: str, chunked: bool,
              extra: bytes = b"") -> list[bytes]:
        """The whole head for one try, in pieces: request line, headers, `extra` header lines
        of this try (its traceparent), framing, blank line."""
        parts = [f"{method} {target} HTTP/1.1\r\n".encode("utf-8", "surrogateescape"),
                 *self.pieces]
        if extra:
            parts.append(extra)
        if not self.has_host:  # HTTP/1.0 clients may send none; HTTP/1.1 replicas need one
            parts.append(b"Host: %s\r\n" % host.encode("utf-8", "surrogateescape"))
        if chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        parts.append(b"\r\n")
        return parts

    def serialize(self, method: str, target: str, host: str, chunked: bool,
                  extra: bytes = b"") -> bytes:
        """The whole head for one try as one bytes object."""
        return b"".join(self.parts(method, target, host, chunked, extra))


def upstream_head(raw: RawHeaders, hop: HopInfo,
                  auth: tuple[str, str] | None = None) -> UpstreamHead:
    """Headers to send upstream, straight from the client's header bytes (see
    `upstream_pairs`); `auth` is the (subject, scopes) pair for X-Auth-Subject and
    X-Auth-Scopes, already checked for control characters."""
    pairs, has_host, has_length = upstream_pairs(raw, hop)
    parts: list[bytes] = []
    for name, value in pairs:
        parts.extend((name, b": ", value, b"\r\n"))
    if auth is not None:
        subject, scopes = (a.encode("utf-8", "surrogateescape") for a in auth)
        parts.extend((b"X-Auth-Subject: ", subject, b"\r\nX-Auth-Scopes: ", scopes, b"\r\n"))
        pairs.extend(((b"X-Auth-Subject", subject), (b"X-Auth-Scopes", scopes)))
    return UpstreamHead(parts, has_host, has_length, pairs)


def upstream_request_headers(raw: RawHeaders, hop: HopInfo) -> CIMultiDict[str]:
    """The same headers as a multidict, for routes whose header rules rewrite them (and
    WebSockets); values decoded as aiohttp decodes them (UTF-8, bytes kept as surrogates)."""
    pairs, _, _ = upstream_pairs(raw, hop)
    return CIMultiDict([(n.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
                        for n, v in pairs])


def upstream_pairs(raw: RawHeaders, hop: HopInfo) -> tuple[list[tuple[bytes, bytes]], bool, bool]:
    """The replica's request headers from the client's: hop-by-hop, Connection-named, reserved
    and underscore names removed; X-Forwarded-*, X-Real-IP and X-Request-ID set (kept and
    extended only from a trusted peer). Values pass through as the client sent them.

    Returns the (name, value) pairs, whether a Host is among them, and whether a
    Content-Length is."""
    peer, client, scheme, rid, trusted_peer = hop
    drop = _DROP_TRUSTED_B if trusted_peer else _DROP_UNTRUSTED_B
    lows = [n.lower() for n, _ in raw]
    if b"connection" in lows:
        drop = drop | (_named_by_connection(lows, raw) - _PROTECTED_B)
    out: list[tuple[bytes, bytes]] = []
    host: bytes | None = None
    prior: list[bytes] = []
    has_proto = has_fwd_host = has_length = False
    for low, pair in zip(lows, raw, strict=True):
        if low in drop or _UNDERSCORE in pair[0]:
            continue
        if low in _NOTED:
            if low == b"host":
                if host is None:
                    host = pair[1]
            elif low == b"x-forwarded-for":  # only a trusted peer's gets here: it is extended
                prior.append(pair[1])
                continue
            elif low == b"content-length":
                has_length = True
            elif low == b"x-forwarded-proto":
                has_proto = True
            else:
                has_fwd_host = True
        out.append(pair)
    peer_b = (peer or "").encode()
    if trusted_peer:
        out.append((b"X-Forwarded-For", b", ".join([*prior, peer_b])))
        if not has_proto:
            out.append((b"X-Forwarded-Proto", scheme.encode()))
        if host is not None and not has_fwd_host:
            out.append((b"X-Forwarded-Host", host))
    else:
        out.append((b"X-Forwarded-For", peer_b))
        out.append((b"X-Forwarded-Proto", scheme.encode()))
        if host is not None:
            out.append((b"X-Forwarded-Host", host))
    out.append((b"X-Real-IP", client.encode()))
    out.append((b"X-Request-ID", rid.encode()))
    return out, host is not None, has_length


def downstream_pairs(raw: RawHeaders, also: frozenset[bytes] = frozenset()
                     ) -> tuple[list[tuple[bytes, bytes]], set[bytes]]:
    """The replica's response headers a client may see: hop-by-hop headers, Content-Length
    (we frame ourselves), every name Connection lists and the names in `also` removed.

    Returns the kept (name, value) pairs and the set of their lower-cased names."""
    drop = _DOWNSTREAM_DROP | also if also else _DOWNSTREAM_DROP
    lows = [n.lower() for n, _ in raw]
    if b"connection" in lows:
        tokens = _named_by_connection(lows, raw)
        if not tokens <= drop:
            drop = drop | tokens
    kept = [pair for low, pair in zip(lows, raw, strict=True) if low not in drop]
    return kept, set(lows) - drop


def downstream_from_raw(raw: RawHeaders) -> CIMultiDict[str]:
    """`downstream_pairs` as a multidict (for response-header rules, compression, streaming),
    decoded as aiohttp decodes them (UTF-8, bytes kept as surrogates)."""
    return CIMultiDict([(n.decode("latin-1"), v.decode("utf-8", "surrogateescape"))
                        for n, v in downstream_pairs(raw)[0]])


_REPLACED = frozenset((b"x-request-id",))  # the replica's is replaced by ours
_date: tuple[int, bytes] = (0, b"")


def _http_date() -> bytes:
    """The Date header value, formatted once per second."""
    global _date
    now = int(time.time())
    if now != _date[0]:
        _date = (now, formatdate(now, usegmt=True).encode())
    return _date[1]


def response_head(version: tuple[int, int], status: int, reason: str, raw: RawHeaders,
                  rid: str, extra: dict[str, str] | None, length: int, keep_alive: bool) -> bytes:
    """The client's response head for a body of `length` bytes, straight from the replica's
    header bytes: the headers `downstream_pairs` keeps plus X-Request-ID and `extra`
    (which replace the replica's headers of those names), framed as aiohttp frames a Response
    (Content-Length, Date and Content-Type when missing, Connection for keep-alive), except
    that no Server header of ours is added: the replica's passes through, else there is none.

    The replica's values pass through as bytes: llhttp refused CR, LF and NUL in them."""
    ours = frozenset(k.lower().encode() for k in extra) if extra else frozenset()
    pairs, present = downstream_pairs(raw, _REPLACED | ours if ours else _REPLACED)
    present |= ours
    parts = [_status_line(version, status, reason)]
    for name, value in pairs:
        parts.extend((name, b": ", value, b"\r\n"))
    parts.extend((b"X-Request-ID: ", rid.encode(), b"\r\n"))
    if extra:
        for key, val in extra.items():
            if "\r" in val or "\n" in val:  # ours, but never a way to split the head
                raise ValueError(f"header {key!r} holds CR or LF")
            parts.append(f"{key}: {val}\r\n".encode("utf-8", "surrogateescape"))
    parts.extend((b"Content-Length: ", b"%d" % length, b"\r\n"))
    if length and b"content-type" not in present:
        parts.append(b"Content-Type: application/octet-stream\r\n")
    if b"date" not in present:
        parts.extend((b"Date: ", _http_date(), b"\r\n"))
    if b"connection" not in present:
        if keep_alive:
            if version == (1, 0):
                parts.append(b"Connection: keep-alive\r\n")
        elif version == (1, 1):
            parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


_status_lines: dict[tuple[tuple[int, int], int, str], bytes] = {}


def _status_line(version: tuple[int, int], status: int, reason: str) -> bytes:
    """`HTTP/1.1 200 OK\\r\\n`, cached: replicas use a handful of statuses and reasons."""
    key = (version, status, reason)
    line = _status_lines.get(key)
    if line is None:
        if len(_status_lines) >= 512:  # a replica inventing reasons can't grow it
            _status_lines.clear()
        line = _status_lines[key] = b"HTTP/%d.%d %d %s\r\n" % (
            version[0], version[1], status, reason.encode("latin-1", "replace"))
    return line


def request_host(headers: Headers) -> str:
    """Lower-case host name from the Host header, without port or trailing dot."""
    value = headers.get(HOST, "")
    name = _HOST_NAMES.get(value)
    if name is None:
        name = host_name(value)
        if len(value) <= _HOST_KEPT_MAX_LEN:
            if len(_HOST_NAMES) >= _HOST_NAMES_MAX:  # made-up Host values can't grow it
                _HOST_NAMES.clear()
            _HOST_NAMES[value] = name
    return name


# Host header values seen and their host names: a site has a handful, and a dict probe is
# cheaper than the five string operations of host_name on every request. Bounded in count and
# in each value's length (a DNS name and a port; the proxy refuses longer Host values before
# routing, other callers may not), so made-up names hold at most about 2 MB.
_HOST_NAMES: dict[str, str] = {}
_HOST_NAMES_MAX = 4096
_HOST_KEPT_MAX_LEN = 260


def host_name(authority: str) -> str:
    """Lower-case host name of a Host value or URL authority, without port or trailing dot."""
    if not authority:
        return ""
    host = authority.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else host
    colon = host.rfind(":")
    if colon >= 0:
        host = host[:colon]
    return host.rstrip(".")
