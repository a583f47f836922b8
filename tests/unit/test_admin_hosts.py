"""The admin listener's Host guard against DNS rebinding (admin_host_allowed, pure)."""

from __future__ import annotations

import pytest

from edgeproxy.core.settings import Address
from edgeproxy.ops.admin import admin_host_allowed

LOOP = Address("127.0.0.1", 8081)
LOOP6 = Address("::1", 8081)
WILD = Address("0.0.0.0", 8081)
PRIVATE = Address("10.0.0.5", 8081)
NAMED = Address("admin.internal", 8081)
PORT80 = Address("127.0.0.1", 80)
EXTRA = (("ops.example", None), ("proxy", 9000))


@pytest.mark.parametrize(("host", "listen", "ok"), [
    (None, LOOP, True),                       # HTTP/1.0 without Host: no browser sends that
    ("127.0.0.1:8081", LOOP, True),
    ("localhost:8081", LOOP, True),
    ("LOCALHOST:8081", LOOP, True),
    ("[::1]:8081", LOOP, True),
    ("127.0.0.1:8081", LOOP6, True),
    ("[0:0::1]:8081", LOOP6, True),           # the same address, written longer
    ("127.0.0.1", PORT80, True),
    ("localhost", PORT80, True),
    ("10.0.0.5:8081", PRIVATE, True),
    ("admin.internal:8081", NAMED, True),
    ("localhost:8081", WILD, True),           # in a container: published on another port
    ("127.0.0.1:18081", WILD, True),
    ("172.17.0.2:8081", WILD, True),
    ("[::1]:1", WILD, True),
    ("ops.example", LOOP, True),              # listed without a port: any port
    ("ops.example:443", LOOP, True),
    ("proxy:9000", WILD, True),
    # refused: the rebinding shapes and their neighbours
    ("evil.test:8081", LOOP, False),
    ("evil.test", PORT80, False),
    ("evil.test:8081", WILD, False),
    ("rebind.127.0.0.1.nip.io:8081", LOOP, False),
    ("localhost.:8081", LOOP, True),           # still resolved locally, never by an attacker
    ("127.0.0.1:8082", LOOP, False),
    ("127.0.0.1", LOOP, False),               # port 80 is not this listener
    ("localhost:8081", PRIVATE, False),       # not loopback: only its own address
    ("127.0.0.1:8081", PRIVATE, False),
    ("10.0.0.5:8081", NAMED, False),
    ("proxy:9001", WILD, False),
    ("proxy", WILD, False),
    ("", LOOP, False),
    ("127.0.0.1:8081@evil.test", LOOP, False),
    ("127.0.0.1:8081 evil.test", LOOP, False),
])
def test_admin_host_allowed(host: str | None, listen: Address, ok: bool) -> None:
    assert admin_host_allowed(host, listen, EXTRA) is ok
