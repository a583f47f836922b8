"""Transformations through the running proxy: headers, rewrites, CORS, gzip, TLS to the backend,
per-route body limits and label errors, from labelled containers and a routes file."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gzip
import json
import random
import re
import ssl
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import engine
import pytest
import requests
import trustme
from aiohttp import web
from docker_fixtures import run_container, unique
from helpers import ProxyProcess, run_proxy, wait_for, write_routes
from multidict import CIMultiDict

APP, ADMIN, EVIL = "https://app.example.com", "https://admin.example.com", "https://evil.example"
GLOBAL_LIMIT = 4096  # EDGEPROXY_MAX_BODY_SIZE=4k for the module's proxy
BIG_TXT = "".join(f"line {i}\n" for i in range(20000)).encode()
# busybox httpd serves /www; the image's echo CGI stays at /www/cgi-bin/echo.
BIG_CMD = ("sh", "-c", "mkdir -p /www && i=0; while [ $i -lt 20000 ]; do echo line $i; "
           "i=$((i+1)); done > /www/big.txt && cp /www/big.txt /www/big.png && "
           "hostname > /www/index.html && exec httpd -f -p 80 -h /www")
# Text that deflate cannot squeeze much, so compressed bytes leave long before the end.
DRIP_HEAD = random.Random(7).randbytes(400_000).hex().encode()
DRIP_TAIL = b"\nthe end\n"


# --- local backends (HTTP and HTTPS) served from a thread of this process ---------------------

class LocalBackend:
    """An aiohttp app that records what reached it; /drip holds its last bytes until released."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.release = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None

    def app(self) -> web.Application:
        async def echo(request: web.Request) -> web.Response:
            body = await request.read()
            return web.json_response({"path": request.raw_path, "body_len": len(body),
                                      "headers": {k.lower(): v for k, v in request.headers.items()}})

        async def drip(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
            await resp.prepare(request)
            for i in range(0, len(DRIP_HEAD), 65536):
                await resp.write(DRIP_HEAD[i:i + 65536])
            await asyncio.wait_for(self.release.wait(), 20)
            await resp.write(DRIP_TAIL)
            await resp.write_eof()
            return resp

        async def pre_gzipped(_: web.Request) -> web.Response:
            return web.Response(body=gzip.compress(BIG_TXT, mtime=0), headers={
                "Content-Type": "text/plain", "Content-Encoding": "gzip"})

        async def vary(request: web.Request) -> web.Response:
            lines = request.query.getall("v", ["Accept-Language"])  # one Vary line each
            return web.Response(text="bonjour " * 100,
                                headers=CIMultiDict(("Vary", v) for v in lines))

        @web.middleware
        async def record(request: web.Request, handler: Any) -> web.StreamResponse:
            self.seen.append(request.raw_path)
            return await handler(request)  # type: ignore[no-any-return]

        app = web.Application(middlewares=[record], client_max_size=1024**2)
        app.router.add_get("/drip", drip)
        app.router.add_get("/pre-gzipped", pre_gzipped)
        app.router.add_get("/vary", vary)
        app.router.add_route("*", "/{tail:.*}", echo)
        return app

    def set_release(self) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self.release.set)


@contextmanager
def serve_in_thread(backend: LocalBackend, ssl_context: ssl.SSLContext | None = None
                    ) -> Iterator[int]:
    """Serve backend's app on 127.0.0.1 from a thread with its own loop; yield the port."""
    loop = asyncio.new_event_loop()
    backend.loop = loop
    runner = web.AppRunner(backend.app(), access_log=None, shutdown_timeout=1)

    async def start() -> int:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
        return int(runner.addresses[0][1])

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    finally:
        loop.call_soon_threadsafe(backend.release.set)
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


# --- the module's containers, backends and proxy ----------------------------------------------

