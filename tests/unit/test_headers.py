"""edgeproxy.core.headers: what goes upstream, what comes back, who the client is."""

from __future__ import annotations

import ipaddress
import re
from email.utils import parsedate_to_datetime

import httptools
import pytest
from multidict import CIMultiDict

from edgeproxy.core.headers import (
    HopInfo,
    UpstreamHead,
    client_address,
    connection_tokens,
    downstream_from_raw,
    is_trusted,
    request_host,
    request_id,
    response_head,
    upstream_head,
    upstream_request_headers,
)
from edgeproxy.core.settings import IPNetwork

TRUSTED: tuple[IPNetwork, ...] = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))


def headers(*pairs: tuple[str, str]) -> CIMultiDict[str]:
    return CIMultiDict(pairs)


def upstream(h: CIMultiDict[str], *, trusted_peer: bool = False, peer: str = "203.0.113.7",
             client: str | None = None, scheme: str = "http", rid: str = "rid-1") -> CIMultiDict[str]:
    raw = [(k.encode(), v.encode()) for k, v in h.items()]  # as aiohttp's request.raw_headers
    return upstream_request_headers(raw, HopInfo(peer, client or peer, scheme, rid, trusted_peer))


def downstream(h: CIMultiDict[str]) -> CIMultiDict[str]:
    return downstream_from_raw([(k.encode(), v.encode()) for k, v in h.items()])


# --- upstream ---------------------------------------------------------------------------

HOP_BY_HOP = ["Connection", "Keep-Alive", "Proxy-Connection", "Proxy-Authenticate",
              "Proxy-Authorization", "TE", "Trailer", "Transfer-Encoding", "Upgrade"]


@pytest.mark.parametrize("trusted_peer", [False, True])
@pytest.mark.parametrize("name", [*HOP_BY_HOP, *(n.lower() for n in HOP_BY_HOP), "CONNECTION"])
def test_hop_by_hop_removed_upstream(name: str, trusted_peer: bool) -> None:
    out = upstream(headers(("Host", "example.com"), (name, "x"), ("Accept", "*/*")),
                   trusted_peer=trusted_peer)
    assert name not in out
    assert out.getall("Accept") == ["*/*"]
    assert out["Host"] == "example.com"


@pytest.mark.parametrize(
    "connection",
    ["close, X-Secret", "X-Secret", "x-secret,  keep-alive", "Keep-Alive,X-SECRET,", ", x-secret ,"],
)
def test_headers_named_in_connection_removed_upstream(connection: str) -> None:
    h = headers(("Connection", connection), ("X-Secret", "s"), ("X-Kept", "k"))
    out = upstream(h)
    assert "X-Secret" not in out
    assert "Connection" not in out
    assert out["X-Kept"] == "k"


def test_connection_tokens_from_several_headers() -> None:
    h = headers(("Connection", "close, X-A"), ("connection", "X-B"), ("X-A", "1"))
    assert connection_tokens(h) == {"close", "x-a", "x-b"}
    assert connection_tokens(headers()) == set()


@pytest.mark.parametrize("trusted_peer", [False, True])
@pytest.mark.parametrize("name", ["X-Auth-Subject", "x-auth-subject", "X-Auth-Scopes", "X-AUTH-SCOPES"])
def test_auth_headers_from_the_client_removed(name: str, trusted_peer: bool) -> None:
    out = upstream(headers((name, "admin"), ("Authorization", "Bearer t")), trusted_peer=trusted_peer)
    assert name not in out
    assert out["Authorization"] == "Bearer t"


@pytest.mark.parametrize("name", ["X_Auth_Subject", "X-Forwarded_For", "X_Real_IP", "custom_header"])
def test_headers_with_underscore_dropped(name: str) -> None:
    # Some backends treat '_' and '-' alike: X_Auth_Subject would become X-Auth-Subject.
    out = upstream(headers((name, "v"), ("X-Custom-Header", "ok")), trusted_peer=True)
    assert name not in out
    assert out["X-Custom-Header"] == "ok"


