"""Request-head semantics: Host syntax, versions, Transfer-Encoding, credentials, WebSocket keys."""

from __future__ import annotations

import base64
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from edgeproxy.core.hosts import HostError, host_problem, parse_host
from edgeproxy.proxy.exchange import Refusal
from edgeproxy.proxy.requestcheck import (
    CLOSE,
    check_credentials,
    check_forwarded_host,
    check_http1,
    check_request,
)

KEY = base64.b64encode(b"0123456789abcdef").decode()


@pytest.mark.parametrize(("value", "expected"), [
    ("hosted.test", ("hosted.test", None)),
    ("Hosted.TEST.", ("hosted.test", None)),  # case and the FQDN dot: one name for matching
    ("hosted.test:8080", ("hosted.test", 8080)),
    ("hosted.test:0", ("hosted.test", 0)),
    ("hosted.test:65535", ("hosted.test", 65535)),
    ("my_service-1", ("my_service-1", None)),
    ("127.0.0.1:80", ("127.0.0.1", 80)),
    ("[::1]", ("::1", None)),
    ("[::1]:8081", ("::1", 8081)),
    ("[2001:DB8::1]:443", ("2001:db8::1", 443)),
    ("[::ffff:127.0.0.1]", ("::ffff:7f00:1", None)),
    ("a" * 63 + "." + "b" * 63, ("a" * 63 + "." + "b" * 63, None)),
])
def test_valid_hosts_parse(value: str, expected: tuple[str, int | None]) -> None:
    assert parse_host(value) == expected
    assert host_problem(value) is None


@pytest.mark.parametrize("value", [
    "",                               # nginx refuses an empty Host too
    "hosted.test:1@evil.test",        # userinfo-looking: the review's finding
    "user@hosted.test",
    "hosted.test/evil",
    "hosted.test\\evil",
    "hosted test",
    " hosted.test",
    "hosted.test:",                   # a colon without a port
    "hosted.test:http",
    "hosted.test:80:80",
    "hosted.test:65536",
    "hosted.test:123456",
    "hosted.test:-1",
    "hosted.test:+80",
    "hosted.test:\u0663",                # a non-ASCII digit
    "hosté.test",
    "hosted..test",
    ".hosted.test",
    "hosted.test..",
    "a" * 64 + ".test",               # a DNS label is at most 63 octets
    ("a" * 50 + ".") * 5 + "test",    # a DNS name is at most 253 octets
    "hosted.test,evil.test",          # would split X-Forwarded-Host lists
    "hosted.test;evil",
    "hosted%2etest",
    "hosted.test#x",
    "hosted.test?x",
    "[::1",
    "[::1]x",
    "[::1]:",
    "[::1]:99999",
    "[fe80::1%25eth0]",              # zone ids: nothing a replica can be
    "[v1.fe]",                        # IPvFuture
    "[127.0.0.1]",
    "[::\u0661]",                        # int() would read an Arabic-Indic digit
    "::1",
    "hosted.test\x00",
    "hosted.test\t",
])
def test_invalid_hosts_are_refused(value: str) -> None:
    with pytest.raises(HostError) as info:
        parse_host(value)
    assert repr(value) in str(info.value)  # the message names the value
    assert host_problem(value) is not None


@given(st.ip_addresses(), st.one_of(st.none(), st.integers(0, 65535)))
def test_every_ip_address_with_any_port_is_valid(ip: ipaddress.IPv4Address |
                                                  ipaddress.IPv6Address, port: int | None) -> None:
    literal = f"[{ip}]" if ip.version == 6 else str(ip)
    value = literal if port is None else f"{literal}:{port}"
    assert parse_host(value) == (ip.compressed, port)


@given(st.text(max_size=40))
def test_a_valid_host_holds_only_name_characters(value: str) -> None:
    # Whatever is accepted is safe to forward raw: no space, '/', '@', ',', control or non-ASCII.
    if host_problem(value) is None:
        assert value.isascii() and value.isprintable()
        assert not set(value) & set(" /\\@,;?#%\"'<>")


def head(*pairs: tuple[str, str]) -> CIMultiDict[str]:
    return CIMultiDict(pairs)


def check_head(version: tuple[int, int], headers: CIMultiDict[str]) -> Refusal | None:
    """Both checks, as an HTTP/1.1 request meets them (the front's, then decide's)."""
    return check_http1(version, headers) or check_request(headers)