CRLF = "ok\r\nX-Injected: 1"
BAD = {  # suffix -> (labels, (label, value, reason)) for containers that must be skipped
    "crlf": ({"gateway.request.headers.X-Env": CRLF},
             ("gateway.request.headers.X-Env", CRLF,
              "header values may not hold control characters such as CR or LF")),
    "lf": ({"gateway.response.headers.Set-Cookie": "a=1\nSet-Cookie: admin=1"},
           ("gateway.response.headers.Set-Cookie", "a=1\nSet-Cookie: admin=1",
            "header values may not hold control characters such as CR or LF")),
    "name": ({"gateway.response.headers.X:Bad": "1"},
             ("gateway.response.headers.X:Bad", "1",
              "header name 'X:Bad' is not an HTTP token (letters, digits, -)")),
    "regex": ({"gateway.rewrite": r"^/v1/(.* => /api/\1"},
              ("gateway.rewrite", r"^/v1/(.* => /api/\1",
               "the regular expression '^/v1/(.*' is invalid: missing ),")),
    "scheme": ({"gateway.scheme": "ftp"}, ("gateway.scheme", "ftp", "http, https, h2c or h2")),
    "star": ({"gateway.cors.origins": "*", "gateway.cors.credentials": "true"},
             ("gateway.cors.credentials", "true",
              "browsers refuse credentials with gateway.cors.origins=*")),
}


class Env:
    """Everything the tests talk to: the proxy, the paths of the labelled containers, backends."""

    def __init__(self, proxy: ProxyProcess, paths: dict[str, str], names: dict[str, str],
                 local: LocalBackend) -> None:
        self.proxy = proxy
        self.paths = paths
        self.names = names
        self.local = local

    def get(self, key: str, rest: str = "/", **kw: Any) -> requests.Response:
        return requests.get(self.proxy.url(self.paths[key] + rest), timeout=10, **kw)

    def route(self, key: str) -> dict[str, Any]:
        return self.proxy.routes()[self.names[key]]


def _containers() -> tuple[dict[str, str], dict[str, str], list[tuple[str, dict[str, str],
                                                                       tuple[str, ...] | None]]]:
    paths: dict[str, str] = {}
    names: dict[str, str] = {}
    specs: list[tuple[str, dict[str, str], tuple[str, ...] | None]] = []

    def add(key: str, labels: dict[str, str], command: tuple[str, ...] | None = None) -> None:
        paths[key] = "/" + unique(key[:4])
        names[key] = unique(f"tr-{key}-")
        specs.append((key, {"gateway.path": paths[key], "gateway.strip_prefix": "true",
                            **labels}, command))

    add("headers", {
        "gateway.request.headers.X-Env": "prod",
        "gateway.request.headers.X-Remove-Me": "",
        "gateway.request.headers.User-Agent": "edgeproxy-label",
        "gateway.response.headers.Strict-Transport-Security": "max-age=63072000; includeSubDomains",
        "gateway.response.headers.X-Content-Type-Options": "nosniff",
        "gateway.response.headers.Accept-Ranges": "",
    }, BIG_CMD)
    add("rewrite", {"gateway.rewrite": r"^/v1/(.*) => /echo/\1", "gateway.add_prefix": "/cgi-bin"})
    add("split", {"gateway.rewrite": r"^/files/(.*)_(.*) => /cgi-bin/echo/\1/\2"})
    add("cors", {"gateway.cors.origins": f"{APP},{ADMIN}", "gateway.cors.methods": "GET,POST,PUT",
                 "gateway.cors.headers": "Content-Type,X-Api-Key",
                 "gateway.cors.credentials": "true", "gateway.cors.max_age": "600",
                 "gateway.cors.expose": "X-Request-ID"})
    add("corsany", {"gateway.cors.origins": "*"})
    add("gzip", {"gateway.compress": "true"}, BIG_CMD)
    add("body", {"gateway.max_body": "64k"})
    add("https", {"gateway.scheme": "https", "gateway.tls.verify": "false"})  # httpd: plain HTTP
    for suffix, (labels, _) in BAD.items():
        add("bad-" + suffix, labels)
    return paths, names, specs


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("certs")
    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    other.cert_pem.write_to_path(str(tmp / "other-ca.pem"))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("backend.test").configure_cert(server)
    return {"ca": str(tmp / "ca.pem"), "other": str(tmp / "other-ca.pem"), "server": server}


