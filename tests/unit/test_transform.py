"""edgeproxy.routes.transform and its labels: header rules, rewrites, CORS, gzip decisions, TLS keys."""

from __future__ import annotations

import gzip
import re
import zlib

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from multidict import CIMultiDict

from edgeproxy.control.providers.files import RoutesFileError, parse_routes
from edgeproxy.core.paths import PathError, normalize_path
from edgeproxy.routes.labels import LabelError, LabelsInvalid, Routing, parse_labels
from edgeproxy.routes.model import RouteSpec
from edgeproxy.routes.transform import (
    MIN_COMPRESS,
    CorsSpec,
    HeaderRules,
    Rewrite,
    gzip_compressor,
    parse_header_name,
    parse_header_value,
    parse_origins,
    parse_prefix,
    parse_rewrite,
    should_compress,
    wants_gzip,
)

BASE = {"gateway.path": "/svc"}


def _spec(labels: dict[str, str]) -> RouteSpec:
    result = parse_labels({**BASE, **labels})
    assert isinstance(result, Routing), result
    return result.spec


def _errors(labels: dict[str, str]) -> list[LabelError]:
    with pytest.raises(LabelsInvalid) as info:
        parse_labels({**BASE, **labels})
    return info.value.errors


# --- header names and values --------------------------------------------------------------

@pytest.mark.parametrize("name", ["X-Env", "Strict-Transport-Security", "x_y", "X.Y", "A1~!"])
def test_header_name_tokens_are_accepted_as_written(name: str) -> None:
    assert parse_header_name(name) == name


@pytest.mark.parametrize("name", ["", "X Bad", "X:Y", "X(Y)", "X\r\nY", "Ünicode", "X/Y", 'X"'])
def test_header_name_that_is_no_token_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="is not an HTTP token"):
        parse_header_name(name)


@pytest.mark.parametrize("name", ["Host", "content-length", "Transfer-Encoding", "Connection",
                                  "Upgrade", "X-Auth-Subject", "x-auth-scopes", "X-Request-ID",
                                  "TE", "Trailer", "Keep-Alive", "Proxy-Connection"])
def test_headers_the_proxy_owns_cannot_be_set_by_labels(name: str) -> None:
    with pytest.raises(ValueError, match="managed by the proxy"):
        parse_header_name(name)


@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "a\nb", "a\rb", "a\x00b", "a\x7fb",
                                   "\r\n", "a\x1bb", "max-age=1\n"])
def test_header_values_with_control_characters_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match="control characters such as CR or LF"):
        parse_header_value(value)


@pytest.mark.parametrize(("value", "parsed"), [
    ("nosniff", "nosniff"), ("  padded  ", "padded"), ("a\tb", "a\tb"), ("", ""),
    ("max-age=63072000; includeSubDomains", "max-age=63072000; includeSubDomains"),
])
def test_header_values_are_trimmed(value: str, parsed: str) -> None:
    assert parse_header_value(value) == parsed


# --- HeaderRules ----------------------------------------------------------------------------

def test_header_rules_set_replaces_every_value_and_empty_removes_case_insensitively() -> None:
    rules = HeaderRules.build([("X-Env", "prod"), ("x-drop", ""), ("Cache-Control", "no-store")])
    assert rules.set == (("Cache-Control", "no-store"), ("X-Env", "prod"))  # sorted by name
    assert rules.remove == ("x-drop",)
    h = CIMultiDict([("x-env", "dev"), ("X-ENV", "test"), ("X-Drop", "1"), ("X-DROP", "2"),
                     ("Keep", "k")])
    rules.apply(h)
    assert h.getall("X-Env") == ["prod"]
    assert "X-Drop" not in h
    assert h["Cache-Control"] == "no-store"
    assert h["Keep"] == "k"


