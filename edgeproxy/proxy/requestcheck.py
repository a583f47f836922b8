"""Semantic checks of a parsed request head, before it is matched or forwarded (pure).

aiohttp's llhttp parser already refuses what cannot be framed (CL+TE, two Content-Lengths, two
Hosts, an HTTP/1.1 request without Host, obs-fold, bare LF). What it lets through and we refuse
here, each answered the way nginx answers it:

- a protocol version other than HTTP/1.x (llhttp accepts `HTTP/2.0` as a request line) -> 505;
- a Host (or absolute-form authority) that is not reg-name / IPv4 / [IPv6] with an optional
  numeric port (RFC 9112 3.2, RFC 3986 3.2.2) -> 400, before it can select a route or reach a
  replica raw in `Host` or `X-Forwarded-Host`;
- `Transfer-Encoding` other than exactly `chunked` -> 501, and any `Transfer-Encoding` on an
  HTTP/1.0 request -> 400 (RFC 9112 6.1: its framing is faulty);
- a credential header sent twice (`Authorization` on every route, the header a route's rate
  limit is keyed on there) -> 400: we would check one and a replica might read the other;
- a `Sec-WebSocket-Key` that is not base64 of 16 bytes (RFC 6455 4.1) -> 400;
- a WebSocket upgrade that is not a GET without a body (RFC 6455 4.1) -> 400 and close: the
  handshake towards the replica is a GET, and the client's body would be misread as frames.
"""

from __future__ import annotations

import re

from multidict import MultiMapping, istr

from edgeproxy.core.hosts import host_problem
from edgeproxy.proxy.exchange import Refusal

_WS_KEY = re.compile(r"[A-Za-z0-9+/]{22}==")  # base64 of exactly 16 bytes (RFC 6455 4.1)
_CHUNKED = "chunked"
# Header names as istr: a multidict lookup by a plain str folds its case into a new key per
# call; an istr carries its folded form.
_TE, _WS_KEY_NAME, _UPGRADE = istr("Transfer-Encoding"), istr("Sec-WebSocket-Key"), istr("Upgrade")
_HOST, _AUTHORIZATION = istr("Host"), istr("Authorization")
# Host values already found valid: a site has a handful, and a dict probe costs a tenth of
# parsing one again on every request.
_GOOD_HOSTS: dict[str, None] = {}
_GOOD_HOSTS_MAX = 4096


# The connection's framing can't be trusted after these refusals.
CLOSE = {"Connection": "close"}


def check_http1(version: tuple[int, int], headers: MultiMapping[str],
                method: str = "GET") -> Refusal | None:
    """What is wrong with an HTTP/1.x request head that llhttp let through, or None: the
    version, Transfer-Encoding and the WebSocket handshake (the HTTP/1.1 front's own checks)."""
    if version[0] != 1:
        # llhttp hands us HTTP/2.0 request lines; answering them as HTTP/1.1 would let a
        # client believe it talks h2 over this connection.
        return Refusal(505, "http_version_not_supported",
                       f"HTTP/{version[0]}.{version[1]} is not supported; use HTTP/1.1", CLOSE)
    te = headers.get(_TE)
    if te is not None:
        if version < (1, 1):
            return Refusal(400, "bad_request", "Transfer-Encoding is not defined for HTTP/1.0 "
                           "(RFC 9112 6.1); send Content-Length", CLOSE)
        if te.strip().lower() != _CHUNKED:
            # nginx's answer too: a coding we don't apply would be dropped or misframed.
            return Refusal(501, "unsupported_transfer_encoding",
                           f"Transfer-Encoding {te!r} is not supported; only 'chunked' is", CLOSE)
    keys = headers.getall(_WS_KEY_NAME, ())
    if keys and (len(keys) > 1 or not _WS_KEY.fullmatch(keys[0])):
        return Refusal(400, "bad_websocket_handshake", "Sec-WebSocket-Key must appear once and "
                       "be the base64 encoding of 16 bytes (RFC 6455 4.1)")
    upgrade = headers.get(_UPGRADE)
    if upgrade is not None and upgrade.strip().lower() == "websocket":
        body = te is not None or headers.get("Content-Length", "0").strip() != "0"
        if method != "GET" or body:
            # The replica's handshake is a GET: a POST's Content-Length sent along would leave
            # the replica waiting for a body that never comes (a 502 blamed on it), and the
            # client's body would be read as WebSocket frames.
            got = method + (" with a body" if body else "")
            return Refusal(400, "bad_websocket_handshake", "a WebSocket upgrade must be a GET "
                           f"without a body (RFC 6455 4.1), not {got}", CLOSE)
    return None


def check_request(headers: MultiMapping[str]) -> Refusal | None:
    """What is wrong with any request whatever its route and protocol, or None: the Host
    syntax and a repeated Authorization. Part of `decide`, so /explain reports it too.

    Cheap for an ordinary request: a few lookups in the C multidict and a dict probe."""
    host = headers.get(_HOST)
    if host is not None and host not in _GOOD_HOSTS:
        problem = host_problem(host)
        if problem is not None:
            return Refusal(400, "bad_host", problem)
        if len(_GOOD_HOSTS) >= _GOOD_HOSTS_MAX:  # a flood of made-up names can't grow it
            _GOOD_HOSTS.clear()
        _GOOD_HOSTS[host] = None
    if len(headers.getall(_AUTHORIZATION, ())) > 1:
        return Refusal(400, "duplicate_credentials", "the request carries more than one "
                       "Authorization header; send exactly one")
    return None


def check_credentials(headers: MultiMapping[str], names: tuple[str, ...]) -> Refusal | None:
    """A 400 when one of a route's credential headers (`names`) appears more than once."""
    for name in names:
        if len(headers.getall(name, ())) > 1:
            return Refusal(400, "duplicate_credentials", f"the request carries more than one "
                           f"{name} header, which this route reads as a credential; send "
                           "exactly one")
    return None


def check_forwarded_host(headers: MultiMapping[str]) -> Refusal | None:
    """A 400 when a trusted proxy's X-Forwarded-Host (kept and forwarded as it is) holds
    anything but comma-separated valid hosts."""
    for value in headers.getall("X-Forwarded-Host", ()):
        for part in value.split(","):
            problem = host_problem(part.strip())
            if problem is not None:
                return Refusal(400, "bad_host", "X-Forwarded-Host: " + problem)
    return None