@pytest.fixture(scope="module")
def env(docker_engine: None, certs: dict[str, Any],
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    paths, names, specs = _containers()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda s: run_container(names[s[0]], s[1], command=s[2]), specs))
    local, tls_local = LocalBackend(), LocalBackend()
    tmp = tmp_path_factory.mktemp("transform")
    with serve_in_thread(local) as port, serve_in_thread(tls_local, certs["server"]) as tls_port:
        plain, tls = f"http://127.0.0.1:{port}", f"https://127.0.0.1:{tls_port}"
        named = {"tls.server_name": "backend.test"}
        routes = write_routes(tmp / "routes.toml", {
            "tls-ok": {"path": "/tls-ok", "strip_prefix": True, "upstreams": [tls],
                       "tls.ca": certs["ca"], **named},
            "tls-wrong-ca": {"path": "/tls-wrong-ca", "upstreams": [tls], "tls.ca": certs["other"],
                             **named},
            "tls-system-ca": {"path": "/tls-system-ca", "upstreams": [tls], **named},
            "tls-wrong-name": {"path": "/tls-wrong-name", "upstreams": [tls], "tls.ca": certs["ca"],
                               "tls.server_name": "other.test"},
            "tls-missing-ca": {"path": "/tls-missing-ca", "upstreams": [tls],
                               "tls.ca": "/nonexistent/ca.pem", **named},
            "tls-no-verify": {"path": "/tls-no-verify", "strip_prefix": True, "upstreams": [tls],
                              "tls.verify": False},
            "drip": {"path": "/drip", "upstreams": [plain], "compress": True},
            "pre-gzipped": {"path": "/pre-gzipped", "upstreams": [plain], "compress": True},
            "vary": {"path": "/vary", "upstreams": [plain], "cors.origins": APP},
            # Drops the last '0': harmless for /enc/a0b, an encoded slash for /enc/%20F.
            "enc": {"path": "/enc", "upstreams": [plain], "rewrite": r"^/enc/(.*)0(.*) => /out/\1\2"},
            "limited": {"path": "/limited", "upstreams": [plain], "max_body": "64k"},
            "unlimited": {"path": "/unlimited", "upstreams": [plain], "max_body": "0"},
        })
        with run_proxy(tmp, routes_file=str(routes), max_body_size="4k", read_timeout="10s") as p:
            wait_for(lambda: p.admin("/healthz")["docker"] == "connected", 15, what="docker")
            good = [k for k in paths if not k.startswith("bad-")]
            wait_for(lambda: {names[k] for k in good} <= set(p.routes()), 15, what="routes")
            probe = {"rewrite": "/echo/ready", "split": "/files/a_b"}
            for key in set(good) - {"https"}:  # httpd listens a few ms after the container starts
                url = p.url(paths[key] + probe.get(key, "/"))
                wait_for(lambda u=url: requests.get(u, timeout=5).status_code == 200, 10,
                         what=f"{key} answering")
            try:
                yield Env(p, paths, names, local)
            finally:
                engine.docker("rm", "-f", *names.values())


def echo_of(r: requests.Response) -> dict[str, str]:
    assert r.status_code == 200, (r.status_code, r.text)
    return engine.parse_echo(r.text)


def cors_headers(r: requests.Response) -> dict[str, str]:
    return {k: v for k, v in r.headers.items() if k.lower().startswith("access-control-")}


# --- headers --------------------------------------------------------------------------------

def test_request_headers_are_set_overridden_and_removed(env: Env) -> None:
    r = env.get("headers", "/cgi-bin/echo/x", headers={
        "X-Remove-Me": "secret", "X-Env": "from-client", "User-Agent": "curl/8", "X-Keep": "k"})
    echo = echo_of(r)
    assert echo["HTTP_X_ENV"] == "prod"  # the label wins over the client
    assert echo["HTTP_USER_AGENT"] == "edgeproxy-label"
    assert "HTTP_X_REMOVE_ME" not in echo
    assert echo["HTTP_X_KEEP"] == "k"  # other headers untouched
    assert echo["REQUEST_URI"] == "/cgi-bin/echo/x"


def test_response_headers_are_set_and_removed(env: Env) -> None:
    r = env.get("headers", "/")
    assert r.status_code == 200
    assert r.headers["Strict-Transport-Security"] == "max-age=63072000; includeSubDomains"
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert "Accept-Ranges" not in r.headers  # busybox sends it; the empty label removes it
    assert "ETag" in r.headers and "Last-Modified" in r.headers  # the rest passes through
    echo = env.get("headers", "/cgi-bin/echo")  # a CGI response gets them too
    assert echo.headers["X-Content-Type-Options"] == "nosniff"


# --- path rewrites --------------------------------------------------------------------------