def test_header_rules_remove_of_an_absent_header_is_harmless_and_empty_rules_are_falsy() -> None:
    h = CIMultiDict([("A", "1")])
    HeaderRules.build([("Missing", "")]).apply(h)
    assert list(h.items()) == [("A", "1")]
    assert not HeaderRules()
    assert HeaderRules.build([("X", "")])
    assert HeaderRules.build([("X", "1")])


# --- rewrite ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("label", "path", "out"), [
    (r"^/v1/(.*) => /api/\1", "/v1/users/7", "/api/users/7"),
    (r"^/v1/(.*) => /api/\1", "/v1/", "/api/"),
    (r"^/v1/(.*) => /api/\1", "/v2/users", "/v2/users"),  # no match: unchanged
    (r"^/v1/(?P<rest>.*) => /api/\g<rest>", "/v1/a/b", "/api/a/b"),
    (r"  ^/old(/.*)?$   =>   /new\1  ", "/old/x", "/new/x"),
    (r"^/(\w+)/(\w+)$ => /\2/\1", "/a/b", "/b/a"),
    (r"^/files/(.*)_(.*) => /f/\1/\2", "/files/a_b", "/f/a/b"),
    (r"^/x => /y", "/x/x", "/y/x"),  # count=1: only the first match
    (r"^/v1/(.*) => /api/\1", "/v1/a%20b", "/api/a%20b"),
])
def test_rewrite_applies(label: str, path: str, out: str) -> None:
    assert parse_rewrite(label).apply(path) == out


@pytest.mark.parametrize(("label", "reason"), [
    ("^/v1/(.*) /api/", "REGEX => REPLACEMENT, e.g."),
    ("", "REGEX => REPLACEMENT, e.g."),
    (" => /api", "REGEX => REPLACEMENT where the replacement starts with '/'"),
    (r"^/v1/(.*) => api/\1", "REGEX => REPLACEMENT where the replacement starts with '/'"),
    (r"^/v1/(.*) =>", "REGEX => REPLACEMENT where the replacement starts with '/'"),
    (r"^/v1/(.* => /api/\1", "the regular expression '^/v1/(.*' is invalid"),
    (r"^/v1/[a- => /api", "the regular expression '^/v1/[a-' is invalid"),
    (r"*/v1 => /api", "the regular expression '*/v1' is invalid"),
    (r"^/v1/(.*) => /api/\2", r"the replacement '/api/\\2' is invalid"),
    (r"^/v1/.* => /api/\1", r"the replacement '/api/\\1' is invalid"),
    (r"^/v1/(.*) => /api/\g<rest>", r"the replacement '/api/\\g<rest>' is invalid"),
    (r"^/v1/(.*) => /api/\q", r"the replacement '/api/\\q' is invalid"),
])
def test_bad_rewrites_are_refused_with_the_reason(label: str, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_rewrite(label)
    assert str(info.value).startswith(reason), str(info.value)


@pytest.mark.parametrize(("label", "path"), [
    (r"^/files/(.*)_(.*) => /f/\1/\2", "/files/.._etc/passwd"),  # /f/../etc/passwd
    (r"^/files/(.*)_(.*) => /f/\1/\2", "/files/._x"),  # /f/./x
    (r"^/files/(.*)_(.*) => /\1/\2", "/files/_x"),  # //x
    (r"^/v1/(.*) => /api/\1%2F", "/v1/a"),  # encoded slash
    (r"^/v1/(.*) => /api/\1%2f", "/v1/a"),
    (r"^/v1/(.*) => /api%5C\1", "/v1/a"),  # encoded backslash
    (r"^/v1/(.*) => /api/%2e%2e/\1", "/v1/a"),  # encoded dot segment
    (r"^/v1/(.*) => /api/../\1", "/v1/a"),
    (r"^/v1/(.*) => /\1/..", "/v1/a"),
    (r"^/v1/(.*) => /api/\1", "/v1/../"),  # callers pass normalised paths, but still refused
])
def test_rewrite_never_produces_dot_segments_or_encoded_separators(label: str, path: str) -> None:
    with pytest.raises(PathError, match=r"not a canonical path|not allowed|encoded"):
        parse_rewrite(label).apply(path)


def test_rewrite_result_must_be_an_absolute_path_of_path_characters() -> None:
    # parse_rewrite refuses such replacements already; apply() does not rely on that.
    with pytest.raises(PathError, match="does not start with '/'"):
        Rewrite(re.compile("^/"), "x").apply("/abc")
    with pytest.raises(PathError, match="not allowed"):
        Rewrite(re.compile("^/(.*)"), "/a b/\\1").apply("/abc")
    with pytest.raises(PathError, match="not allowed"):
        Rewrite(re.compile("^/(.*)"), "/\\1\r\nX-Injected: 1").apply("/abc")


_SEGMENT = st.text(st.sampled_from("ab.%2Fe_~-"), max_size=6)


@given(st.lists(_SEGMENT, max_size=5))
@example(["..", "x"])
@example(["%2e%2e_x"])
@example(["a%2", "F"])
def test_rewrite_output_is_always_canonical(segments: list[str]) -> None:
    rewrite = parse_rewrite(r"^/files/(.*)_(.*) => /f/\1/\2")
    try:
        path = normalize_path("/files/" + "/".join(segments))
        out = rewrite.apply(path)
    except PathError:
        return
    assert normalize_path(out) == out
    assert "/../" not in out + "/" and "/./" not in out + "/" and "//" not in out
    assert "%2F" not in out.upper()


@pytest.mark.parametrize("label", [
    r"^/(.*) => /\1\r\nX-Injected: 1",  # template escapes become CR and LF
    r"^/(.*) => /\1\n",
    r"^/(.*) => /\0\1",  # octal escape: a NUL byte
    r"^/(.*) => /\1\t",
    r"^/(.*) => /api/\1 x",  # a space is no path character either
])
def test_rewrite_replacement_that_expands_to_control_characters_is_a_label_error(
        label: str) -> None:
    # Python's re turns \r, \n, \t and \0 in a replacement into control characters: such a
    # rewrite can never yield a usable path, so it is malformed and must fail when parsed,
    # not answer 400 to every request.
    with pytest.raises(ValueError):
        parse_rewrite(label)


# --- add_prefix ------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "out"), [
    ("/internal", "/internal"), ("/internal/", "/internal"), (" /a/b ", "/a/b"), ("/", ""),
])
def test_add_prefix(value: str, out: str) -> None:
    assert parse_prefix(value) == out


