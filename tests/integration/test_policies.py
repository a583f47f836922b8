"""JWT auth and rate limits through the running proxy: routes file, Docker labels, shared Redis."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import engine
import jwt
import pytest
import requests
from docker_fixtures import run_container, unique
from helpers import ProxyProcess, run_backend, run_proxy, wait_for, write_routes
from redis_fixtures import RedisServer

SECRET = "s3cret-for-tests-only-0123456789abcdef"  # >= 32 bytes for HS256


def token(sub: str = "alice", scope: str = "orders:read", exp_in: float = 300,
          **claims: Any) -> str:
    now = int(time.time())
    payload = {"sub": sub, "scope": scope, "iat": now, "exp": now + int(exp_in), **claims}
    return jwt.encode(payload, SECRET, algorithm="HS256")


def bearer(t: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {t}"}


def seen_headers(r: requests.Response) -> dict[str, str]:
    return {k.lower(): v for k, v in r.json()["headers"]}


@pytest.fixture(scope="module")
def backend() -> Iterator[str]:
    with run_backend("policy-backend") as base:
        yield base


@pytest.fixture(scope="module")
def proxy(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    tmp = tmp_path_factory.mktemp("policies")
    routes = write_routes(tmp / "routes.toml", {
        "open": {"path": "/open", "upstreams": [backend], "strip_prefix": True},
        "orders": {"path": "/orders", "upstreams": [backend], "auth": "jwt",
                   "auth.scopes": "orders:read"},
        "admin": {"path": "/admin", "upstreams": [backend], "auth": "jwt",
                  "auth.scopes": "admin"},
        "limited": {"path": "/limited", "upstreams": [backend], "ratelimit": "5/m"},
        "per-user": {"path": "/per-user", "upstreams": [backend], "auth": "jwt",
                     "ratelimit": "3/m", "ratelimit.key": "sub"},
        "per-key": {"path": "/per-key", "upstreams": [backend], "ratelimit": "2/m",
                    "ratelimit.key": "header:X-Api-Key"},
    })
    with run_proxy(tmp, docker="false", routes_file=str(routes), jwt_secret=SECRET) as p:
        yield p


def test_missing_token_is_401_with_challenge(proxy: ProxyProcess) -> None:
    r = requests.get(proxy.url("/orders/1"), timeout=5)
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
    body = r.json()["error"]
    assert body["status"] == 401 and body["request_id"] == r.headers["X-Request-ID"]


@pytest.mark.parametrize(("make", "needle"), [
    (lambda: token(exp_in=-120), "expired"),
    (lambda: token(nbf=int(time.time()) + 600), "not yet valid"),
    (lambda: token()[:-4] + "AAAA", "signature"),
    (lambda: jwt.encode({"sub": "x", "exp": int(time.time()) + 60}, key=None,
                        algorithm="none"), "algorithm"),
    (lambda: "not.a.jwt", "malformed"),
])
def test_bad_tokens_are_401_and_say_why(proxy: ProxyProcess, make: Any, needle: str) -> None:
    r = requests.get(proxy.url("/orders/1"), headers=bearer(make()), timeout=5)
    assert r.status_code == 401
    challenge = r.headers["WWW-Authenticate"]
    assert 'error="invalid_token"' in challenge
    assert needle in challenge.lower(), challenge


def test_valid_token_reaches_backend_with_identity_and_no_spoofing(proxy: ProxyProcess) -> None:
    r = requests.get(proxy.url("/orders/1"), timeout=5,
                     headers={**bearer(token()), "X-Auth-Subject": "mallory",
                              "X-Auth-Scopes": "admin"})
    assert r.status_code == 200
    seen = seen_headers(r)
    assert seen["x-auth-subject"] == "alice"
    assert seen["x-auth-scopes"] == "orders:read"
    # Spoofed identity headers are removed on routes without auth too.
    r = requests.get(proxy.url("/open/x"), headers={"X-Auth-Subject": "mallory"}, timeout=5)
    assert "x-auth-subject" not in seen_headers(r)


def test_missing_scope_is_403(proxy: ProxyProcess) -> None:
    r = requests.get(proxy.url("/admin/x"), headers=bearer(token()), timeout=5)
    assert r.status_code == 403
    assert 'error="insufficient_scope"' in r.headers["WWW-Authenticate"]
    assert r.json()["error"]["code"] == "insufficient_scope"


def test_rate_limit_exactly_n_under_concurrency_with_headers(proxy: ProxyProcess) -> None:
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda _: requests.get(proxy.url("/limited/x"), timeout=5),
                                  range(12)))
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 5 + [429] * 7
    ok = next(r for r in responses if r.status_code == 200)
    assert ok.headers["RateLimit-Policy"] == '"default";q=5;w=60'
    assert ok.headers["RateLimit"].startswith('"default";r=')
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["code"] == "rate_limited"
    assert refused.headers["RateLimit"].startswith('"default";r=0;')


def test_rate_limit_keys_by_subject_and_by_header(proxy: ProxyProcess) -> None:
    def get(path: str, **headers: str) -> int:
        return requests.get(proxy.url(path), headers=headers, timeout=5).status_code

    alice, bob = bearer(token("alice")), bearer(token("bob"))
    assert [get("/per-user/x", **alice) for _ in range(4)] == [200, 200, 200, 429]
    assert get("/per-user/x", **bob) == 200  # bob has his own budget
    assert [get("/per-key/x", **{"X-Api-Key": "k1"}) for _ in range(3)] == [200, 200, 429]
    assert get("/per-key/x", **{"X-Api-Key": "k2"}) == 200


def test_metrics_count_auth_failures_and_rejections(proxy: ProxyProcess) -> None:
    text = requests.get(proxy.admin_base + "/metrics", timeout=5).text
    assert 'edgeproxy_auth_failures_total{reason="missing_token",route="orders"}' in text
    assert 'edgeproxy_ratelimit_rejections_total{route="limited"}' in text


def test_routes_show_policies(proxy: ProxyProcess) -> None:
    routes = proxy.routes()
    assert routes["orders"]["policies"]["auth"] == {"type": "jwt", "scopes": ["orders:read"],
                                                    "audience": None}
    assert routes["limited"]["policies"]["ratelimit"] == {"limit": 5, "period_s": 60.0,
                                                          "burst": 5, "key": "ip"}


def test_auth_route_without_keys_answers_503_others_unaffected(backend: str,
                                                               tmp_path: Path) -> None:
    routes = write_routes(tmp_path / "routes.toml", {
        "open": {"path": "/open", "upstreams": [backend]},
        "secure": {"path": "/secure", "upstreams": [backend], "auth": "jwt"},
    })
    with run_proxy(tmp_path, docker="false", routes_file=str(routes)) as p:
        r = requests.get(p.url("/secure/x"), headers=bearer(token()), timeout=5)
        assert r.status_code == 503
        assert "not configured" in r.json()["error"]["message"]
        assert requests.get(p.url("/open/x"), timeout=5).status_code == 200
        [event] = p.events("route_auth_unavailable")
        assert event["route"] == "secure" and event["level"] == "error", event
        assert p.admin("/healthz")["jwt"]["configured"] is False


def test_two_proxies_on_one_redis_share_one_budget(backend: str, tmp_path: Path,
                                                   redis_server: RedisServer) -> None:
    routes = write_routes(tmp_path / "routes.toml", {
        "shared": {"path": "/shared", "upstreams": [backend], "ratelimit": "6/m"},
    })
    settings = {"docker": "false", "routes_file": str(routes), "ratelimit_backend": "redis",
                "redis_url": redis_server.url}
    with run_proxy(tmp_path, **settings) as a, run_proxy(tmp_path, **settings) as b:
        codes = [requests.get(p.url("/shared/x"), timeout=5).status_code
                 for p in (a, b) * 6]
        assert codes.count(200) == 6 and codes.count(429) == 6
        assert a.admin("/healthz")["ratelimit"] == {"backend": "redis", "healthy": True,
                                                    "last_error": None}


def test_policies_from_docker_labels(docker_engine: None, tmp_path: Path) -> None:
    path = "/" + unique("pol")
    run_container(unique("c"), {"gateway.path": path, "gateway.strip_prefix": "true",
                                "gateway.auth": "jwt", "gateway.auth.scopes": "orders:read",
                                "gateway.ratelimit": "3/m",
                                "gateway.ratelimit.key": "header:X-Api-Key"})
    probes = iter(range(1000))

    def echo(api_key: str) -> requests.Response:
        return requests.get(p.url(path + "/cgi-bin/echo"), timeout=5,
                            headers={**bearer(token()), "X-Api-Key": api_key})

    with run_proxy(tmp_path, jwt_secret=SECRET) as p:
        # Until the container answers, probe with a fresh key each time: no budget is spent.
        ready = wait_for(lambda: (r := echo(f"probe-{next(probes)}")).status_code == 200 and r,
                         10, what="labelled route")
        assert engine.parse_echo(ready.text)["HTTP_X_AUTH_SUBJECT"] == "alice"
        assert requests.get(p.url(path + "/"), timeout=5).status_code == 401
        answers = [echo("k") for _ in range(4)]
        assert [r.status_code for r in answers] == [200, 200, 200, 429]
        assert all("RateLimit-Policy" in r.headers for r in answers)


def test_basic_auth_and_ip_list_from_docker_labels(docker_engine: None, tmp_path: Path) -> None:
    # An entry as `htpasswd -nbB alice pw-alice` wrote it; labels take it with single '$'.
    entry = "alice:$2y$05$60chqj1SQq0tnFQyHYLlD.oL1feUdPNrSuOsvtyejP5WIuczv8Q6."
    path = "/" + unique("adm")
    run_container(unique("c"), {"gateway.path": path, "gateway.strip_prefix": "true",
                                "gateway.auth": "basic", "gateway.auth.users": entry,
                                "gateway.auth.realm": "Admin",
                                "gateway.ip.allow": "127.0.0.0/8"})
    weak = unique("c")
    run_container(weak, {"gateway.path": "/" + unique("weak"), "gateway.auth": "basic",
                         "gateway.auth.users": "bob:$apr1$lY3otKbC$9N//qdbIrmu4Iwwo2O8pC."})
    good = {"Authorization": "Basic " + base64.b64encode(b"alice:pw-alice").decode()}
    with run_proxy(tmp_path) as p:
        ready = wait_for(lambda: (r := requests.get(p.url(path + "/cgi-bin/echo"), headers=good,
                                                    timeout=5)).status_code == 200 and r,
                         10, what="labelled route")
        echoed = engine.parse_echo(ready.text)
        assert echoed["HTTP_X_AUTH_SUBJECT"] == "alice"
        assert "HTTP_AUTHORIZATION" not in echoed
        r = requests.get(p.url(path + "/"), timeout=5)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith(
            'Basic realm="Admin"')
        policies = next(r for r in p.admin("/routes")["routes"] if path in r["paths"])["policies"]
        assert policies["auth"]["type"] == "basic" and policies["ip"]["allow"] == ["127.0.0.0/8"]
        skipped = next(c for c in p.admin("/containers")["containers"]
                       if c["container"] == weak)
        assert "htpasswd -nbB bob" in json.dumps(skipped)