def test_rewrite_after_strip_and_before_add_prefix_keeps_the_query(env: Env) -> None:
    echo = echo_of(env.get("rewrite", "/v1/users/7?a=1&b=%2F&c"))
    assert echo["REQUEST_URI"] == "/cgi-bin/echo/users/7?a=1&b=%2F&c"
    # No match: only the prefix is added; the regex saw the stripped path, not /cgi-bin/...
    assert echo_of(env.get("rewrite", "/echo/plain?q=1"))["REQUEST_URI"] == "/cgi-bin/echo/plain?q=1"
    assert env.get("rewrite", "/v1").status_code == 404  # /cgi-bin/v1: no match, not rewritten


def test_rewrite_that_would_produce_dot_segments_is_400_not_forwarded(env: Env) -> None:
    assert echo_of(env.get("split", "/files/a_b/c"))["REQUEST_URI"] == "/cgi-bin/echo/a/b/c"
    for rest in ("/files/.._etc/passwd", "/files/a/.._..", "/files/._x", "/files/_x"):
        r = env.get("split", rest)
        assert r.status_code == 400, (rest, r.status_code, r.text)
        err = r.json()["error"]
        assert err["code"] == "bad_rewrite", err
        assert "not a canonical path" in err["message"]


def test_rewrite_that_would_produce_an_encoded_slash_is_400_not_forwarded(env: Env) -> None:
    ok = requests.get(env.proxy.url("/enc/a0b?x=0"), timeout=5)
    assert ok.status_code == 200 and ok.json()["path"] == "/out/ab?x=0"
    r = requests.get(env.proxy.url("/enc/%20F"), timeout=5)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "bad_rewrite"
    assert "%2F" in r.json()["error"]["message"]
    assert [p for p in env.local.seen if p.startswith("/out")] == ["/out/ab?x=0"]


# --- CORS ------------------------------------------------------------------------------------

def test_cors_preflight_from_an_allowed_origin_is_answered_at_the_edge(env: Env) -> None:
    r = requests.options(env.proxy.url(env.paths["cors"] + "/cgi-bin/echo"), timeout=5, headers={
        "Origin": ADMIN, "Access-Control-Request-Method": "PUT",
        "Access-Control-Request-Headers": "content-type, x-api-key"})
    assert r.status_code == 204
    assert r.text == ""  # busybox would have run the CGI for OPTIONS
    assert cors_headers(r) == {
        "Access-Control-Allow-Origin": ADMIN,
        "Access-Control-Allow-Methods": "GET, POST, PUT",
        "Access-Control-Allow-Headers": "Content-Type, X-Api-Key",
        "Access-Control-Allow-Credentials": "true",
        "Access-Control-Max-Age": "600",
    }
    assert "Origin" in r.headers["Vary"]
    assert r.headers["X-Request-ID"]


def test_cors_preflight_from_a_disallowed_origin_gets_no_cors_headers(env: Env) -> None:
    r = requests.options(env.proxy.url(env.paths["cors"] + "/cgi-bin/echo"), timeout=5, headers={
        "Origin": EVIL, "Access-Control-Request-Method": "PUT"})
    assert cors_headers(r) == {}
    assert "HOSTNAME=" not in r.text  # not forwarded either


def test_cors_actual_requests(env: Env) -> None:
    allowed = env.get("cors", "/cgi-bin/echo", headers={"Origin": APP})
    assert echo_of(allowed)["HTTP_ORIGIN"] == APP  # the backend still sees the Origin
    assert cors_headers(allowed) == {"Access-Control-Allow-Origin": APP,
                                     "Access-Control-Allow-Credentials": "true",
                                     "Access-Control-Expose-Headers": "X-Request-ID"}
    assert "Origin" in allowed.headers["Vary"]
    denied = env.get("cors", "/cgi-bin/echo", headers={"Origin": EVIL})
    assert denied.status_code == 200 and cors_headers(denied) == {}
    assert cors_headers(env.get("cors", "/cgi-bin/echo")) == {}  # no Origin: not CORS
    # OPTIONS without Access-Control-Request-Method is no preflight: it goes to the backend.
    r = requests.options(env.proxy.url(env.paths["cors"] + "/cgi-bin/echo"), timeout=5,
                         headers={"Origin": APP})
    assert echo_of(r)["REQUEST_METHOD"] == "OPTIONS"
    assert r.headers["Access-Control-Allow-Origin"] == APP