@pytest.mark.parametrize(("value", "reason"), [
    ("internal", "a path starting with '/', e.g. /internal"),
    ("/a/../b", "path '/a/../b' is not canonical; write '/b'"),
    ("/a//b", "path '/a//b' is not canonical; write '/a/b'"),
    ("/a%2Fb", "path '/a%2Fb': the path holds an encoded slash (%2F)"),
    ("/../a", "path '/../a': the path climbs above the root with '..'"),
])
def test_bad_add_prefix(value: str, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_prefix(value)
    assert str(info.value) == reason


# --- CORS ------------------------------------------------------------------------------------

APP, ADMIN, EVIL = "https://app.example.com", "https://admin.example.com", "https://evil.example"


def test_cors_origin_list_parsing() -> None:
    assert parse_origins(f"{APP}, {ADMIN}/,") == frozenset({APP, ADMIN})
    assert parse_origins(" * ") is None
    assert parse_origins("http://localhost:3000") == frozenset({"http://localhost:3000"})
    for bad in ("", "*, https://a.example", "app.example.com", "https://a.example/path",
                "ftp://a.example", "https://a.example:99999x"):
        with pytest.raises(ValueError):
            parse_origins(bad)


def test_cors_preflight_for_an_allowed_origin() -> None:
    cors = CorsSpec(frozenset({APP, ADMIN}), ("GET", "POST", "PUT"), ("Content-Type", "X-Api-Key"),
                    credentials=True, max_age=600)
    assert cors.preflight_headers(ADMIN, "x-api-key") == {
        "Access-Control-Allow-Origin": ADMIN,
        "Access-Control-Allow-Methods": "GET, POST, PUT",
        "Access-Control-Allow-Headers": "Content-Type, X-Api-Key",
        "Access-Control-Allow-Credentials": "true",
        "Access-Control-Max-Age": "600",
        "Vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
    }


def test_cors_preflight_without_a_header_list_reflects_the_request_and_omits_unset_parts() -> None:
    cors = CorsSpec(frozenset({APP}))
    out = cors.preflight_headers(APP, "X-Custom, Content-Type")
    assert out["Access-Control-Allow-Headers"] == "X-Custom, Content-Type"
    assert out["Access-Control-Allow-Methods"] == "GET, HEAD, POST"
    assert "Access-Control-Allow-Credentials" not in out
    assert "Access-Control-Max-Age" not in out
    assert "Access-Control-Allow-Headers" not in cors.preflight_headers(APP, None)
    assert CorsSpec(frozenset({APP}), max_age=0).preflight_headers(APP, None)[
        "Access-Control-Max-Age"] == "0"


@pytest.mark.parametrize("origin", [EVIL, "null", "https://app.example.com.evil.example",
                                    "http://app.example.com", APP + ":443", APP + "/"])
def test_cors_disallowed_origin_gets_no_cors_headers(origin: str) -> None:
    cors = CorsSpec(frozenset({APP}), credentials=True, expose=("X-Request-ID",))
    assert cors.allow_origin(origin) is None
    assert cors.preflight_headers(origin, "X-Api-Key") == {"Vary": "Origin"}
    assert cors.response_headers(origin) == {}


def test_cors_actual_response_headers() -> None:
    listed = CorsSpec(frozenset({APP}), credentials=True, expose=("X-Request-ID", "ETag"))
    assert listed.response_headers(APP) == {
        "Access-Control-Allow-Origin": APP, "Vary": "Origin",
        "Access-Control-Allow-Credentials": "true",
        "Access-Control-Expose-Headers": "X-Request-ID, ETag",
    }
    anyone = CorsSpec(None)
    assert anyone.allow_origin(EVIL) == "*"
    assert anyone.response_headers(EVIL) == {"Access-Control-Allow-Origin": "*"}  # no Vary
    assert anyone.preflight_headers(EVIL, None)["Access-Control-Allow-Origin"] == "*"


# --- gzip ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("accept", "wanted"), [
    ("gzip", True), ("GZIP", True), ("deflate, gzip, br", True), ("gzip;q=0.5", True),
    ("gzip; q=1.0", True), ("*", True), ("br;q=1, *;q=0.1", True),
    ("", False), ("br", False), ("identity", False), ("deflate, br", False),
    ("gzip;q=0", False), ("gzip; q=0.000", False), ("*;q=0", False), ("gzip;q=zero", False),
    ("gzip;q=0, *", False),  # explicit refusal wins over the wildcard
])
def test_wants_gzip(accept: str, wanted: bool) -> None:
    assert wants_gzip(accept) is wanted


