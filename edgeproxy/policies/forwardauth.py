"""Forward authentication (`gateway.auth=forward`): ask an auth service (Authelia, Authentik,
oauth2-proxy) about each request, with the contract they document for Traefik's forwardAuth.

The proxy sends a GET without a body to `gateway.auth.url` carrying the client's headers (all
but hop-by-hop and body headers, or only those `gateway.auth.request_headers` names) and
X-Forwarded-Method, -Proto, -Host, -Uri and -For describing the original request. A 2xx lets
the request through, with the headers named in `gateway.auth.response_headers` copied from the
answer (the client's own copies removed first, so a spoofed Remote-User never arrives); any
other answer goes back to the client as sent (status, Location, Set-Cookie, body), so login
redirects work. A service that is down, slow or answers too much: 503 auth_unavailable.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from multidict import CIMultiDict
from yarl import URL

from edgeproxy.core.headers import FORWARDED, HOP_BY_HOP, RESERVED_REQUEST, Headers, connection_tokens
from edgeproxy.core.state import fast_state

# Never copied from the client to the auth service: describing the body we don't send, or
# naming the original request in ways some services prefer over X-Forwarded-* (Authelia's
# legacy /api/verify honours X-Original-URL: a client's own would pick the policy checked).
BODY_HEADERS = frozenset(("content-length", "content-type", "content-encoding",
                          "transfer-encoding", "expect"))
_NOT_TO_AUTH = (HOP_BY_HOP | BODY_HEADERS | FORWARDED | RESERVED_REQUEST
                | {"host", "x-forwarded-method", "x-forwarded-uri", "x-forwarded-prefix",
                   "x-original-url", "x-original-uri", "x-original-method"})
# Names a label may not ask to copy into the replica's request: the proxy owns them.
_NOT_COPYABLE = HOP_BY_HOP | RESERVED_REQUEST | {"host", "content-length", "content-type",
                                                 "content-encoding", "expect", "x-request-id"}
# Not copied from a denial to the client: framing is ours (the body is sent whole).
_NOT_TO_CLIENT = HOP_BY_HOP | {"content-length", "transfer-encoding"}
MAX_DENIAL_BODY = 64 * 1024
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f]")  # control characters but TAB


def parse_auth_url(value: str) -> str:
    """`gateway.auth.url`: an http(s) URL (a path and query allowed, as Authelia's ?rd=)."""
    v = value.strip()
    try:
        url = URL(v, encoded=True)
    except (ValueError, TypeError):
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host or url.fragment \
            or any(ord(ch) <= 0x20 for ch in v):
        raise ValueError("the auth service's http(s) URL, such as "
                         "http://authelia:9091/api/authz/forward-auth")
    return v


def parse_copied_headers(value: str) -> tuple[str, ...]:
    """`gateway.auth.response_headers` / `request_headers`: header names, comma-separated."""
    names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    if not names or not all(_is_token(n) for n in names):
        raise ValueError("comma-separated header names such as Remote-User, Remote-Groups")
    owned = [n for n in names if n.lower() in _NOT_COPYABLE]
    if owned:
        raise ValueError(f"{', '.join(owned)} cannot be copied: the proxy sets or strips "
                         "these itself")
    return names


def _is_token(name: str) -> bool:
    return all((c.isalnum() and c.isascii()) or c in "!#$%&'*+-.^`|~" for c in name) \
        and "_" not in name


@fast_state
@dataclass(frozen=True, slots=True)
class ForwardAuthSpec:
    """gateway.auth=forward on one route. `request_headers=None`: every client header but
    hop-by-hop and body headers; `timeout=None`: the route's read timeout (as nginx's
    auth_request waits its location's proxy_read_timeout)."""

    url: str
    response_headers: tuple[str, ...] = ()
    request_headers: tuple[str, ...] | None = None
    timeout: float | None = None
    # Derived once, not per request: the names a grant removes from the client's headers.
    drop: frozenset[bytes] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "drop",
                           frozenset(n.lower().encode() for n in self.response_headers))