def test_cors_any_origin(env: Env) -> None:
    r = env.get("corsany", "/", headers={"Origin": EVIL})
    assert cors_headers(r) == {"Access-Control-Allow-Origin": "*"}
    pre = requests.options(env.proxy.url(env.paths["corsany"] + "/"), timeout=5, headers={
        "Origin": EVIL, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "x-custom"})
    assert pre.status_code == 204
    assert cors_headers(pre) == {"Access-Control-Allow-Origin": "*",
                                 "Access-Control-Allow-Methods": "GET, HEAD, POST",
                                 "Access-Control-Allow-Headers": "x-custom"}


@pytest.mark.parametrize("backend_vary", [
    ["Accept-Language"], ["origin"],
    ["X-Origin-Hint"],  # a name that merely contains 'origin' is not Origin
    ["Accept-Language", "Cookie"],  # Vary is a list: two lines are as good as one
], ids=["one", "has-origin", "substring", "two-lines"])
def test_cors_merges_origin_into_the_backends_vary(env: Env, backend_vary: list[str]) -> None:
    # The backend's answer varies by its own headers; adding Origin must not drop any of them.
    plain = requests.get(env.proxy.url("/vary"), params={"v": backend_vary}, timeout=5)
    assert [v.strip() for v in plain.headers["Vary"].split(",")] == backend_vary  # no Origin sent
    r = requests.get(env.proxy.url("/vary"), params={"v": backend_vary},
                     headers={"Origin": APP}, timeout=5)
    assert r.headers["Access-Control-Allow-Origin"] == APP
    vary = [v.strip().lower() for v in r.headers["Vary"].split(",")]
    assert sorted(vary) == sorted({*(v.lower() for v in backend_vary), "origin"}), vary


# --- gzip ------------------------------------------------------------------------------------

def raw(env: Env, key: str, rest: str, accept: str) -> tuple[requests.Response, bytes]:
    """GET without letting requests decode: the bytes as they came off the wire."""
    r = env.get(key, rest, headers={"Accept-Encoding": accept}, stream=True)
    return r, r.raw.read(decode_content=False)


def test_gzip_when_accepted_for_a_large_text_body_streamed(env: Env) -> None:
    r, body = raw(env, "gzip", "/big.txt", "br;q=1, gzip;q=0.8")
    assert r.status_code == 200
    assert r.headers["Content-Encoding"] == "gzip"
    assert "Content-Length" not in r.headers and r.headers["Transfer-Encoding"] == "chunked"
    assert "accept-encoding" in r.headers["Vary"].lower()
    assert gzip.decompress(body) == BIG_TXT
    assert len(body) < len(BIG_TXT) // 3


@pytest.mark.parametrize(("key", "rest", "accept", "why"), [
    ("gzip", "/big.txt", "identity", "not accepted"),
    ("gzip", "/big.txt", "gzip;q=0, deflate", "refused"),
    ("gzip", "/big.png", "gzip", "image/png is not compressible"),
    ("headers", "/big.txt", "gzip", "no gateway.compress on this route"),
])
def test_no_gzip(env: Env, key: str, rest: str, accept: str, why: str) -> None:
    r, body = raw(env, key, rest, accept)
    assert r.status_code == 200
    assert "Content-Encoding" not in r.headers, why
    assert r.headers["Content-Length"] == str(len(BIG_TXT)) and body == BIG_TXT, why


def test_no_gzip_for_a_small_body(env: Env) -> None:
    r, body = raw(env, "gzip", "/", "gzip")
    assert "Content-Encoding" not in r.headers
    assert body.strip() and len(body) < 256


def test_gzip_route_sends_vary_on_the_uncompressed_variant_too(env: Env) -> None:
    # The same URL is gzip for some clients and identity for others: a shared cache must key
    # both on Accept-Encoding, or it serves the identity copy where gzip was negotiable.
    r, _ = raw(env, "gzip", "/big.txt", "identity")
    assert "Content-Encoding" not in r.headers
    assert "accept-encoding" in r.headers.get("Vary", "").lower(), dict(r.headers)


def test_gzip_response_does_not_reuse_the_identity_validators(env: Env) -> None:
    # The gzip bytes are another representation: a strong ETag shared with the identity bytes,
    # or Accept-Ranges on them, lets a resumed download splice identity bytes into gzip ones.
    identity, _ = raw(env, "gzip", "/big.txt", "identity")
    zipped, _ = raw(env, "gzip", "/big.txt", "gzip")
    assert zipped.headers["Content-Encoding"] == "gzip"
    etag = zipped.headers.get("ETag")
    assert etag is None or etag.startswith("W/") or etag != identity.headers["ETag"], etag
    assert zipped.headers.get("Accept-Ranges", "none") == "none", zipped.headers["Accept-Ranges"]