def test_wants_gzip_explicit_refusal_wins_over_an_earlier_wildcard() -> None:
    # RFC 9110 12.5.3: '*' matches codings *not listed*; gzip;q=0 says "never gzip",
    # wherever it appears in the list.
    assert wants_gzip("*;q=1, gzip;q=0") is False
    assert wants_gzip("*, gzip;q=0") is False


def _h(**headers: str) -> CIMultiDict[str]:
    return CIMultiDict((k.replace("_", "-"), v) for k, v in headers.items())


BIG = str(MIN_COMPRESS)


@pytest.mark.parametrize(("method", "status", "headers", "accept", "compress"), [
    ("GET", 200, _h(Content_Type="text/plain"), "gzip", True),
    ("GET", 200, _h(content_type="text/html; charset=utf-8", Content_Length=BIG), "gzip", True),
    ("POST", 201, _h(Content_Type="application/json"), "gzip", True),
    ("GET", 200, _h(Content_Type="application/vnd.api+json"), "gzip", True),
    ("GET", 200, _h(Content_Type="application/problem+json"), "gzip", True),
    ("GET", 200, _h(Content_Type="image/svg+xml"), "gzip", True),
    ("GET", 200, _h(Content_Type="application/javascript"), "gzip", True),
    ("GET", 404, _h(Content_Type="text/html"), "gzip", True),
    ("GET", 200, _h(Content_Type="TEXT/CSS"), "gzip", True),
    # the client does not accept it
    ("GET", 200, _h(Content_Type="text/plain"), "", False),
    ("GET", 200, _h(Content_Type="text/plain"), "br, deflate", False),
    ("GET", 200, _h(Content_Type="text/plain"), "gzip;q=0", False),
    # not compressible, or no type at all
    ("GET", 200, _h(Content_Type="image/png"), "gzip", False),
    ("GET", 200, _h(Content_Type="application/octet-stream"), "gzip", False),
    ("GET", 200, _h(Content_Type="application/zip"), "gzip", False),
    ("GET", 200, _h(Content_Type="video/mp4"), "gzip", False),
    ("GET", 200, _h(), "gzip", False),
    # the backend already encoded it
    ("GET", 200, _h(Content_Type="text/plain", Content_Encoding="gzip"), "gzip", False),
    ("GET", 200, _h(Content_Type="text/plain", content_encoding="br"), "gzip", False),
    # too small to be worth it
    ("GET", 200, _h(Content_Type="text/plain", Content_Length=str(MIN_COMPRESS - 1)), "gzip",
     False),
    ("GET", 200, _h(Content_Type="text/plain", Content_Length="0"), "gzip", False),
    # no body, or a body that is a byte range of another representation
    ("HEAD", 200, _h(Content_Type="text/plain"), "gzip", False),
    ("GET", 204, _h(Content_Type="text/plain"), "gzip", False),
    ("GET", 304, _h(Content_Type="text/plain"), "gzip", False),
    ("GET", 206, _h(Content_Type="text/plain"), "gzip", False),
    ("GET", 101, _h(Content_Type="text/plain"), "gzip", False),
])
def test_should_compress(method: str, status: int, headers: CIMultiDict[str], accept: str,
                         compress: bool) -> None:
    assert should_compress(method, status, headers, accept) is compress