@pytest.mark.parametrize(("version", "headers", "status", "code"), [
    ((1, 1), head(("Host", "a.test")), None, None),
    ((1, 0), head(), None, None),
    ((1, 1), head(("Host", "a.test"), ("Transfer-Encoding", "chunked")), None, None),
    ((1, 1), head(("Host", "a.test"), ("Transfer-Encoding", " Chunked ")), None, None),
    ((1, 1), head(("Host", "a.test"), ("Authorization", "Bearer x")), None, None),
    ((1, 1), head(("Host", "a.test"), ("Sec-WebSocket-Key", KEY)), None, None),
    ((2, 0), head(("Host", "a.test")), 505, "http_version_not_supported"),
    ((0, 9), head(), 505, "http_version_not_supported"),
    ((1, 1), head(("Host", "a.test:1@evil.test")), 400, "bad_host"),
    ((1, 1), head(("Host", "")), 400, "bad_host"),
    ((1, 0), head(("Host", "a b")), 400, "bad_host"),
    ((1, 1), head(("Host", "a.test"), ("Transfer-Encoding", "gzip, chunked")), 501,
     "unsupported_transfer_encoding"),
    ((1, 1), head(("Host", "a.test"), ("Transfer-Encoding", "gzip")), 501,
     "unsupported_transfer_encoding"),
    ((1, 1), head(("Host", "a.test"), ("Transfer-Encoding", "identity")), 501,
     "unsupported_transfer_encoding"),
    ((1, 1), head(("Host", "a.test"), ("Transfer-Encoding", "")), 501,
     "unsupported_transfer_encoding"),
    ((1, 0), head(("Host", "a.test"), ("Transfer-Encoding", "chunked")), 400, "bad_request"),
    ((1, 1), head(("Host", "a.test"), ("Authorization", "Bearer a"),
                  ("authorization", "Bearer b")), 400, "duplicate_credentials"),
    ((1, 1), head(("Host", "a.test"), ("Authorization", ""), ("Authorization", "")), 400,
     "duplicate_credentials"),
    ((1, 1), head(("Host", "a.test"), ("Sec-WebSocket-Key", "é" * 24)), 400,
     "bad_websocket_handshake"),
    ((1, 1), head(("Host", "a.test"), ("Sec-WebSocket-Key", "short==")), 400,
     "bad_websocket_handshake"),
    ((1, 1), head(("Host", "a.test"), ("Sec-WebSocket-Key", "!" + KEY[1:])), 400,
     "bad_websocket_handshake"),
    ((1, 1), head(("Host", "a.test"), ("Sec-WebSocket-Key", KEY), ("Sec-WebSocket-Key", KEY)),
     400, "bad_websocket_handshake"),
])
def test_check_head(version: tuple[int, int], headers: CIMultiDict[str], status: int | None,
                    code: str | None) -> None:
    refusal = check_head(version, headers)
    if status is None:
        assert refusal is None
    else:
        assert refusal is not None and (refusal.status, refusal.code) == (status, code)


def test_framing_refusals_close_the_connection() -> None:
    for version, headers in (((2, 0), head(("Host", "a"))),
                             ((1, 1), head(("Host", "a"), ("Transfer-Encoding", "gzip"))),
                             ((1, 0), head(("Transfer-Encoding", "chunked")))):
        refusal = check_head(version, headers)
        assert refusal is not None and refusal.headers == CLOSE


def test_route_credentials_are_refused_when_repeated_in_any_case() -> None:
    names = ("X-Api-Key",)
    assert check_credentials(head(("X-Api-Key", "a")), names) is None
    assert check_credentials(head(("X-Api-Key", "a"), ("Other", "b")), names) is None
    refusal = check_credentials(head(("X-Api-Key", "a"), ("x-api-key", "b")), names)
    assert refusal is not None and (refusal.status, refusal.code) == (400, "duplicate_credentials")
    assert "X-Api-Key" in refusal.message
    # An underscore alias is a different header to us, and is dropped before forwarding.
    assert check_credentials(head(("X-Api-Key", "a"), ("X_Api_Key", "b")), names) is None


@pytest.mark.parametrize(("values", "ok"), [
    ((), True),
    (("a.test",), True),
    (("a.test, b.test:8443",), True),
    (("a.test", "[::1]"), True),
    (("a.test:1@evil.test",), False),
    (("a.test, evil/x",), False),
    (("a.test,",), False),
])
def test_trusted_forwarded_host_must_hold_hosts(values: tuple[str, ...], ok: bool) -> None:
    refusal = check_forwarded_host(head(*(("X-Forwarded-Host", v) for v in values)))
    assert (refusal is None) == ok


def test_valid_host_memo_is_bounded_and_never_holds_a_refused_value() -> None:
    from edgeproxy.proxy import requestcheck

    for i in range(requestcheck._GOOD_HOSTS_MAX + 100):
        assert check_head((1, 1), head(("Host", f"h{i}.test"))) is None
    assert len(requestcheck._GOOD_HOSTS) <= requestcheck._GOOD_HOSTS_MAX
    for _ in range(2):  # refused the second time too: refusals are not remembered
        refusal = check_head((1, 1), head(("Host", "h1.test:1@evil.test")))
        assert refusal is not None and refusal.code == "bad_host"