def test_backend_encoded_body_is_passed_through_once(env: Env) -> None:
    r = requests.get(env.proxy.url("/pre-gzipped"), headers={"Accept-Encoding": "gzip"},
                     stream=True, timeout=5)
    body = r.raw.read(decode_content=False)
    assert r.headers["Content-Encoding"] == "gzip"
    assert body == gzip.compress(BIG_TXT, mtime=0)


def test_gzip_is_streamed_not_buffered_whole(env: Env) -> None:
    # The backend holds back its last bytes until told: compressed bytes must arrive before.
    with requests.get(env.proxy.url("/drip"), headers={"Accept-Encoding": "gzip"}, stream=True,
                      timeout=(5, 5)) as r:
        assert r.headers["Content-Encoding"] == "gzip"
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        early = b""
        while not early:  # each read fails after 5 s if the proxy is sitting on the body
            first = r.raw.read(4096, decode_content=False)
            assert first, "the body ended while the backend was still holding its tail"
            early += d.decompress(first)
        assert DRIP_HEAD.startswith(early)
        env.local.set_release()
        rest = r.raw.read(decode_content=False)
    assert early + d.decompress(rest) + d.flush() == DRIP_HEAD + DRIP_TAIL


# --- HTTPS to the backend --------------------------------------------------------------------

VERIFY_FAILED = "certificate[ _]verify[ _]failed"


def test_https_backend_verified_with_the_routes_ca(env: Env) -> None:
    r = requests.get(env.proxy.url("/tls-ok/x?q=1"), timeout=5)
    assert r.status_code == 200, r.text
    assert r.json()["path"] == "/x?q=1"
    assert r.json()["headers"]["x-forwarded-proto"] == "http"


@pytest.mark.parametrize(("path", "needle"), [
    ("/tls-wrong-ca", VERIFY_FAILED),
    ("/tls-system-ca", VERIFY_FAILED),  # verification on, no CA given: the system's trust
    ("/tls-wrong-name", VERIFY_FAILED),  # a good chain, but for backend.test
    ("/tls-missing-ca", r"cannot load gateway\.tls\.ca='/nonexistent/ca\.pem'"),
], ids=["wrong-ca", "system-ca", "wrong-name", "missing-ca"])
def test_https_backend_that_fails_verification_is_502(env: Env, path: str, needle: str) -> None:
    r = requests.get(env.proxy.url(path + "/x"), timeout=5)
    assert r.status_code == 502
    err = r.json()["error"]
    assert err["code"] == "upstream_tls_error"
    assert re.search(needle, err["message"], re.IGNORECASE), err["message"]


def test_scheme_label_speaks_tls_to_the_container(env: Env) -> None:
    # busybox httpd answers the ClientHello in plain HTTP: the handshake fails, and says so.
    r = env.get("https", "/")
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "upstream_tls_error"
    route = env.route("https")
    assert route["replicas"][0]["url"].startswith("https://")
    assert route["transforms"] == {"upstream_scheme": "https", "tls": {
        "verify": False, "ca": None, "server_name": None}}


def test_https_backend_without_verification(env: Env) -> None:
    r = requests.get(env.proxy.url("/tls-no-verify/y"), timeout=5)
    assert r.status_code == 200, r.text
    assert r.json()["path"] == "/y"


# --- body limits -----------------------------------------------------------------------------

def test_max_body_label_overrides_the_global_limit(env: Env) -> None:
    url = env.proxy.url(env.paths["body"] + "/cgi-bin/echo")
    echo = echo_of(requests.post(url, data=b"a" * 20000, timeout=5))
    assert echo["BODY"] == "a" * 20000  # 20000 > the global 4k
    r = requests.post(url, data=b"a" * (64 * 1024 + 1), timeout=5)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert "65536" in r.json()["error"]["message"]
    # A route without the label keeps the global limit.
    r = requests.post(env.proxy.url(env.paths["headers"] + "/cgi-bin/echo"), data=b"a" * 5000,
                      timeout=5)
    assert r.status_code == 413 and str(GLOBAL_LIMIT) in r.json()["error"]["message"]


