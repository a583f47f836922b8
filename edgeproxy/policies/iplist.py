"""IP allow and deny lists (`gateway.ip.allow`, `gateway.ip.deny`): CIDR lists compiled once per
route table, checked against the client address as resolved through EDGEPROXY_TRUSTED_PROXIES.

Rules: a deny entry always wins; with an allow list, only addresses inside it pass; an address
that is not an IP at all (a Unix socket peer, a garbled X-Forwarded-For hop) never passes a list.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from edgeproxy.core.state import fast_state

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

CIDRS_EXPECTED = ("CIDR blocks or addresses, IPv4 or IPv6, comma-separated, such as "
                  "10.0.0.0/8, 192.168.1.7, fd00::/8")


def parse_cidrs(value: str) -> tuple[IPNetwork, ...]:
    """'10.0.0.0/8, ::1' -> networks; ValueError names the entry and what was expected.

    A block with host bits set (10.0.0.1/8) is refused with the block it probably meant: it
    reads like a single host but would cover the whole block."""
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if not parts:
        raise ValueError(CIDRS_EXPECTED)
    out: list[IPNetwork] = []
    for part in parts:
        try:
            net = ipaddress.ip_network(part, strict=True)
        except ValueError as exc:
            try:
                loose = ipaddress.ip_network(part, strict=False)
            except ValueError:
                raise ValueError(f"{part!r} is not an IP address or CIDR block ({exc}); "
                                 f"expected {CIDRS_EXPECTED}") from None
            raise ValueError(f"{part!r} has host bits set; write {str(loose)!r} for the block, "
                             f"or the address alone for one host") from None
        if net not in out:
            out.append(net)
    return tuple(out)


@fast_state
@dataclass(frozen=True, slots=True)
class IpRules:
    """A route's compiled lists; empty `allow` means every address not denied passes."""

    allow: tuple[IPNetwork, ...] = ()
    deny: tuple[IPNetwork, ...] = ()

    def allows(self, address: str) -> bool:
        """True when `address` (the resolved client address) may reach the route."""
        ip = client_ip(address)
        if ip is None:
            return False
        if any(ip in net for net in self.deny):
            return False
        return not self.allow or any(ip in net for net in self.allow)


def client_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address as an IP; IPv4-mapped IPv6 (::ffff:10.0.0.1) as its IPv4 address, so an
    IPv4 list also covers clients of a dual-stack listener; None when it is no IP."""
    if not address:
        return None
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