def test_expect_and_client_request_id_not_forwarded() -> None:
    out = upstream(headers(("Expect", "100-continue"), ("X-Request-ID", "client-id")), rid="ours")
    assert "Expect" not in out
    assert out.getall("X-Request-ID") == ["ours"]


def test_end_to_end_headers_pass_unchanged() -> None:
    h = headers(("Host", "api.example.com"), ("Accept", "a"), ("Cookie", "c=1"), ("Cookie", "d=2"),
                ("Authorization", "Bearer t"), ("Content-Type", "application/json"),
                ("Content-Length", "12"), ("X-Custom", "1"))
    out = upstream(h)
    for name in ("Host", "Accept", "Authorization", "Content-Type", "Content-Length", "X-Custom"):
        assert out.getall(name) == h.getall(name)
    assert out.getall("Cookie") == ["c=1", "d=2"]


FORWARDED_IN = (
    ("X-Forwarded-For", "6.6.6.6"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "evil.example"),
    ("X-Forwarded-Port", "443"),
    ("X-Real-IP", "6.6.6.6"),
    ("Forwarded", "for=6.6.6.6;proto=https"),
)


def test_untrusted_peer_forwarded_headers_replaced() -> None:
    h = headers(("Host", "api.example.com:8080"), *FORWARDED_IN)
    out = upstream(h, peer="203.0.113.7", scheme="http", rid="rid-1")
    assert out.getall("X-Forwarded-For") == ["203.0.113.7"]
    assert out.getall("X-Forwarded-Proto") == ["http"]
    assert out.getall("X-Forwarded-Host") == ["api.example.com:8080"]
    assert out.getall("X-Real-IP") == ["203.0.113.7"]
    assert out.getall("X-Request-ID") == ["rid-1"]
    assert "X-Forwarded-Port" not in out
    assert "Forwarded" not in out


def test_untrusted_peer_without_host_header() -> None:
    out = upstream(headers(("X-Forwarded-Host", "evil.example")))
    assert "X-Forwarded-Host" not in out


def test_untrusted_peer_several_spoofed_values_replaced() -> None:
    h = headers(("X-Forwarded-For", "1.1.1.1"), ("X-Forwarded-For", "2.2.2.2"),
                ("X-Real-IP", "1.1.1.1"), ("X-Real-IP", "2.2.2.2"))
    out = upstream(h, peer="203.0.113.7")
    assert out.getall("X-Forwarded-For") == ["203.0.113.7"]
    assert out.getall("X-Real-IP") == ["203.0.113.7"]


