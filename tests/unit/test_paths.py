"""edgeproxy.core.paths: the one canonical path that is matched, authorised and forwarded."""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from edgeproxy.core.paths import (
    PathError,
    normalize_path,
    prefixes_of,
    split_absolute,
    split_target,
    strip_prefix,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # already canonical
        ("/", "/"),
        ("/orders", "/orders"),
        ("/orders/7", "/orders/7"),
        # trailing slash is kept, it can mean something to the backend
        ("/orders/", "/orders/"),
        ("/a/b/c/", "/a/b/c/"),
        # '//' merged
        ("//", "/"),
        ("//orders", "/orders"),
        ("/orders//7", "/orders/7"),
        ("/orders///", "/orders/"),
        # '.' segments
        ("/.", "/"),
        ("/./orders", "/orders"),
        ("/orders/.", "/orders/"),
        ("/orders/./7", "/orders/7"),
        # '..' segments
        ("/a/..", "/"),
        ("/a/../", "/"),
        ("/a/b/..", "/a/"),
        ("/a/b/../c", "/a/c"),
        ("/a/b/../../c", "/c"),
        ("/a/./b/../c/", "/a/c/"),
        # dot segments hidden behind escapes, any case
        ("/%2e/orders", "/orders"),
        ("/%2E/orders", "/orders"),
        ("/admin/%2e%2e/orders", "/orders"),
        ("/admin/%2E%2E/orders", "/orders"),
        ("/admin/.%2e/orders", "/orders"),
        ("/admin/%2e./orders", "/orders"),
        ("/admin/%2E%2e", "/"),
        # segments that merely contain dots are ordinary
        ("/...", "/..."),
        ("/a/.hidden", "/a/.hidden"),
        ("/a/b..c", "/a/b..c"),
        ("/v1.2/x", "/v1.2/x"),
        # unreserved escapes decoded (ALPHA DIGIT - . _ ~), any case
        ("/%41%42%43", "/ABC"),
        ("/%61bc", "/abc"),
        ("/%7euser", "/~user"),
        ("/%7Euser", "/~user"),
        ("/a%2Db%5Fc%2ed", "/a-b_c.d"),
        ("/%30%39", "/09"),
        # other escapes kept, upper-cased
        ("/a%20b", "/a%20b"),
        ("/%3a", "/%3A"),
        ("/%3A", "/%3A"),
        ("/caf%c3%a9", "/caf%C3%A9"),
        ("/q%3f", "/q%3F"),
        ("/h%23", "/h%23"),
        ("/%2b%2C%40", "/%2B%2C%40"),
        # sub-delims, ':' and '@' are legal pchars and stay as they are
        ("/a;b=c", "/a;b=c"),
        ("/!$&'()*+,=:@", "/!$&'()*+,=:@"),
        ("/user@host:8080", "/user@host:8080"),
    ],
)
def test_normalize_path(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        # not absolute
        ("", "the path must start with '/'"),
        ("orders", "the path must start with '/'"),
        ("*", "the path must start with '/'"),
        ("http://example.com/orders", "the path must start with '/'"),
        ("%2forders", "the path must start with '/'"),
        # escapes that hide a separator, a control byte or a second decoding
        ("/a%2Fb", "the path holds an encoded slash (%2F)"),
        ("/a%2fb", "the path holds an encoded slash (%2F)"),
        ("/a%5Cb", "the path holds an encoded backslash (%5C)"),
        ("/a%5cb", "the path holds an encoded backslash (%5C)"),
        ("/a%00", "the path holds an encoded NUL (%00)"),
        ("/a%3Bb", "the path holds an encoded semicolon (%3B)"),
        ("/a%3bb", "the path holds an encoded semicolon (%3B)"),
        ("/a%25b", "the path holds an encoded percent sign (%25)"),
        ("/%252e%252e/etc", "the path holds an encoded percent sign (%25)"),
        ("/..%2f..%2fetc", "the path holds an encoded slash (%2F)"),
        # raw characters outside RFC 3986
        ("/a\\b", "the path holds a character that is not allowed: '\\\\'"),
        ("/..\\..\\etc", "the path holds a character that is not allowed: '\\\\'"),
        ("/a b", "the path holds a character that is not allowed: ' '"),
        ("/a\x00b", "the path holds a character that is not allowed: '\\x00'"),
        ("/a\r\nb", "the path holds a character that is not allowed: '\\r'"),
        ("/a\tb", "the path holds a character that is not allowed: '\\t'"),
        ("/a\"b", "the path holds a character that is not allowed: '\"'"),
        ("/a<b>", "the path holds a character that is not allowed: '<'"),
        ("/a?b", "the path holds a character that is not allowed: '?'"),
        ("/a#b", "the path holds a character that is not allowed: '#'"),
        ("/a|b", "the path holds a character that is not allowed: '|'"),
        ("/a`b", "the path holds a character that is not allowed: '`'"),
        ("/a{b}", "the path holds a character that is not allowed: '{'"),
        ("/a^b", "the path holds a character that is not allowed: '^'"),
        # the same checks apply when the path also holds escapes
        ("/%41\\b", "the path holds a character that is not allowed: '\\\\'"),
        ("/%41 b", "the path holds a character that is not allowed: ' '"),
        # malformed escapes
        ("/%", "the path holds a malformed percent escape"),
        ("/a%", "the path holds a malformed percent escape"),
        ("/a%4", "the path holds a malformed percent escape"),
        ("/a%4/b", "the path holds a malformed percent escape"),
        ("/a%zz", "the path holds a malformed percent escape"),
        ("/a%g0", "the path holds a malformed percent escape"),
        ("/a%0g", "the path holds a malformed percent escape"),
        ("/a%%41", "the path holds a malformed percent escape"),
        # climbing above the root
        ("/..", "the path climbs above the root with '..'"),
        ("/../", "the path climbs above the root with '..'"),
        ("/../etc/passwd", "the path climbs above the root with '..'"),
        ("/a/../..", "the path climbs above the root with '..'"),
        ("/a/../../b", "the path climbs above the root with '..'"),
        ("/./..", "the path climbs above the root with '..'"),
        ("/%2e%2e/etc", "the path climbs above the root with '..'"),
        ("/%2E%2E/etc", "the path climbs above the root with '..'"),
        ("/.%2E/etc", "the path climbs above the root with '..'"),
    ],
)
def test_normalize_path_refuses(raw: str, message: str) -> None:
    with pytest.raises(PathError) as info:
        normalize_path(raw)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "raw",
    [
        "/caf\u00e9",  # non-ASCII character, not percent-encoded
        "/\u65e5\u672c",
        "/a/\U0001f600",
        "/%41/\u00e9",  # with escapes elsewhere in the path
        "/a\udcc3\udca9",  # raw non-UTF-8 bytes as surrogateescape'd by the server
        "/a\x7f",
        "/a\x80",
    ],
)
def test_normalize_path_refuses_bytes_outside_ascii(raw: str) -> None:
    with pytest.raises(PathError, match=r"^the path holds a character that is not allowed: "):
        normalize_path(raw)