def test_max_body_counts_chunked_bodies_and_zero_is_unlimited(env: Env) -> None:
    def chunks(n: int) -> Iterator[bytes]:
        for _ in range(n):
            yield b"b" * 10000

    ok = requests.post(env.proxy.url("/limited/x"), data=chunks(6), timeout=5)
    assert ok.status_code == 200 and ok.json()["body_len"] == 60000
    r = requests.post(env.proxy.url("/limited/x"), data=chunks(7), timeout=5)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    big = requests.post(env.proxy.url("/unlimited/x"), data=b"c" * 300_000, timeout=5)
    assert big.status_code == 200 and big.json()["body_len"] == 300_000


# --- label errors and /routes ------------------------------------------------------------------

@pytest.mark.parametrize("suffix", list(BAD))
def test_bad_label_skips_only_its_container_with_a_structured_warning(env: Env, suffix: str
                                                                      ) -> None:
    key = "bad-" + suffix
    name = env.names[key]
    label, value, reason = BAD[suffix][1]
    warnings = wait_for(lambda: [e for e in env.proxy.events("label_invalid")
                                 if e.get("container") == name], 10, what=f"warning for {name}")
    assert warnings[0]["label"] == label and warnings[0]["value"] == value
    assert warnings[0]["reason"].startswith(reason), warnings[0]["reason"]
    decision = next(c for c in env.proxy.admin("/containers")["containers"]
                    if c["container"] == name)
    assert decision["routed"] is False
    assert [e["label"] for e in decision["errors"]] == [label]
    assert name not in env.proxy.routes()
    assert env.get(key, "/").status_code == 404
    assert env.get("headers", "/").status_code == 200  # the others route


def test_routes_show_each_routes_transformations(env: Env, certs: dict[str, Any]) -> None:
    assert env.route("headers")["transforms"] == {
        "request_headers": {"set": {"User-Agent": "edgeproxy-label", "X-Env": "prod"},
                            "remove": ["X-Remove-Me"]},
        "response_headers": {"set": {"Strict-Transport-Security":
                                     "max-age=63072000; includeSubDomains",
                                     "X-Content-Type-Options": "nosniff"},
                             "remove": ["Accept-Ranges"]},
    }
    assert env.route("rewrite")["transforms"] == {
        "rewrite": {"pattern": "^/v1/(.*)", "replacement": r"/echo/\1"}, "add_prefix": "/cgi-bin"}
    assert env.route("cors")["transforms"] == {"cors": {
        "origins": [ADMIN, APP], "methods": ["GET", "POST", "PUT"],
        "headers": ["Content-Type", "X-Api-Key"], "credentials": True, "max_age": 600,
        "expose": ["X-Request-ID"]}}
    assert env.route("corsany")["transforms"]["cors"]["origins"] == "*"
    assert env.route("gzip")["transforms"] == {"compress": "gzip"}
    assert env.route("body")["transforms"] == {"max_body": 65536}
    routes = env.proxy.routes()
    assert routes["tls-ok"]["transforms"] == {"upstream_scheme": "https", "tls": {
        "verify": True, "ca": certs["ca"], "server_name": "backend.test"}}
    assert routes["tls-no-verify"]["transforms"]["tls"]["verify"] is False
    assert routes["unlimited"]["transforms"] == {"max_body": 0}
    assert json.dumps(routes)  # plain JSON all the way down
    assert routes["tls-ok"]["replicas"][0]["url"].startswith("https://127.0.0.1:")


def test_label_values_never_reach_the_wire_with_cr_or_lf(env: Env) -> None:
    # The containers with CR/LF labels are skipped, so nothing they asked for is sent anywhere.
    for suffix in ("crlf", "lf"):
        r = env.get("bad-" + suffix, "/cgi-bin/echo")
        assert r.status_code == 404
        assert "X-Injected" not in r.headers and "admin=1" not in r.headers.get("Set-Cookie", "")
    echo = echo_of(env.get("headers", "/cgi-bin/echo"))
    assert "HTTP_X_INJECTED" not in echo


def test_proxy_survived_everything_without_a_traceback(env: Env) -> None:
    assert env.proxy.proc.poll() is None
    text = env.proxy.log_text()
    assert "Traceback" not in text and "Error handling request" not in text, text[-3000:]
