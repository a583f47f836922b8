"""Host values and URL authorities -> (name, port): the one host[:port] parser (pure), used by the
request checks, the admin's host guard and the EDGEPROXY_ADMIN_HOSTS setting."""

from __future__ import annotations

import ipaddress
import re

# A DNS-style host name: labels of letters, digits, '-' and '_' (Docker service names carry
# '_'), one optional trailing dot. Stricter than RFC 3986 reg-name on purpose: its sub-delims
# (`,;=!$&'()*+`) and percent-escapes name no host a replica can have, and only serve to split
# X-Forwarded-Host lists or Forwarded parameters differently in another parser.
_REG_NAME = re.compile(r"[A-Za-z0-9_-]{1,63}(?:\.[A-Za-z0-9_-]{1,63})*\.?")
_MAX_NAME = 254  # 253 octets of DNS name, plus the trailing dot (RFC 1035 2.3.4)
_IPV6_CHARS = re.compile(r"[0-9A-Fa-f:.]+")
_PORT = re.compile(r"[0-9]{1,5}")


class HostError(ValueError):
    """A Host value or authority that is not host[:port] (answered with 400)."""


def parse_host(value: str) -> tuple[str, int | None]:
    """Split a Host value or URL authority into (lower-case name, port or None).

    The name is a DNS-style name (without its trailing dot), a dotted IPv4 address, or an IPv6
    address without brackets. Raises HostError naming the value for anything else: userinfo,
    '/', spaces, non-ASCII, an empty or non-numeric port, a port over 65535, zone ids."""
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise HostError(f"host {value!r} opens '[' without closing it")
        literal, rest = value[1:end], value[end + 1:]
        try:
            # ipaddress alone would take zone ids (fe80::1%eth0) and non-ASCII digits.
            if not _IPV6_CHARS.fullmatch(literal):
                raise ValueError(literal)
            address = ipaddress.IPv6Address(literal)
        except ValueError:
            raise HostError(f"host {value!r} is not a valid [IPv6] address") from None
        name = address.compressed
    else:
        name, colon, port_text = value.partition(":")
        rest = colon + port_text
        if not _REG_NAME.fullmatch(name) or len(name) > _MAX_NAME:
            raise HostError(f"host {value!r} is not a host name or address (expected letters, "
                            "digits, '-', '_' and '.', then an optional :port)")
        name = name.lower().rstrip(".")
    if not rest:
        return name, None
    if rest[0] != ":" or not _PORT.fullmatch(rest[1:]) or int(rest[1:]) > 65535:
        raise HostError(f"host {value!r} has a port that is not a number from 0 to 65535")
    return name, int(rest[1:])


def host_problem(value: str) -> str | None:
    """None when `value` is a valid Host value, else why not (for a 400's message)."""
    try:
        parse_host(value)
    except HostError as exc:
        return str(exc)
    return None