def test_trusted_peer_appends_to_x_forwarded_for() -> None:
    h = headers(("Host", "api.example.com"), ("X-Forwarded-For", "198.51.100.1, 10.0.0.9"),
                ("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "public.example.com"),
                ("Forwarded", "for=198.51.100.1"), ("X-Real-IP", "10.0.0.9"))
    out = upstream(h, trusted_peer=True, peer="10.0.0.2", client="198.51.100.1", scheme="http")
    assert out.getall("X-Forwarded-For") == ["198.51.100.1, 10.0.0.9, 10.0.0.2"]
    assert out.getall("X-Forwarded-Proto") == ["https"]  # what the outer proxy saw
    assert out.getall("X-Forwarded-Host") == ["public.example.com"]
    assert out.getall("Forwarded") == ["for=198.51.100.1"]
    assert out.getall("X-Real-IP") == ["198.51.100.1"]


def test_trusted_peer_joins_several_x_forwarded_for_headers() -> None:
    h = headers(("X-Forwarded-For", "198.51.100.1"), ("X-Forwarded-For", "10.0.0.9"))
    out = upstream(h, trusted_peer=True, peer="10.0.0.2")
    assert out.getall("X-Forwarded-For") == ["198.51.100.1, 10.0.0.9, 10.0.0.2"]


def test_trusted_peer_without_forwarded_headers() -> None:
    out = upstream(headers(("Host", "api.example.com")), trusted_peer=True, peer="10.0.0.2",
                   scheme="https")
    assert out.getall("X-Forwarded-For") == ["10.0.0.2"]
    assert out.getall("X-Forwarded-Proto") == ["https"]
    assert out.getall("X-Forwarded-Host") == ["api.example.com"]
    assert out.getall("X-Real-IP") == ["10.0.0.2"]


def test_input_headers_are_not_modified() -> None:
    h = headers(("Connection", "X-A"), ("X-A", "1"), ("X-Forwarded-For", "1.1.1.1"))
    before = list(h.items())
    upstream(h)
    downstream(h)
    assert list(h.items()) == before


# --- downstream -------------------------------------------------------------------------

@pytest.mark.parametrize("name", [*HOP_BY_HOP, "Content-Length", "content-length"])
def test_hop_by_hop_and_content_length_removed_downstream(name: str) -> None:
    out = downstream(headers((name, "x"), ("Content-Type", "text/plain")))
    assert name not in out
    assert out.getall("Content-Type") == ["text/plain"]


def test_headers_named_in_connection_removed_downstream() -> None:
    h = headers(("Connection", "close, X-Internal"), ("X-Internal", "1"), ("X-Public", "2"))
    out = downstream(h)
    assert list(out.items()) == [("X-Public", "2")]


def test_downstream_keeps_end_to_end_headers_and_repeats() -> None:
    h = headers(("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("Cache-Control", "no-store"),
                ("Content-Encoding", "gzip"), ("X-Request-ID", "rid"), ("X_Under", "kept"))
    assert list(downstream(h).items()) == list(h.items())


# --- client address -----------------------------------------------------------------------

@pytest.mark.parametrize(
    ("peer", "xff", "expected"),
    [
        # untrusted peer: its own address, whatever it claims
        ("203.0.113.7", ["198.51.100.1"], "203.0.113.7"),
        ("203.0.113.7", [], "203.0.113.7"),
        # trusted peer: walk right to left, skipping trusted hops
        ("10.0.0.2", ["198.51.100.1"], "198.51.100.1"),
        ("10.0.0.2", ["198.51.100.1, 10.0.0.9"], "198.51.100.1"),
        ("10.0.0.2", ["6.6.6.6, 198.51.100.1, 10.0.0.9, 10.1.2.3"], "198.51.100.1"),
        ("10.0.0.2", ["6.6.6.6", "198.51.100.1, 10.0.0.9"], "198.51.100.1"),
        ("10.0.0.2", ["198.51.100.1,10.0.0.9"], "198.51.100.1"),
        ("10.0.0.2", ["198.51.100.1, , 10.0.0.9"], "198.51.100.1"),
        ("fd00::1", ["2001:db8::1, fd00::2"], "2001:db8::1"),
        # every hop trusted: the left-most one
        ("10.0.0.2", ["10.0.0.5, 10.0.0.9"], "10.0.0.5"),
        # trusted peer without XFF: the peer
        ("10.0.0.2", [], "10.0.0.2"),
        ("10.0.0.2", [""], "10.0.0.2"),
        ("", [], ""),
    ],
)
def test_client_address(peer: str, xff: list[str], expected: str) -> None:
    h = headers(*(("X-Forwarded-For", v) for v in xff))
    assert client_address(peer, h, TRUSTED) == expected


def test_client_address_without_trusted_networks() -> None:
    h = headers(("X-Forwarded-For", "198.51.100.1"))
    assert client_address("10.0.0.2", h, ()) == "10.0.0.2"
    assert client_address(None, h, TRUSTED) == ""


@pytest.mark.parametrize(
    ("address", "trusted"),
    [
        ("10.1.2.3", True),
        ("11.1.2.3", False),
        ("fd00::5", True),
        ("fe80::1%eth0", False),
        ("fd00::1%eth0", True),
        ("", False),
        (None, False),
        ("not-an-ip", False),
        ("10.0.0.1:8080", False),
    ],
)
def test_is_trusted(address: str | None, trusted: bool) -> None:
    assert is_trusted(address, TRUSTED) is trusted


# --- request id -----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "rid",
    ["abc-123", "0f8fad5b-d9cb-469f-a165-70867728950e", "req.1:2_3", "a", "x" * 128],
)
def test_request_id_keeps_a_sane_client_id(rid: str) -> None:
    assert request_id(headers(("X-Request-ID", rid))) == rid


@pytest.mark.parametrize(
    "rid",
    [
        "",
        "x" * 129,
        "abc\r\nSet-Cookie: a=1",
        "abc\n",
        "abc\r",
        "\nabc",
        "a b",
        "abc;def",
        "<script>",
        "caf\u00e9",
        "abc\x00",
    ],
)
def test_request_id_replaces_a_hostile_one(rid: str) -> None:
    new = request_id(headers(("X-Request-ID", rid)))
    assert new != rid
    assert re.fullmatch(r"[0-9a-f]{32}", new)


def test_request_id_generated_when_missing_and_unique() -> None:
    ids = {request_id(headers()) for _ in range(50)}
    assert len(ids) == 50
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


# --- request host ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("example.com", "example.com"),
        ("Example.COM", "example.com"),
        ("example.com:8080", "example.com"),
        ("API.Example.com:443", "api.example.com"),
        ("example.com.", "example.com"),
        ("example.com.:8080", "example.com"),
        (" example.com ", "example.com"),
        ("127.0.0.1:8080", "127.0.0.1"),
        ("[::1]:8080", "::1"),
        ("[::1]", "::1"),
        ("[FD00::1]:80", "fd00::1"),
        ("", ""),
    ],
)
def test_request_host(host: str, expected: str) -> None:
    assert request_host(headers(("Host", host))) == expected


