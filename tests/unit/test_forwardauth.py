"""Forward auth: label values and the request/response header rules (pure)."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from edgeproxy.policies.forwardauth import (
    ForwardAuthSpec,
    Original,
    auth_request_headers,
    copied_headers,
    denial_headers,
    parse_auth_url,
    parse_copied_headers,
)
from edgeproxy.proxy.access import Grant

ORIGINAL = Original("POST", "https", "app.example.com", "/admin/x?y=1", "203.0.113.7")
SPEC = ForwardAuthSpec("http://authelia:9091/api/authz/forward-auth",
                       ("Remote-User", "Remote-Groups"))


@pytest.mark.parametrize("value", [
    "http://authelia:9091/api/authz/forward-auth",
    "https://auth.example.com/api/verify?rd=https%3A%2F%2Fauth.example.com%2F",
    "http://[::1]:4180/oauth2/auth", "http://oauth2-proxy:4180/oauth2/auth"])
def test_url(value: str) -> None:
    assert parse_auth_url(value) == value


@pytest.mark.parametrize("value", ["", "authelia:9091", "ftp://x/", "http:///x", "http://x/#f",
                                   "http://x/a b", "/api/verify"])
def test_bad_url(value: str) -> None:
    with pytest.raises(ValueError, match="http\\(s\\) URL"):
        parse_auth_url(value)


def test_header_names() -> None:
    assert parse_copied_headers("Remote-User, Remote-Groups,Remote-User") == (
        "Remote-User", "Remote-Groups")
    for bad in ("", "Remote User", "X_User", "a,b c"):
        with pytest.raises(ValueError, match="header names"):
            parse_copied_headers(bad)
    for owned in ("Connection", "Host", "X-Auth-Subject", "Content-Length", "Transfer-Encoding"):
        with pytest.raises(ValueError, match="cannot be copied"):
            parse_copied_headers("Remote-User," + owned)


CLIENT = CIMultiDict([
    ("Host", "app.example.com"), ("Cookie", "authelia_session=abc"),
    ("Authorization", "Basic eA=="), ("Accept", "text/html"),
    ("Connection", "keep-alive, X-Secret-Hop"), ("X-Secret-Hop", "1"), ("Keep-Alive", "5"),
    ("Content-Length", "12"), ("Content-Type", "text/plain"), ("Transfer-Encoding", "chunked"),
    ("Expect", "100-continue"), ("Upgrade", "h2c"), ("Proxy-Authorization", "Basic x"),
    ("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-Uri", "/public"),
    ("X-Forwarded-Method", "GET"), ("X-Forwarded-Host", "public.example.com"),
    ("X-Original-URL", "https://public.example.com/"), ("X-Real-IP", "6.6.6.6"),
    ("X-Auth-Subject", "root"), ("X_Forwarded_Uri", "/public"),
    ("Remote-User", "spoofed"),
])


def test_request_headers_default_all_but_hop_body_and_forwarded() -> None:
    out = auth_request_headers(CLIENT, SPEC, ORIGINAL)
    assert list(out.items()) == [
        ("Cookie", "authelia_session=abc"), ("Authorization", "Basic eA=="),
        ("Accept", "text/html"), ("Remote-User", "spoofed"),
        ("X-Forwarded-Method", "POST"), ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "app.example.com"), ("X-Forwarded-Uri", "/admin/x?y=1"),
        ("X-Forwarded-For", "203.0.113.7"),
    ]


def test_request_headers_named_only() -> None:
    spec = ForwardAuthSpec(SPEC.url, (), ("Cookie", "connection", "X-Forwarded-Uri"))
    out = auth_request_headers(CLIENT, spec, ORIGINAL)
    # a named hop-by-hop or forwarded header still never comes from the client
    assert list(out) == ["Cookie", "X-Forwarded-Method", "X-Forwarded-Proto",
                         "X-Forwarded-Host", "X-Forwarded-Uri", "X-Forwarded-For"]
    assert out["X-Forwarded-Uri"] == "/admin/x?y=1"


def test_copied_headers() -> None:
    answer = CIMultiDict([("Remote-User", "alice"), ("remote-groups", "admins"),
                          ("Remote-Groups", "dev"), ("Remote-Email", "a@x"),
                          ("Set-Cookie", "s=1")])
    assert copied_headers(answer, ("Remote-User", "Remote-Groups", "Remote-Name")) == [
        ("Remote-User", "alice"), ("Remote-Groups", "admins"), ("Remote-Groups", "dev")]
    assert copied_headers(CIMultiDict([("Remote-User", "a\r\nX-Auth-Subject: root")]),
                          ("Remote-User",)) == []
    # Every control character but TAB drops the value (it could split the replica's head).
    for code in [*range(0x20), 0x7F]:
        value = f"a{chr(code)}b"
        kept = copied_headers(CIMultiDict([("Remote-User", value)]), ("Remote-User",))
        assert kept == ([("Remote-User", value)] if code == 0x09 else []), hex(code)
    assert copied_headers(CIMultiDict([("Remote-User", "Zoë ~!")]), ("Remote-User",)) == [
        ("Remote-User", "Zoë ~!")]


def test_denial_headers() -> None:
    answer = CIMultiDict([("Location", "https://auth.example.com/?rd=x"),
                          ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"),
                          ("Content-Type", "text/html"), ("Content-Length", "10"),
                          ("Transfer-Encoding", "chunked"), ("Connection", "close, X-Hop"),
                          ("X-Hop", "1"), ("WWW-Authenticate", 'Basic realm="x"')])
    assert list(denial_headers(answer).items()) == [
        ("Location", "https://auth.example.com/?rd=x"), ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"), ("Content-Type", "text/html"),
        ("WWW-Authenticate", 'Basic realm="x"')]


def test_grant_edit() -> None:
    raw = ((b"Host", b"a"), (b"Remote-User", b"spoofed"), (b"remote-user", b"again"),
           (b"Authorization", b"Basic x"))
    grant = Grant(None, (), frozenset((b"remote-user", b"authorization")),
                  ((b"Remote-User", b"alice"),))
    assert grant.edit(raw) == ((b"Host", b"a"), (b"Remote-User", b"alice"))
    assert Grant("alice").edit(raw) is raw
