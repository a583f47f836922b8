"""IP allow/deny lists: parsing and matching (pure)."""

from __future__ import annotations

import ipaddress

import pytest

from edgeproxy.policies.iplist import IpRules, client_ip, parse_cidrs


def nets(*texts: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(t) for t in texts)


@pytest.mark.parametrize(("value", "expected"), [
    ("10.0.0.0/8", nets("10.0.0.0/8")),
    (" 10.0.0.0/8 , 192.168.1.7 ,::1, fd00::/8", nets("10.0.0.0/8", "192.168.1.7/32", "::1/128",
                                                       "fd00::/8")),
    ("10.0.0.0/8,10.0.0.0/8", nets("10.0.0.0/8")),
    ("0.0.0.0/0,::/0", nets("0.0.0.0/0", "::/0")),
])
def test_parse(value: str, expected: tuple[object, ...]) -> None:
    assert parse_cidrs(value) == expected


@pytest.mark.parametrize(("value", "why"), [
    ("", "CIDR blocks or addresses"),
    (" , ", "CIDR blocks or addresses"),
    ("10.0.0.1/8", "'10.0.0.1/8' has host bits set; write '10.0.0.0/8'"),
    ("fd00::1/8", "write 'fd00::/8'"),
    ("10.0.0.0/33", "is not an IP address or CIDR block"),
    ("lan", "'lan' is not an IP address"),
    ("10.0.0.0/8;", "is not an IP address"),
])
def test_parse_errors(value: str, why: str) -> None:
    with pytest.raises(ValueError, match=why.replace("(", r"\(").replace(".", r"\.")):
        parse_cidrs(value)


ALLOW_LAN = IpRules(allow=nets("10.0.0.0/8", "192.168.0.0/16", "::1/128"),
                    deny=nets("10.6.6.0/24"))


@pytest.mark.parametrize(("rules", "address", "allowed"), [
    (ALLOW_LAN, "10.1.2.3", True),
    (ALLOW_LAN, "192.168.1.1", True),
    (ALLOW_LAN, "::1", True),
    (ALLOW_LAN, "10.6.6.6", False),  # deny wins inside an allowed block
    (ALLOW_LAN, "8.8.8.8", False),
    (ALLOW_LAN, "::2", False),
    (ALLOW_LAN, "::ffff:10.1.2.3", True),  # IPv4-mapped: matched as IPv4
    (ALLOW_LAN, "fe80::1%eth0", False),
    (ALLOW_LAN, "", False),  # no address (Unix socket peer): never passes a list
    (ALLOW_LAN, "unknown", False),  # a garbled X-Forwarded-For hop
    (IpRules(deny=nets("203.0.113.0/24")), "203.0.113.9", False),
    (IpRules(deny=nets("203.0.113.0/24")), "198.51.100.1", True),  # deny only: others pass
    (IpRules(deny=nets("203.0.113.0/24")), "2001:db8::1", True),
    (IpRules(allow=nets("2001:db8::/32")), "2001:db8::1", True),
    (IpRules(allow=nets("2001:db8::/32")), "127.0.0.1", False),
    (IpRules(deny=nets("::/0")), "127.0.0.1", True),  # IPv6 lists don't cover IPv4
])
def test_allows(rules: IpRules, address: str, allowed: bool) -> None:
    assert rules.allows(address) is allowed


def test_client_ip() -> None:
    assert client_ip("::ffff:127.0.0.2") == ipaddress.ip_address("127.0.0.2")
    assert client_ip("fe80::1%lo") == ipaddress.ip_address("fe80::1")
    assert client_ip("x") is None
