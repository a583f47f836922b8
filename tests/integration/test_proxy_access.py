"""Access policies through the real proxy process (routes file, no Docker): basic auth with
entries the real `htpasswd -nbB` wrote, forward auth against a test server that follows
Authelia's documented contract, and IP allow/deny lists from distinct loopback clients."""

from __future__ import annotations

import base64
import gzip
import http.client
import json
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests
from helpers import ProxyProcess, free_port, run_backend, run_proxy, wait_for, write_routes

pytestmark = pytest.mark.skipif(shutil.which("htpasswd") is None,
                                reason="needs htpasswd (apt-get install apache2-utils)")


def htpasswd(user: str, password: str, cost: int = 5) -> str:
    """An entry as `htpasswd -nbB` writes it (Debian's apache2-utils)."""
    out = subprocess.run(["htpasswd", "-nbB", "-C", str(cost), user, password],
                         capture_output=True, text=True, check=True).stdout
    return out.strip()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def seen(self, name: str) -> list[str]:
        """Values of a header the echo backend received."""
        return [v for k, v in self.json()["headers"] if k.lower() == name.lower()]


def get(port: int, path: str, headers: dict[str, str] | None = None, *,
        source: str = "127.0.0.1", host: str = "127.0.0.1", timeout: float = 10) -> Answer:
    """GET from a chosen client address (loopback addresses make distinct clients)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout, source_address=(source, 0))
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return Answer(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


# --- a forward-auth service following Authelia's documented contract --------------------------

@dataclass
class AuthService:
    """Authelia's /api/authz/forward-auth, as documented: it reads X-Forwarded-Method, -Proto,
    -Host, -Uri, -For and the session cookie; 200 with Remote-User, Remote-Groups, Remote-Email,
    Remote-Name for a session; otherwise 302 to the portal with rd=<original URL> for browsers
    (GET/HEAD asking for HTML) and 401 for the rest."""

    port: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)


GZIPPED_DENIAL = gzip.compress(b"401 Unauthorized, compressed")


def _auth_handler(service: AuthService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: Any) -> None:
            pass

        def do_GET(self) -> None:
            length = self.headers.get("Content-Length")
            service.requests.append({"method": self.command, "path": self.path,
                                     "headers": list(self.headers.items()),
                                     "body": self.rfile.read(int(length)) if length else b""})
            if self.path.startswith("/slow"):
                time.sleep(2)
            if self.path.startswith("/gzip"):
                self._send(401, [("Content-Type", "text/plain"), ("Content-Encoding", "gzip")],
                           GZIPPED_DENIAL)
                return
            if self.path.startswith("/huge"):
                self._send(401, [("Content-Type", "text/plain")], b"x" * 200_000)
                return
            cookie = self.headers.get("Cookie", "")
            if "authelia_session=good" in cookie:
                self._send(200, [("Remote-User", "alice"), ("Remote-Groups", "admins"),
                                 ("Remote-Groups", "dev"), ("Remote-Email", "alice@example.com"),
                                 ("Remote-Name", "Alice"), ("Set-Cookie", "refreshed=1")], b"")
                return
            target = (f"{self.headers.get('X-Forwarded-Proto')}://"
                      f"{self.headers.get('X-Forwarded-Host')}{self.headers.get('X-Forwarded-Uri')}")
            method = self.headers.get("X-Forwarded-Method", "")
            if method in ("GET", "HEAD") and "text/html" in self.headers.get("Accept", ""):
                self._send(302, [("Location", "https://auth.example.com/?rd=" + quote(target, "")),
                                 ("Set-Cookie", "authelia_flow=xyz; HttpOnly; Path=/"),
                                 ("Content-Type", "text/html; charset=utf-8")],
                           b'<a href="https://auth.example.com/">302 Found</a>')
                return
            self._send(401, [("Content-Type", "text/plain"),
                             ("WWW-Authenticate", 'Basic realm="authelia"')], b"401 Unauthorized")

        def _send(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


@pytest.fixture(scope="module")
def auth_service() -> Iterator[AuthService]:
    service = AuthService()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _auth_handler(service))
    service.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield service
    server.shutdown()
    server.server_close()


# --- one proxy for the module -------------------------------------------------------------------

@dataclass
class Setup:
    proxy: ProxyProcess
    users_file: Path
    auth: AuthService


ALICE_PW = "correct horse"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, auth_service: AuthService) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("access")
    users_file = tmp / "users.htpasswd"
    users_file.write_text(htpasswd("bob", "bob-pw") + "\n")
    down = free_port()
    auth = f"http://127.0.0.1:{auth_service.port}"
    with run_backend("app") as backend:
        ups = [backend]
        routes = write_routes(tmp / "routes.toml", {
            "basic": {"path": "/basic", "upstreams": ups, "auth": "basic",
                      "auth.users": [htpasswd("alice", ALICE_PW)], "auth.realm": "Admin area"},
            "basicfile": {"path": "/basicfile", "upstreams": ups, "auth": "basic",
                          "auth.users_file": str(users_file)},
            "keep": {"path": "/keep", "upstreams": ups, "auth": "basic",
                     "auth.users": [htpasswd("alice", ALICE_PW)],
                     "auth.keep_authorization": True},
            # cost 12: each check takes long enough for a burst to pile up
            "slowhash": {"path": "/slowhash", "upstreams": ups, "auth": "basic",
                         "auth.users": [htpasswd("carol", "carol-pw", cost=12)]},
            "fwd": {"path": "/fwd", "upstreams": ups, "auth": "forward",
                    "auth.url": f"{auth}/api/authz/forward-auth",
                    "auth.response_headers": ["Remote-User", "Remote-Groups", "Remote-Email"],
                    "auth.timeout": "5s"},
            "fwddown": {"path": "/fwddown", "upstreams": ups, "auth": "forward",
                        "auth.url": f"http://127.0.0.1:{down}/auth"},
            "fwdslow": {"path": "/fwdslow", "upstreams": ups, "auth": "forward",
                        "auth.url": f"{auth}/slow", "auth.timeout": "300ms"},
            "fwdhuge": {"path": "/fwdhuge", "upstreams": ups, "auth": "forward",
                        "auth.url": f"{auth}/huge"},
            "fwdgzip": {"path": "/fwdgzip", "upstreams": ups, "auth": "forward",
                        "auth.url": f"{auth}/gzip"},
            "lan": {"path": "/lan", "upstreams": ups, "ip.allow": ["127.0.0.2", "::1"],
                    "ip.deny": ["127.0.0.66"]},
            "deny": {"path": "/deny", "upstreams": ups, "ip.deny": ["127.0.0.4/32"]},
            "lanbasic": {"path": "/lanbasic", "upstreams": ups, "ip.allow": ["127.0.0.2"],
                         "auth": "basic", "auth.users": [htpasswd("alice", ALICE_PW)]},
        })
        with run_proxy(tmp, docker="false", routes_file=str(routes),
                           trusted_proxies="127.0.0.3/32") as proxy:
            wait_for(lambda: len(proxy.routes()) == 12, what="routes loaded")
            yield Setup(proxy, users_file, auth_service)


def bcrypt_checks(proxy: ProxyProcess) -> float:
    text = requests.get(proxy.admin_base + "/metrics", timeout=5).text
    m = re.search(r"^edgeproxy_basic_auth_bcrypt_checks_total (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def refusals(proxy: ProxyProcess, route: str, kind: str, reason: str) -> float:
    text = requests.get(proxy.admin_base + "/metrics", timeout=5).text
    series = f'edgeproxy_access_refusals_total{{kind="{kind}",reason="{reason}",route="{route}"}}'
    m = re.search("^" + re.escape(series) + r" (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


# --- basic auth ------------------------------------------------------------------------------

def test_basic_good_credentials_reach_the_replica_as_a_subject(setup: Setup) -> None:
    r = get(setup.proxy.port, "/basic/x", basic("alice", ALICE_PW))
    assert r.status == 200
    assert r.seen("X-Auth-Subject") == ["alice"]
    assert r.seen("Authorization") == []  # removed before forwarding


def test_basic_keep_authorization(setup: Setup) -> None:
    r = get(setup.proxy.port, "/keep/x", basic("alice", ALICE_PW))
    assert r.status == 200 and r.seen("Authorization") == [basic("alice", ALICE_PW)[
        "Authorization"]]


@pytest.mark.parametrize(("headers", "cause"), [
    (basic("alice", "wrong"), "wrong_password"),
    (basic("mallory", ALICE_PW), "unknown_user"),
    ({"Authorization": "Basic !!!notbase64"}, "malformed_header"),
    ({"Authorization": "Bearer abc.def.ghi"}, "malformed_header"),
    ({"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()}, "malformed_header"),
    ({}, "missing_credentials"),
    ({"X-Auth-Subject": "alice"}, "missing_credentials"),  # claiming a subject is no login
])
def test_basic_refusals(setup: Setup, headers: dict[str, str], cause: str) -> None:
    before = refusals(setup.proxy, "basic", "basic", cause)
    r = get(setup.proxy.port, "/basic/x", headers)
    assert r.status == 401
    assert r.headers["WWW-Authenticate"] == 'Basic realm="Admin area", charset="UTF-8"'
    assert r.json()["error"]["code"] == "invalid_credentials"
    assert refusals(setup.proxy, "basic", "basic", cause) == before + 1


def test_basic_realm_defaults_to_the_route_name(setup: Setup) -> None:
    r = get(setup.proxy.port, "/basicfile/x")
    assert r.status == 401 and 'realm="basicfile"' in r.headers["WWW-Authenticate"]


def test_basic_cache_a_hot_client_costs_no_bcrypt(setup: Setup) -> None:
    headers = basic("alice", ALICE_PW)
    assert get(setup.proxy.port, "/keep/warm", headers).status == 200
    before = bcrypt_checks(setup.proxy)
    for _ in range(25):
        assert get(setup.proxy.port, "/keep/hot", headers).status == 200
    assert bcrypt_checks(setup.proxy) == before
    # a wrong password is never cached as good, and costs a check each time
    for _ in range(3):
        assert get(setup.proxy.port, "/keep/x", basic("alice", "nope")).status == 401
    assert bcrypt_checks(setup.proxy) == before + 3


def test_basic_users_file_reload(setup: Setup) -> None:
    port = setup.proxy.port
    assert get(port, "/basicfile/x", basic("bob", "bob-pw")).status == 200
    assert get(port, "/basicfile/x", basic("dave", "dave-pw")).status == 401
    tmp = setup.users_file.with_suffix(".tmp")
    tmp.write_text(f"# rotated\n{htpasswd('dave', 'dave-pw')}\n")
    tmp.replace(setup.users_file)
    wait_for(lambda: get(port, "/basicfile/x", basic("dave", "dave-pw")).status == 200,
             what="dave accepted after the reload")
    # bob was removed: his cached credentials stop working too
    assert get(port, "/basicfile/x", basic("bob", "bob-pw")).status == 401
    # a weak entry makes the new file unusable: the previous users stay
    tmp.write_text("dave:$apr1$lY3otKbC$9N//qdbIrmu4Iwwo2O8pC.\n")
    tmp.replace(setup.users_file)
    # The file is looked at (at most once a second) when a request needs it.
    wait_for(lambda: get(port, "/basicfile/x", basic("dave", "dave-pw")).status == 200
             and setup.proxy.events("basic_auth_users_file_invalid"),
             what="the weak file refused")
    event = setup.proxy.events("basic_auth_users_file_invalid")[-1]
    assert "MD5 ($apr1$) is not accepted" in event["error"] and "htpasswd -nbB dave" in event[
        "error"]


def test_basic_burst_of_bad_passwords_while_good_clients_are_served(setup: Setup) -> None:
    port = setup.proxy.port
    good = basic("carol", "carol-pw")
    assert get(port, "/slowhash/x", good, timeout=30).status == 200  # now cached
    stop = threading.Event()

    def attacker(i: int) -> list[tuple[int, str | None]]:
        out = []
        while not stop.is_set():
            r = get(port, "/slowhash/x", basic("carol", f"guess-{i}-{len(out)}"), timeout=60)
            out.append((r.status, r.headers.get("Retry-After")))
        return out

    with ThreadPoolExecutor(24) as pool:
        attacks = [pool.submit(attacker, i) for i in range(24)]
        try:
            # Wait until the bound is hit, then check good clients still get in, quickly.
            wait_for(lambda: refusals(setup.proxy, "slowhash", "basic", "busy") > 0, 30,
                     what="the verification bound reached")
            served = []
            for _ in range(10):
                start = time.monotonic()
                r = get(port, "/slowhash/x", good, timeout=30)
                served.append((r.status, time.monotonic() - start))
        finally:
            stop.set()
        results = [x for f in attacks for x in f.result()]
    assert all(status == 200 for status, _ in served), served
    assert max(took for _, took in served) < 2.0, served
    statuses = {status for status, _ in results}
    assert statuses <= {401, 503}, statuses
    assert (503, "1") in results  # beyond the bound: 503 with Retry-After


# --- forward auth ----------------------------------------------------------------------------

def test_forward_2xx_passes_with_the_named_headers(setup: Setup) -> None:
    setup.auth.requests.clear()
    r = get(setup.proxy.port, "/fwd/admin?tab=1", {
        "Cookie": "authelia_session=good", "Host": "app.example.com",
        "Remote-User": "spoofed", "Remote-Email": "evil@example.com",
        "X-Forwarded-For": "6.6.6.6", "X-Original-URL": "https://public.example.com/"})
    assert r.status == 200, r.body
    assert r.seen("Remote-User") == ["alice"]  # the client's own copy never arrives
    assert r.seen("Remote-Groups") == ["admins", "dev"]
    assert r.seen("Remote-Email") == ["alice@example.com"]
    assert r.seen("Remote-Name") == []  # not named in response_headers
    assert r.json()["raw_path"] == "/fwd/admin?tab=1"
    assert "Set-Cookie" not in r.headers
    [asked] = setup.auth.requests
    seen = {k.lower(): v for k, v in asked["headers"]}
    assert asked["method"] == "GET" and asked["path"] == "/api/authz/forward-auth"
    assert asked["body"] == b""
    assert seen["x-forwarded-method"] == "GET"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == "app.example.com"
    assert seen["x-forwarded-uri"] == "/fwd/admin?tab=1"
    assert seen["x-forwarded-for"] == "127.0.0.1"  # the untrusted peer's own address
    assert seen["cookie"] == "authelia_session=good"
    assert "x-original-url" not in seen


def test_forward_spoofed_remote_user_without_a_session_never_reaches_the_replica(
        setup: Setup) -> None:
    r = get(setup.proxy.port, "/fwd/x", {"Remote-User": "admin", "Accept": "application/json"})
    assert r.status == 401
    assert r.body == b"401 Unauthorized"
    assert r.headers["WWW-Authenticate"] == 'Basic realm="authelia"'


def test_forward_302_to_the_login_page_with_set_cookie(setup: Setup) -> None:
    before = refusals(setup.proxy, "fwd", "forward", "status_302")
    r = get(setup.proxy.port, "/fwd/admin?x=1", {"Accept": "text/html", "Host": "app.example.com"})
    assert r.status == 302
    assert r.headers["Location"] == ("https://auth.example.com/?rd="
                                     + quote("http://app.example.com/fwd/admin?x=1", ""))
    assert r.headers.get_all("Set-Cookie") == ["authelia_flow=xyz; HttpOnly; Path=/"]
    assert r.body == b'<a href="https://auth.example.com/">302 Found</a>'
    assert r.headers["Content-Type"] == "text/html; charset=utf-8"
    assert refusals(setup.proxy, "fwd", "forward", "status_302") == before + 1


def test_forward_post_gets_401_and_its_body_is_not_sent(setup: Setup) -> None:
    setup.auth.requests.clear()
    r = requests.post(setup.proxy.url("/fwd/x"), data=b"secret body", timeout=10)
    assert r.status_code == 401
    [asked] = setup.auth.requests
    assert asked["body"] == b""
    seen = {k.lower(): v for k, v in asked["headers"]}
    assert seen["x-forwarded-method"] == "POST" and "content-length" not in seen


def test_forward_trusted_peer_chain(setup: Setup) -> None:
    setup.auth.requests.clear()
    r = get(setup.proxy.port, "/fwd/x", {"Cookie": "authelia_session=good",
                                         "X-Forwarded-For": "198.51.100.9",
                                         "X-Forwarded-Proto": "https",
                                         "X-Forwarded-Host": "app.example.com"},
            source="127.0.0.3")
    assert r.status == 200
    seen = {k.lower(): v for k, v in setup.auth.requests[-1]["headers"]}
    assert seen["x-forwarded-for"] == "198.51.100.9, 127.0.0.3"
    assert seen["x-forwarded-proto"] == "https" and seen["x-forwarded-host"] == "app.example.com"


def test_forward_denial_reaches_the_client_as_the_service_encoded_it(setup: Setup) -> None:
    # The body and its Content-Encoding travel together: never a decoded body still labelled
    # gzip (what an auto-decompressing client would hand on).
    conn = http.client.HTTPConnection("127.0.0.1", setup.proxy.port, timeout=10)
    try:
        conn.request("GET", "/fwdgzip/x", headers={"Accept-Encoding": "gzip"})
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    assert resp.status == 401
    assert resp.getheader("Content-Encoding") == "gzip"
    assert body == GZIPPED_DENIAL
    assert gzip.decompress(body) == b"401 Unauthorized, compressed"


@pytest.mark.parametrize(("path", "cause"), [("/fwddown/x", "unreachable"),
                                             ("/fwdslow/x", "timeout"),
                                             ("/fwdhuge/x", "answer_too_large")])
def test_forward_auth_unavailable_is_503_never_a_pass(setup: Setup, path: str, cause: str) -> None:
    route = path.split("/")[1]
    before = refusals(setup.proxy, route, "forward", cause)
    start = time.monotonic()
    r = get(setup.proxy.port, path, {"Cookie": "authelia_session=good"})
    assert r.status == 503
    assert r.json()["error"]["code"] == "auth_unavailable"
    assert refusals(setup.proxy, route, "forward", cause) == before + 1
    if cause == "timeout":
        assert time.monotonic() - start < 1.5


# --- IP lists ----------------------------------------------------------------------------------

def test_ip_allow_list_from_distinct_loopback_clients(setup: Setup) -> None:
    port = setup.proxy.port
    assert get(port, "/lan/x", source="127.0.0.2").status == 200
    r = get(port, "/lan/x", source="127.0.0.5")
    assert r.status == 403 and r.json()["error"]["code"] == "ip_forbidden"
    assert get(port, "/deny/x", source="127.0.0.4").status == 403
    assert get(port, "/deny/x", source="127.0.0.5").status == 200


def test_ip_untrusted_peer_cannot_claim_an_address(setup: Setup) -> None:
    r = get(setup.proxy.port, "/lan/x", {"X-Forwarded-For": "127.0.0.2"}, source="127.0.0.5")
    assert r.status == 403


def test_ip_trusted_peer_forwards_the_client_address(setup: Setup) -> None:
    port = setup.proxy.port
    assert get(port, "/lan/x", {"X-Forwarded-For": "127.0.0.2"}, source="127.0.0.3").status == 200
    assert get(port, "/lan/x", {"X-Forwarded-For": "127.0.0.66"}, source="127.0.0.3").status == 403
    assert get(port, "/lan/x", {"X-Forwarded-For": "10.9.9.9"}, source="127.0.0.3").status == 403
    # the trusted peer itself is not in the list: without a forwarded client it is refused
    assert get(port, "/lan/x", source="127.0.0.3").status == 403
    assert get(port, "/deny/x", {"X-Forwarded-For": "127.0.0.4"}, source="127.0.0.3").status == 403


def test_ip_is_checked_before_auth(setup: Setup) -> None:
    port = setup.proxy.port
    r = get(port, "/lanbasic/x", source="127.0.0.5")  # no credentials, wrong address
    assert r.status == 403 and "WWW-Authenticate" not in r.headers
    assert get(port, "/lanbasic/x", source="127.0.0.2").status == 401
    assert get(port, "/lanbasic/x", basic("alice", ALICE_PW), source="127.0.0.2").status == 200


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
def test_ip_lists_over_ipv6(tmp_path: Path) -> None:
    with run_backend("v6") as backend:
        routes = write_routes(tmp_path / "routes.toml", {
            "v6": {"path": "/v6", "upstreams": [backend], "ip.allow": ["::1"]},
            "v6deny": {"path": "/v6deny", "upstreams": [backend], "ip.deny": ["::1/128"]}})
        port = free_port()
        with run_proxy(tmp_path, docker="false", routes_file=str(routes),
                           listen=f"[::1]:{port}") as proxy:
            wait_for(lambda: len(proxy.routes()) == 2, what="routes loaded")
            assert get(port, "/v6/x", source="::1", host="::1").status == 200
            assert get(port, "/v6deny/x", source="::1", host="::1").status == 403