def test_gzip_compressor_streams_a_valid_gzip_member() -> None:
    data = b"".join(b"line %d\n" % i for i in range(50_000))
    comp = gzip_compressor()
    pieces = [comp.compress(data[i:i + 65536]) for i in range(0, len(data), 65536)]
    pieces.append(comp.flush())
    assert sum(1 for p in pieces[:-1] if p) >= 1  # output before the end: not buffered whole
    body = b"".join(pieces)
    assert body[:2] == b"\x1f\x8b"
    assert gzip.decompress(body) == data
    assert len(body) < len(data) // 4
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    assert d.decompress(body) + d.flush() == data


# --- labels --------------------------------------------------------------------------------

def test_every_transformation_label_parses_into_the_spec() -> None:
    spec = _spec({
        "gateway.request.headers.X-Env": "prod",
        "gateway.request.headers.X-Remove": "",
        "gateway.response.headers.Strict-Transport-Security": "max-age=63072000",
        "gateway.response.headers.X-Content-Type-Options": " nosniff ",
        "gateway.response.headers.Server": "",
        "gateway.rewrite": r"^/v1/(.*) => /api/\1",
        "gateway.add_prefix": "/internal/",
        "gateway.cors.origins": f"{APP},{ADMIN}",
        "gateway.cors.methods": "get, post,PUT",
        "gateway.cors.headers": "Content-Type, X-Api-Key",
        "gateway.cors.expose": "X-Request-ID",
        "gateway.cors.credentials": "true",
        "gateway.cors.max_age": "600",
        "gateway.compress": "true",
        "gateway.scheme": "HTTPS",
        "gateway.tls.verify": "false",
        "gateway.tls.ca": "/etc/edgeproxy/ca.pem",
        "gateway.tls.server_name": "Orders.Internal",
        "gateway.max_body": "10m",
    })
    assert spec.request_headers == HeaderRules((("X-Env", "prod"),), ("X-Remove",))
    assert spec.response_headers == HeaderRules(
        (("Strict-Transport-Security", "max-age=63072000"), ("X-Content-Type-Options", "nosniff")),
        ("Server",))
    assert spec.rewrite is not None and spec.rewrite.apply("/v1/x") == "/api/x"
    assert spec.add_prefix == "/internal"
    assert spec.cors == CorsSpec(frozenset({APP, ADMIN}), ("GET", "POST", "PUT"),
                                 ("Content-Type", "X-Api-Key"), True, 600, ("X-Request-ID",))
    assert spec.compress is True
    assert (spec.scheme, spec.tls_verify, spec.tls_ca, spec.tls_server_name) == (
        "https", False, "/etc/edgeproxy/ca.pem", "orders.internal")
    assert spec.max_body == 10 * 1024**2