def test_path_error_is_a_value_error() -> None:
    # Callers that only know ValueError (label parsing, routes file) still catch it.
    assert issubclass(PathError, ValueError)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/", ("/", "")),
        ("/orders", ("/orders", "")),
        ("/orders?", ("/orders", "")),
        ("/orders?page=2", ("/orders", "page=2")),
        ("/orders?a=1&b=2", ("/orders", "a=1&b=2")),
        ("/orders?a=1?b=2", ("/orders", "a=1?b=2")),
        ("/orders#top", ("/orders", "")),
        ("/orders?page=2#top", ("/orders", "page=2")),
        ("/orders#top?page=2", ("/orders", "")),
        ("/orders?x=%23#frag", ("/orders", "x=%23")),
        ("/a%3Fb?c", ("/a%3Fb", "c")),
    ],
)
def test_split_target(target: str, expected: tuple[str, str]) -> None:
    assert split_target(target) == expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/", ["/"]),
        ("/a", ["/a", "/"]),
        ("/a/", ["/a", "/"]),
        ("/a/b", ["/a/b", "/a", "/"]),
        ("/a/b/", ["/a/b", "/a", "/"]),
        ("/orders/7/items", ["/orders/7/items", "/orders/7", "/orders", "/"]),
        ("/ordersx", ["/ordersx", "/"]),
    ],
)
def test_prefixes_of(path: str, expected: list[str]) -> None:
    assert prefixes_of(path) == expected


@pytest.mark.parametrize(
    ("path", "prefix", "expected"),
    [
        ("/orders", "/orders", "/"),
        ("/orders/", "/orders", "/"),
        ("/orders/7", "/orders", "/7"),
        ("/orders/7/", "/orders", "/7/"),
        ("/v1/orders/7", "/v1/orders", "/7"),
        ("/v1/orders/7", "/v1", "/orders/7"),
        ("/orders", "/", "/orders"),
        ("/", "/", "/"),
        ("/orders/", "/", "/orders/"),
    ],
)
def test_strip_prefix(path: str, prefix: str, expected: str) -> None:
    assert strip_prefix(path, prefix) == expected