@dataclass(frozen=True, slots=True)
class Original:
    """What the auth service is told about the original request."""

    method: str
    proto: str  # http or https, as the client reached the first proxy
    host: str  # the Host the client asked for
    uri: str  # the request target, path and query, as the client sent it
    forwarded_for: str  # X-Forwarded-For: a trusted peer's chain plus the peer


def auth_request_headers(client: Headers, spec: ForwardAuthSpec,
                         original: Original) -> CIMultiDict[str]:
    """The headers of the request to the auth service (pure)."""
    named = connection_tokens(client)
    wanted = None if spec.request_headers is None else {
        n.lower() for n in spec.request_headers}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in client.items():
        low = name.lower()
        if low in _NOT_TO_AUTH or low in named or "_" in name:
            continue
        if wanted is not None and low not in wanted:
            continue
        out.add(name, value)
    out["X-Forwarded-Method"] = original.method
    out["X-Forwarded-Proto"] = original.proto
    out["X-Forwarded-Host"] = original.host
    out["X-Forwarded-Uri"] = original.uri
    out["X-Forwarded-For"] = original.forwarded_for
    return out


def copied_headers(answer: Headers, names: Iterable[str]) -> list[tuple[str, str]]:
    """Every value of each named header in the auth service's 2xx answer, in order (pure);
    values with control characters are dropped (they would split the replica's request)."""
    out: list[tuple[str, str]] = []
    for name in names:
        for value in answer.getall(name, ()):
            if _CONTROL.search(value) is None:
                out.append((name, value))
    return out


def denial_headers(answer: Headers) -> CIMultiDict[str]:
    """The auth service's non-2xx answer headers as the client gets them (pure): all but
    hop-by-hop (and those its Connection names) and framing."""
    named = connection_tokens(answer)
    return CIMultiDict((n, v) for n, v in answer.items()
                       if n.lower() not in _NOT_TO_CLIENT and n.lower() not in named)


@dataclass(frozen=True, slots=True)
class Granted:
    """A 2xx: headers to set on the replica's request."""

    headers: list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Denied:
    """A non-2xx answer, to send back as it came."""

    status: int
    reason: str
    headers: CIMultiDict[str]
    body: bytes


class ForwardAuthUnavailable(Exception):
    """The auth service could not answer (down, timed out, oversized answer)."""

    def __init__(self, cause: str, detail: str) -> None:
        super().__init__(detail)
        self.cause = cause
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Answer:
    """The auth service's answer as a `Fetch` returns it (the body only for a non-2xx, and
    cut after `max_body` + 1 bytes)."""

    status: int
    reason: str
    headers: Headers
    body: bytes


class Fetch(Protocol):
    """One GET without a body to the auth service (edgeproxy.clients.authfetch.PoolFetch).
    Raises ForwardAuthUnavailable("unreachable", ...) when it cannot be asked."""

    async def get(self, url: str, headers: CIMultiDict[str], max_body: int,
                  limit_s: float) -> Answer: ...


async def ask(fetch: Fetch, spec: ForwardAuthSpec, client: Headers,
              original: Original, limit_s: float) -> Granted | Denied:
    """One round trip to the auth service; raise ForwardAuthUnavailable when it can't answer."""
    headers = auth_request_headers(client, spec, original)
    try:
        async with asyncio.timeout(limit_s):
            answer = await fetch.get(spec.url, headers, MAX_DENIAL_BODY, limit_s)
    except TimeoutError:
        raise ForwardAuthUnavailable("timeout", f"no answer within {limit_s:g}s") from None
    except OSError as exc:
        raise ForwardAuthUnavailable("unreachable", str(exc) or type(exc).__name__) from None
    if 200 <= answer.status < 300:
        return Granted(copied_headers(answer.headers, spec.response_headers))
    if len(answer.body) > MAX_DENIAL_BODY:
        raise ForwardAuthUnavailable("answer_too_large", f"its {answer.status} answer is "
                                     f"larger than {MAX_DENIAL_BODY} bytes")
    return Denied(answer.status, answer.reason, denial_headers(answer.headers), answer.body)