def test_transformation_defaults() -> None:
    spec = _spec({})
    assert not spec.request_headers and not spec.response_headers
    assert (spec.rewrite, spec.add_prefix, spec.cors, spec.compress) == (None, None, None, False)
    assert (spec.scheme, spec.tls_verify, spec.tls_ca, spec.tls_server_name) == (
        "http", True, None, None)
    assert spec.max_body is None
    assert _spec({"gateway.cors.origins": "*"}).cors == CorsSpec(None)
    assert _spec({"gateway.max_body": "0"}).max_body == 0  # unlimited on this route
    assert _spec({"gateway.scheme": "https"}).tls_verify is True


def test_same_transformations_give_equal_specs() -> None:
    # Replicas are grouped by spec: the compiled rewrite and the rules must compare by value.
    labels = {"gateway.rewrite": r"^/v1/(.*) => /api/\1", "gateway.request.headers.X-A": "1",
              "gateway.cors.origins": APP}
    assert _spec(labels) == _spec(dict(labels))
    assert hash(_spec(labels)) == hash(_spec(dict(labels)))


CRLF = "ok\r\nX-Injected: 1"
CONTROL = "header values may not hold control characters such as CR or LF"


@pytest.mark.parametrize(("labels", "errors"), [
    ({"gateway.request.headers.X-Env": CRLF},
     [LabelError("gateway.request.headers.X-Env", CRLF, CONTROL)]),
    ({"gateway.response.headers.Set-Cookie": "a=1\nSet-Cookie: admin=1"},
     [LabelError("gateway.response.headers.Set-Cookie", "a=1\nSet-Cookie: admin=1", CONTROL)]),
    ({"gateway.response.headers.X-A": "a\rb"},
     [LabelError("gateway.response.headers.X-A", "a\rb", CONTROL)]),
    ({"gateway.request.headers.X-A": "a\x00"},
     [LabelError("gateway.request.headers.X-A", "a\x00", CONTROL)]),
    ({"gateway.request.headers.X Bad": "1"},
     [LabelError("gateway.request.headers.X Bad", "1",
                 "header name 'X Bad' is not an HTTP token (letters, digits, -)")]),
    ({"gateway.response.headers.": "1"},
     [LabelError("gateway.response.headers.", "1",
                 "header name '' is not an HTTP token (letters, digits, -)")]),
    ({"gateway.request.headers.X\r\nEvil": "1"},
     [LabelError("gateway.request.headers.X\r\nEvil", "1",
                 "header name 'X\\r\\nEvil' is not an HTTP token (letters, digits, -)")]),
    ({"gateway.request.headers.Host": "evil.example"},
     [LabelError("gateway.request.headers.Host", "evil.example",
                 "header 'Host' is managed by the proxy and cannot be set by a label")]),
    ({"gateway.request.headers.X-Auth-Subject": "admin"},
     [LabelError("gateway.request.headers.X-Auth-Subject", "admin",
                 "header 'X-Auth-Subject' is managed by the proxy and cannot be set by a label")]),
    ({"gateway.response.headers.Content-Length": ""},
     [LabelError("gateway.response.headers.Content-Length", "",
                 "header 'Content-Length' is managed by the proxy and cannot be set by a label")]),
    ({"gateway.rewrite": r"^/v1/(.*) => /api/\2"},
     [LabelError("gateway.rewrite", r"^/v1/(.*) => /api/\2",
                 r"the replacement '/api/\\2' is invalid: invalid group reference 2 at "
                 "position 6")]),
    ({"gateway.rewrite": "/v1"},
     [LabelError("gateway.rewrite", "/v1", r"REGEX => REPLACEMENT, e.g. ^/v1/(.*) => /api/\1")]),
    ({"gateway.add_prefix": "internal"},
     [LabelError("gateway.add_prefix", "internal", "a path starting with '/', e.g. /internal")]),
    ({"gateway.scheme": "ftp"}, [LabelError("gateway.scheme", "ftp", "http, https, h2c or h2")]),
    ({"gateway.scheme": "grpc"},
     [LabelError("gateway.scheme", "grpc", "http, https, h2c or h2")]),
    ({"gateway.scheme": "h2c", "gateway.tls.verify": "false"},
     [LabelError("gateway.tls.verify", "false", "needs gateway.scheme=https or h2")]),
    ({"gateway.compress": "gzip"}, [LabelError("gateway.compress", "gzip", "true or false")]),
    ({"gateway.max_body": "ten"},
     [LabelError("gateway.max_body", "ten", "a size such as 512k, 10m or 1g (0 = unlimited)")]),
    ({"gateway.max_body": "-1m"},
     [LabelError("gateway.max_body", "-1m", "a size such as 512k, 10m or 1g (0 = unlimited)")]),
    ({"gateway.cors.origins": "app.example.com"},
     [LabelError("gateway.cors.origins", "app.example.com",
                 "origin 'app.example.com' is not scheme://host[:port], e.g. "
                 "https://app.example.com")]),
    ({"gateway.cors.origins": f"*,{APP}"},
     [LabelError("gateway.cors.origins", f"*,{APP}",
                 "'*' alone, or comma-separated origins such as https://app.example.com")]),
    ({"gateway.cors.origins": APP, "gateway.cors.methods": "GET POST"},
     [LabelError("gateway.cors.methods", "GET POST",
                 "comma-separated methods such as GET, POST, PUT")]),
    ({"gateway.cors.origins": APP, "gateway.cors.headers": "X-A, X B"},
     [LabelError("gateway.cors.headers", "X-A, X B",
                 "comma-separated header names such as Content-Type, X-Api-Key")]),
    ({"gateway.cors.origins": APP, "gateway.cors.max_age": "86401"},
     [LabelError("gateway.cors.max_age", "86401", "seconds: a whole number from 0 to 86400")]),
    ({"gateway.cors.origins": APP, "gateway.cors.credentials": "sometimes"},
     [LabelError("gateway.cors.credentials", "sometimes", "true or false")]),
    ({"gateway.cors.origins": "*", "gateway.cors.credentials": "true"},
     [LabelError("gateway.cors.credentials", "true",
                 "browsers refuse credentials with gateway.cors.origins=*: list the allowed "
                 "origins instead")]),
    ({"gateway.cors.methods": "GET"},
     [LabelError("gateway.cors.methods", "GET",
                 "needs gateway.cors.origins (e.g. https://app.example.com)")]),
    ({"gateway.cors.credentials": "true", "gateway.cors.max_age": "600"},
     [LabelError("gateway.cors.credentials", "true",
                 "needs gateway.cors.origins (e.g. https://app.example.com)")]),
    ({"gateway.tls.verify": "false"},
     [LabelError("gateway.tls.verify", "false", "needs gateway.scheme=https or h2")]),
    ({"gateway.scheme": "http", "gateway.tls.ca": "/ca.pem", "gateway.tls.server_name": "a.test"},
     [LabelError("gateway.tls.ca", "/ca.pem", "needs gateway.scheme=https or h2"),
      LabelError("gateway.tls.server_name", "a.test", "needs gateway.scheme=https or h2")]),
    ({"gateway.scheme": "https", "gateway.tls.ca": "ca.pem"},
     [LabelError("gateway.tls.ca", "ca.pem",
                 "an absolute path to a PEM CA bundle inside the proxy container")]),
    ({"gateway.scheme": "https", "gateway.tls.server_name": "*.internal"},
     [LabelError("gateway.tls.server_name", "*.internal", "one host name, e.g. orders.internal")]),
    ({"gateway.scheme": "https", "gateway.tls.server_name": "a.test,b.test"},
     [LabelError("gateway.tls.server_name", "a.test,b.test",
                 "one host name, e.g. orders.internal")]),
    ({"gateway.scheme": "https", "gateway.tls.verify": "nope"},
     [LabelError("gateway.tls.verify", "nope", "true or false")]),
])
def test_transformation_label_errors(labels: dict[str, str], errors: list[LabelError]) -> None:
    assert _errors(labels) == errors