# --- properties -------------------------------------------------------------------------

# Building blocks chosen to hit the interesting cases often: dot segments in every spelling,
# empty segments, escapes that decode and escapes that must be refused, and stray bytes.
_PIECES = st.sampled_from([
    "/", "/", "/", ".", "..", "%2e", "%2E", "%2e%2E", ".%2e", "a", "B", "orders", "7", "~",
    "-", "_", ";", "=", ":", "@", "!", "%41", "%7e", "%7E", "%3a", "%3A", "%20", "%c3%a9",
    "%2f", "%2F", "%5c", "%00", "%25", "%3b", "%", "%4", "%zz", "\\", " ", "\u00e9", "?",
])
_PCHARS = "ABCabcxyz019-._~!$&'()*+,;=:@/%"


def _path_strategy() -> st.SearchStrategy[str]:
    pieces = st.lists(_PIECES, max_size=12).map("".join)
    chars = st.text(alphabet=_PCHARS, max_size=30)
    anything = st.text(max_size=20)
    return st.one_of(pieces, chars, anything).map(lambda s: "/" + s)


_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_DOT_SEGMENT = re.compile(r"(^|/)\.\.?(/|$)")
_BAD_ESCAPE = re.compile(r"%(2f|5c|00)", re.IGNORECASE)


def _accepted(raw: str) -> str | None:
    try:
        return normalize_path(raw)
    except PathError:
        return None


@settings(max_examples=400, deadline=None, database=None)
@given(_path_strategy())
@example("/a/%2e%2E/b/")
@example("/%7e/./%3a//")
def test_normalize_is_idempotent(raw: str) -> None:
    once = _accepted(raw)
    if once is not None:
        assert normalize_path(once) == once


@settings(max_examples=400, deadline=None, database=None)
@given(_path_strategy())
@example("/a/%2e%2E/b/")
@example("/a/.%2e/")
def test_normalized_path_shape(raw: str) -> None:
    out = _accepted(raw)
    if out is None:
        return
    assert out.startswith("/")
    assert "//" not in out
    assert not _DOT_SEGMENT.search(out), out
    assert not _BAD_ESCAPE.search(out), out
    # every escape left over is upper case and not an unreserved character
    for escape in re.findall(r"%(..)", out):
        assert escape == escape.upper()
        assert chr(int(escape, 16)) not in _UNRESERVED


@settings(max_examples=200, deadline=None, database=None)
@given(_path_strategy())
def test_normalize_only_raises_path_error(raw: str) -> None:
    # Anything else would become a 500 instead of a 400.
    _accepted(raw)


# --- absolute-form request targets (RFC 9112 3.2.2) ---------------------------------------------


@pytest.mark.parametrize(("target", "expected"), [
    ("/orders?x=1", None),
    ("*", None),
    ("ftp://example.com/x", None),
    ("http://Example.com:8080/a/b?c=d", ("Example.com:8080", "/a/b?c=d")),
    ("HTTPS://example.com", ("example.com", "/")),
    ("http://example.com?x=1", ("example.com", "/?x=1")),
    ("http://example.com#frag", ("example.com", "/#frag")),
    ("http://10.0.0.7/x", ("10.0.0.7", "/x")),
    ("http://[2001:db8::1]:8080/x", ("[2001:db8::1]:8080", "/x")),
    ("http://my_service.internal/x", ("my_service.internal", "/x")),
])
def test_split_absolute(target: str, expected: tuple[str, str] | None) -> None:
    assert split_absolute(target) == expected


@pytest.mark.parametrize(("target", "message"), [
    ("http://user:pw@example.com/x", "userinfo"),
    ("http://example.com@evil.test/x", "userinfo"),
    ("http:///x", "authority ''"),
    ("http://exa mple.com/x", "is not a host name"),
    ("http://example.com:port/x", "is not a host name"),
    ("http://-dash.example/x", "is not a host name"),
    ("http://example.com%2f.evil/x", "is not a host name"),
])
def test_split_absolute_refuses_a_bad_authority(target: str, message: str) -> None:
    with pytest.raises(PathError, match=re.escape(message)):
        split_absolute(target)