def test_request_host_missing() -> None:
    assert request_host(headers()) == ""


def test_request_host_stays_right_and_bounded_under_a_flood_of_names() -> None:
    from edgeproxy.core import headers as h
    for i in range(3 * h._HOST_NAMES_MAX):
        assert request_host(headers(("Host", f"Site{i}.Example:80"))) == f"site{i}.example"
        assert len(h._HOST_NAMES) <= h._HOST_NAMES_MAX
    # Seen before and seen again: the same answer as the first time.
    assert request_host(headers(("Host", "API.Example.com:443"))) == "api.example.com"
    assert request_host(headers(("Host", "API.Example.com:443"))) == "api.example.com"
    # A long made-up name is answered but never kept: 4096 of them would hold 100 MB.
    long_host = "A" * 20_000 + ".example"
    assert request_host(headers(("Host", long_host))) == long_host.lower()
    assert long_host not in h._HOST_NAMES


# --- response_head: the client's head for a small answer, straight from the replica's bytes ----


class _Parsed:
    """What a strict HTTP/1.1 client (llhttp) reads from a head plus body."""

    def __init__(self, data: bytes) -> None:
        self.headers: list[tuple[str, str]] = []
        self.body = b""
        self.done = False
        self.keep_alive = False
        self.parser = httptools.HttpResponseParser(self)
        self.parser.feed_data(data)
        self.status = self.parser.get_status_code()

    def on_headers_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode(), value.decode()))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True

    def getall(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


def head(raw: list[tuple[bytes, bytes]], body: bytes = b"hello", *, version: tuple[int, int] = (1, 1),
         keep_alive: bool = True, extra: dict[str, str] | None = None, status: int = 200,
         reason: str = "OK") -> _Parsed:
    data = response_head(version, status, reason, raw, "rid-1", extra, len(body), keep_alive)
    assert data.endswith(b"\r\n\r\n")
    assert data.startswith(b"HTTP/%d.%d %d %s\r\n" % (*version, status, reason.encode()))
    parsed = _Parsed(data + body)
    assert parsed.done and parsed.body == body
    return parsed


def test_response_head_drops_hop_by_hop_framing_and_connection_named_headers() -> None:
    p = head([(b"Connection", b"keep-alive, X-Secret"), (b"X-Secret", b"s"),
              (b"Keep-Alive", b"timeout=5"), (b"Transfer-Encoding", b"chunked"),
              (b"Content-Length", b"999"), (b"Upgrade", b"h2c"), (b"Trailer", b"X-T"),
              (b"Proxy-Authenticate", b"Basic"), (b"X-End", b"e"),
              (b"Set-Cookie", b"a=1"), (b"set-cookie", b"b=2")])
    names = {k.lower() for k, _ in p.headers}
    assert not names & {"connection", "x-secret", "keep-alive", "transfer-encoding", "upgrade",
                        "trailer", "proxy-authenticate"}
    assert p.getall("Content-Length") == ["5"]  # ours, from the body we send, never the replica's
    assert p.getall("X-End") == ["e"]
    assert p.getall("Set-Cookie") == ["a=1", "b=2"]  # repeated headers keep order and count


def test_response_head_replaces_the_replicas_request_id_and_our_extra_headers() -> None:
    p = head([(b"X-Request-ID", b"theirs"), (b"ratelimit-policy", b"bogus"), (b"X-Keep", b"k")],
             extra={"RateLimit-Policy": "10;w=60", "RateLimit": "limit=10, remaining=9, reset=60"})
    assert p.getall("X-Request-ID") == ["rid-1"]
    assert p.getall("RateLimit-Policy") == ["10;w=60"]
    assert p.getall("RateLimit") == ["limit=10, remaining=9, reset=60"]
    assert p.getall("X-Keep") == ["k"]


def test_response_head_passes_value_bytes_through_unchanged() -> None:
    p = head([(b"X-Bytes", "caf\u00e9".encode())])
    assert p.getall("X-Bytes") == ["caf\u00e9"]


def test_response_head_adds_date_and_type_only_when_missing_and_never_a_server() -> None:
    p = head([])
    (date,) = p.getall("Date")
    assert parsedate_to_datetime(date).tzinfo is not None
    assert p.getall("Server") == []  # no versions of ours leak
    assert p.getall("Content-Type") == ["application/octet-stream"]
    kept = head([(b"Date", b"Mon, 01 Jan 2024 00:00:00 GMT"), (b"server", b"nginx"),
                 (b"Content-Type", b"text/plain")])
    assert kept.getall("Date") == ["Mon, 01 Jan 2024 00:00:00 GMT"]
    assert kept.getall("Server") == ["nginx"]
    assert kept.getall("Content-Type") == ["text/plain"]
    assert head([], b"").getall("Content-Type") == []  # no body, nothing to type


@pytest.mark.parametrize(("version", "keep_alive", "connection", "client_keeps"), [
    ((1, 1), True, [], True),
    ((1, 1), False, ["close"], False),
    ((1, 0), True, ["keep-alive"], True),
    ((1, 0), False, [], False),
])
def test_response_head_tells_the_client_whether_the_connection_stays(
        version: tuple[int, int], keep_alive: bool, connection: list[str],
        client_keeps: bool) -> None:
    p = head([(b"Connection", b"close")], version=version, keep_alive=keep_alive)
    assert p.getall("Connection") == connection  # the replica's own Connection never leaks
    assert p.keep_alive is client_keeps


def test_response_head_keeps_the_status_and_reason() -> None:
    p = head([], b"gone", status=410, reason="Gone Away")
    assert p.status == 410


# --- upstream_head / UpstreamHead: the request head a replica gets -----------------------------


def request_of(head: UpstreamHead, *, method: str = "GET", target: str = "/t",
               host: str = "10.0.0.5:8080", chunked: bool = False) -> tuple[str, list[tuple[str, str]]]:
    """Parse the serialised head as a strict HTTP/1.1 server (llhttp) would."""
    seen: list[tuple[str, str]] = []
    url: list[bytes] = []

    class Sink:
        def on_url(self, u: bytes) -> None:
            url.append(u)

        def on_header(self, name: bytes, value: bytes) -> None:
            seen.append((name.decode(), value.decode("utf-8", "surrogateescape")))

    data = head.serialize(method, target, host, chunked)
    assert data.endswith(b"\r\n\r\n")
    httptools.HttpRequestParser(Sink()).feed_data(data)
    return b"".join(url).decode(), seen


def test_upstream_head_matches_the_multidict_rules_and_keeps_value_bytes() -> None:
    raw = [(b"Host", b"api.example"), (b"Accept", b"*/*"), (b"X-Name", "caf\u00e9".encode()),
           (b"Connection", b"keep-alive, X-Drop"), (b"X-Drop", b"1"), (b"X_Under", b"u"),
           (b"X-Auth-Subject", b"admin"), (b"X-Forwarded-For", b"6.6.6.6"),
           (b"Content-Length", b"3")]
    head = upstream_head(raw, HopInfo("203.0.113.7", "203.0.113.7", "https", "rid-9", False),
                         auth=("alice", "read write"))
    assert head.has_host and head.has_length
    target, seen = request_of(head, method="POST", target="/x?q=1")
    assert target == "/x?q=1"
    assert seen == [("Host", "api.example"), ("Accept", "*/*"), ("X-Name", "caf\u00e9"),
                    ("Content-Length", "3"), ("X-Forwarded-For", "203.0.113.7"),
                    ("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "api.example"),
                    ("X-Real-IP", "203.0.113.7"), ("X-Request-ID", "rid-9"),
                    ("X-Auth-Subject", "alice"), ("X-Auth-Scopes", "read write")]


def test_upstream_head_serialize_adds_host_and_chunked_framing_when_needed() -> None:
    head = upstream_head([(b"Accept", b"*/*")], HopInfo("127.0.0.1", "127.0.0.1", "http", "r", False))
    assert not head.has_host and not head.has_length
    _, seen = request_of(head, host="10.0.0.5:8080", chunked=True)
    assert ("Host", "10.0.0.5:8080") in seen
    assert ("Transfer-Encoding", "chunked") in seen
    assert not any(k == "X-Forwarded-Host" for k, _ in seen)  # no Host, nothing to forward
    _, again = request_of(head, host="10.0.0.6:8080")  # a retry on another replica
    assert ("Host", "10.0.0.6:8080") in again
    assert not any(k == "Transfer-Encoding" for k, _ in again)


def test_upstream_head_of_a_rewritten_multidict() -> None:
    hdrs = CIMultiDict([("Host", "h"), ("X-Added", "v")])
    head = UpstreamHead.of(hdrs)
    assert head.has_host and not head.has_length
    assert request_of(head)[1] == [("Host", "h"), ("X-Added", "v")]


@pytest.mark.parametrize("connection", [b"close", b" Close ", b"keep-alive, close"])
def test_a_header_named_by_connection_close_is_dropped_both_ways(connection: bytes) -> None:
    # RFC 9110 7.6.1: every connection option names a header to remove, "close" included.
    p = head([(b"Connection", connection), (b"Close", b"yes"), (b"X-Keep", b"k")])
    assert p.getall("Close") == [] and p.getall("X-Keep") == ["k"]
    out = upstream(headers(("Connection", connection.decode()), ("Close", "1"), ("X-Keep", "k")))
    assert "Close" not in out and out.getall("X-Keep") == ["k"]


def test_response_head_refuses_an_extra_header_that_would_split_the_head() -> None:
    with pytest.raises(ValueError, match="CR or LF"):
        response_head((1, 1), 200, "OK", [], "r", {"Access-Control-Allow-Origin": "a\r\nX: y"},
                      0, True)