def test_bad_regex_label_names_the_regex_and_the_compiler_error() -> None:
    [error] = _errors({"gateway.rewrite": r"^/v1/(.* => /api/\1"})
    assert (error.label, error.value) == ("gateway.rewrite", r"^/v1/(.* => /api/\1")
    assert error.reason.startswith("the regular expression '^/v1/(.*' is invalid: missing ),")


def test_every_bad_transformation_label_is_reported_at_once() -> None:
    errors = _errors({
        "gateway.request.headers.X-A": CRLF,
        "gateway.response.headers.X B": "1",
        "gateway.rewrite": "^(/ => /x",
        "gateway.scheme": "ftp",
        "gateway.max_body": "big",
    })
    assert [e.label for e in errors] == ["gateway.max_body", "gateway.request.headers.X-A",
                                         "gateway.response.headers.X B", "gateway.rewrite",
                                         "gateway.scheme"]


def test_disabled_container_with_bad_transformation_labels_is_not_an_error() -> None:
    result = parse_labels({**BASE, "gateway.enable": "false",
                           "gateway.request.headers.X-A": CRLF})
    assert not isinstance(result, Routing)


def test_routes_file_refuses_header_injection_and_takes_the_scheme_from_the_urls() -> None:
    with pytest.raises(RoutesFileError) as info:
        parse_routes({"routes": {"x": {"path": "/x", "upstreams": ["http://127.0.0.1:1"],
                                       "request": {"headers": {"X-A": CRLF}}}}})
    assert "routes.x.request.headers.X-A" in str(info.value)
    assert "control characters" in str(info.value)
    with pytest.raises(RoutesFileError, match=r"routes\.x\.tls\.ca=.*needs routes\.x\.scheme=https"):
        parse_routes({"routes": {"x": {"path": "/x", "upstreams": ["http://127.0.0.1:1"],
                                       "tls.ca": "/ca.pem"}}})
    [route] = parse_routes({"routes": {"x": {
        "path": "/x", "upstreams": ["https://127.0.0.1:1"], "tls.ca": "/ca.pem",
        "tls.server_name": "backend.test", "compress": True, "max_body": "1k"}}})
    assert (route.spec.scheme, route.spec.tls_ca, route.spec.tls_server_name) == (
        "https", "/ca.pem", "backend.test")
    assert route.spec.compress is True and route.spec.max_body == 1024
