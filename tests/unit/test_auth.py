"""edgeproxy.policies.auth: JWT verification with real keys and an in-process JWKS server."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from helpers import free_port
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from edgeproxy.core.jws import parse_algorithms
from edgeproxy.policies import auth
from edgeproxy.policies.auth import (
    AuthFailure,
    Identity,
    JwtConfig,
    JwtVerifier,
    jwt_config_problem,
)

T = TypeVar("T")

SECRET = secrets.token_urlsafe(48)
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_KEY_2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
ISS = "https://idp.example"
AUD = "orders-api"


def public_pem(key: Any) -> str:
    return str(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode())


RSA_PEM = public_pem(RSA_KEY)
EC_PEM = public_pem(EC_KEY)
ED_PEM = public_pem(ED_KEY)


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro
    return asyncio.run(main())


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"sub": "user-1", "iss": ISS, "aud": AUD, "iat": now, "exp": now + 300,
                            "scope": "orders:read orders:write"}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def token(key: Any = SECRET, alg: str = "HS256", headers: dict[str, Any] | None = None,
          **extra: Any) -> str:
    return jwt.encode(claims(**extra), key, algorithm=alg, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict[str, Any], payload: dict[str, Any], sign: Callable[[bytes], bytes]) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64(sign(signing_input.encode()))}"


def bearer(tok: str) -> str:
    return f"Bearer {tok}"


def hs_config(**kw: Any) -> JwtConfig:
    return JwtConfig(secret=SECRET, issuer=ISS, audience=AUD, **kw)


def fail(verifier: JwtVerifier, authorization: str | None, **kw: Any) -> AuthFailure:
    with pytest.raises(AuthFailure) as info:
        run(verifier.verify(authorization, **kw))
    return info.value


def jwk(key: Any, kid: str | None, **extra: Any) -> dict[str, Any]:
    pub = key.public_key()
    algo = RSAAlgorithm if isinstance(pub, rsa.RSAPublicKey) else ECAlgorithm
    d: dict[str, Any] = dict(algo.to_jwk(pub, as_dict=True))
    if kid is not None:
        d["kid"] = kid
    d.update(extra)
    return d


@dataclass
class JwksServer:
    url: str
    keys: list[dict[str, Any]]
    hits: list[float] = field(default_factory=list)


@asynccontextmanager
async def jwks_server(keys: list[dict[str, Any]], *, hang: bool = False) -> AsyncIterator[JwksServer]:
    release = asyncio.Event()
    server = JwksServer("", keys)

    async def handler(_: web.Request) -> web.Response:
        server.hits.append(time.monotonic())
        if hang:
            await release.wait()
        return web.json_response({"keys": server.keys})

    app = web.Application()
    app.router.add_get("/jwks", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server.url = f"http://127.0.0.1:{port}/jwks"
    try:
        yield server
    finally:
        release.set()
        await runner.cleanup()


# --- happy paths ----------------------------------------------------------------------------


def test_hs256_valid() -> None:
    v = JwtVerifier(hs_config())
    ident = run(v.verify(bearer(token())))
    assert ident.subject == "user-1"
    assert ident.scopes == ("orders:read", "orders:write")
    assert ident.expires_at == pytest.approx(time.time() + 300, abs=5)


@pytest.mark.parametrize(("key", "pem", "alg"), [
    (RSA_KEY, RSA_PEM, "RS256"), (RSA_KEY, RSA_PEM, "PS256"), (EC_KEY, EC_PEM, "ES256"),
    (ED_KEY, ED_PEM, "EdDSA"),
])
def test_asymmetric_pem_valid(key: Any, pem: str, alg: str) -> None:
    v = JwtVerifier(JwtConfig(public_keys=(pem,), issuer=ISS, audience=AUD))
    assert v.problem is None
    assert run(v.verify(bearer(token(key, alg)))).subject == "user-1"


def test_pem_file_with_two_keys_for_rotation() -> None:
    v = JwtVerifier(JwtConfig(public_keys=(RSA_PEM + "\n" + public_pem(RSA_KEY_2),)))
    assert run(v.verify(bearer(token(RSA_KEY_2, "RS256")))).subject == "user-1"
    assert run(v.verify(bearer(token(RSA_KEY, "RS256")))).subject == "user-1"


def test_scopes_from_scope_string_and_scp_list() -> None:
    v = JwtVerifier(hs_config())
    ident = run(v.verify(bearer(token(scope="a b  c"))))
    assert ident.scopes == ("a", "b", "c")
    ident = run(v.verify(bearer(token(scope=None, scp=["orders:read", "x"]))))
    assert ident.scopes == ("orders:read", "x")
    run(v.verify(bearer(token(scope=None, scp=["orders:read"])), scopes=("orders:read",)))
    ident = run(v.verify(bearer(token(scope=None, scp="orders:read orders:write"))))
    assert ident.scopes == ("orders:read", "orders:write")


def test_missing_sub_gives_empty_subject() -> None:
    assert run(JwtVerifier(hs_config()).verify(bearer(token(sub=None)))).subject == ""


# --- 401s, each with its own description ----------------------------------------------------


def test_expired() -> None:
    f = fail(JwtVerifier(hs_config(leeway=0)), bearer(token(exp=int(time.time()) - 10)))
    assert (f.status, f.error, f.cause) == (401, "invalid_token", "expired")
    assert f.www_authenticate() == 'Bearer error="invalid_token", error_description="token expired"'


def test_leeway_accepts_recently_expired() -> None:
    v = JwtVerifier(hs_config(leeway=30))
    assert run(v.verify(bearer(token(exp=int(time.time()) - 10)))).subject == "user-1"


def test_not_yet_valid() -> None:
    v = JwtVerifier(hs_config(leeway=5))
    f = fail(v, bearer(token(nbf=int(time.time()) + 120)))
    assert (f.status, f.cause) == (401, "not_yet_valid")
    f = fail(v, bearer(token(iat=int(time.time()) + 120)))
    assert f.cause == "not_yet_valid"


def test_wrong_issuer_and_missing_issuer() -> None:
    v = JwtVerifier(hs_config())
    assert fail(v, bearer(token(iss="https://evil.example"))).cause == "wrong_issuer"
    assert fail(v, bearer(token(iss=None))).cause == "wrong_issuer"


def test_wrong_audience_and_route_override() -> None:
    v = JwtVerifier(hs_config())
    assert fail(v, bearer(token(aud="other"))).cause == "wrong_audience"
    assert fail(v, bearer(token(aud=None))).cause == "wrong_audience"
    # gateway.auth.audience on a route replaces the configured audience
    assert run(v.verify(bearer(token(aud="billing")), audience="billing")).subject == "user-1"
    assert fail(v, bearer(token()), audience="billing").cause == "wrong_audience"


def test_no_audience_configured_accepts_any_aud() -> None:
    v = JwtVerifier(JwtConfig(secret=SECRET))
    assert run(v.verify(bearer(token(aud="whatever")))).subject == "user-1"


def test_tampered_payload_is_bad_signature() -> None:
    tok = token()
    head, _, sig = tok.split(".")
    forged = b64(json.dumps(claims(sub="admin")).encode())
    f = fail(JwtVerifier(hs_config()), bearer(f"{head}.{forged}.{sig}"))
    assert (f.status, f.cause) == (401, "bad_signature")


def test_wrong_secret_is_bad_signature() -> None:
    f = fail(JwtVerifier(hs_config()), bearer(token(secrets.token_urlsafe(48))))
    assert f.cause == "bad_signature"


def test_alg_none_refused() -> None:
    tok = hand_made({"alg": "none", "typ": "JWT"}, claims(), lambda _: b"")
    for config in (hs_config(), JwtConfig(public_keys=(RSA_PEM,))):
        f = fail(JwtVerifier(config), bearer(tok))
        assert (f.status, f.cause) == (401, "algorithm_not_allowed")


def test_algorithm_outside_allow_list() -> None:
    long_secret = secrets.token_urlsafe(64)
    v = JwtVerifier(JwtConfig(secret=long_secret, algorithms=("HS512",)))
    assert run(v.verify(bearer(token(long_secret, "HS512")))).subject == "user-1"
    assert fail(v, bearer(token(long_secret, "HS256"))).cause == "algorithm_not_allowed"


def test_hs256_signed_with_the_rsa_public_key_fails() -> None:
    """CVE-2022-29217-style key confusion: the public PEM used as an HMAC secret."""
    def sign(data: bytes) -> bytes:
        return hmac.new(RSA_PEM.encode(), data, hashlib.sha256).digest()
    tok = hand_made({"alg": "HS256", "typ": "JWT"}, claims(), sign)
    # only an RSA key: HS256 is not even allowed
    f = fail(JwtVerifier(JwtConfig(public_keys=(RSA_PEM,))), bearer(tok))
    assert f.cause == "algorithm_not_allowed"
    # both a secret and the RSA key, both families allowed: HS256 uses the secret only
    v = JwtVerifier(JwtConfig(secret=SECRET, public_keys=(RSA_PEM,),
                              algorithms=("HS256", "RS256")))
    assert v.problem is None
    assert fail(v, bearer(tok)).cause == "bad_signature"
    assert run(v.verify(bearer(token(RSA_KEY, "RS256")))).subject == "user-1"
    assert run(v.verify(bearer(token()))).subject == "user-1"


def test_key_of_other_family_never_used() -> None:
    # An EC token against an RSA-only config: ES256 is not derived as allowed.
    assert fail(JwtVerifier(JwtConfig(public_keys=(RSA_PEM,))),
                bearer(token(EC_KEY, "ES256"))).cause == "algorithm_not_allowed"
    # Explicitly allowed, but no configured key fits it.
    v = JwtVerifier(JwtConfig(public_keys=(RSA_PEM,), algorithms=("RS256", "ES256")))
    assert fail(v, bearer(token(EC_KEY, "ES256"))).cause == "no_key"


def test_missing_exp() -> None:
    f = fail(JwtVerifier(hs_config()), bearer(token(exp=None)))
    assert (f.status, f.cause, f.description) == (401, "missing_exp", "missing exp claim")


@pytest.mark.parametrize(("header", "cause"), [
    (None, "missing_token"),
    ("", "missing_token"),
    ("Basic dXNlcjpwYXNz", "malformed_header"),
    ("Bearer", "malformed_header"),
    ("Bearer    ", "malformed_header"),
    ("Bearer not-a-jwt", "malformed_token"),
    ("Bearer a.b", "malformed_token"),
    ("Bearer a.b.c", "malformed_token"),
    ("Bearer " + "a" * 20000 + ".b.c", "malformed_token"),
])
def test_missing_and_malformed(header: str | None, cause: str) -> None:
    f = fail(JwtVerifier(hs_config()), header)
    assert (f.status, f.error, f.cause) == (401, "invalid_token", cause)


def test_bearer_scheme_is_case_insensitive() -> None:
    assert run(JwtVerifier(hs_config()).verify("bearer " + token())).subject == "user-1"


def test_descriptions_are_distinct_per_cause() -> None:
    v = JwtVerifier(hs_config(leeway=0))
    now = int(time.time())
    cases = [
        None, "Basic x", "Bearer x", bearer(token(secrets.token_urlsafe(48))),
        bearer(token(exp=now - 10)), bearer(token(nbf=now + 100)), bearer(token(iss="x")),
        bearer(token(aud="x")), bearer(token(exp=None)),
        bearer(hand_made({"alg": "none"}, claims(), lambda _: b"")),
    ]
    descriptions = [fail(v, c).description for c in cases]
    descriptions.append(fail(v, bearer(token()), scopes=("admin",)).description)
    assert len(set(descriptions)) == len(descriptions), descriptions
    for d in descriptions:
        assert '"' not in d and "\\" not in d


# --- 403 --------------------------------------------------------------------------------------


def test_missing_scope_is_403() -> None:
    v = JwtVerifier(hs_config())
    f = fail(v, bearer(token(scope="orders:read")), scopes=("orders:read", "orders:write"))
    assert (f.status, f.error, f.cause) == (403, "insufficient_scope", "insufficient_scope")
    assert f.www_authenticate() == ('Bearer error="insufficient_scope", error_description='
                                    '"missing scope orders:write", scope="orders:read orders:write"')
    ident = run(v.verify(bearer(token()), scopes=("orders:read", "orders:write")))
    assert ident.subject == "user-1"


# --- cache ------------------------------------------------------------------------------------


def test_cache_skips_decode_for_a_hot_token(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str | None] = []
    real = jwt.decode

    def counting(*args: Any, **kw: Any) -> Any:
        calls.append(kw.get("audience"))
        return real(*args, **kw)

    monkeypatch.setattr(jwt, "decode", counting)
    v = JwtVerifier(hs_config())
    tok = bearer(token())
    assert run(v.verify(tok)) == run(v.verify(tok))
    assert len(calls) == 1
    # scopes are checked after the cache: a 403 on another route costs no decode either
    assert fail(v, tok, scopes=("admin",)).status == 403
    assert len(calls) == 1
    # the audience is part of the cache key
    assert fail(v, tok, audience="billing").cause == "wrong_audience"
    assert len(calls) == 2


def test_cache_never_serves_past_exp(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    real = jwt.decode

    def counting(*args: Any, **kw: Any) -> Any:
        nonlocal calls
        calls += 1
        return real(*args, **kw)

    monkeypatch.setattr(jwt, "decode", counting)
    # expired 5 s ago but inside the 30 s leeway: accepted, but never cached
    v = JwtVerifier(hs_config(leeway=30))
    tok = bearer(token(exp=int(time.time()) - 5))
    run(v.verify(tok))
    run(v.verify(tok))
    assert calls == 2


def test_cache_is_bounded() -> None:
    v = JwtVerifier(hs_config(cache_size=10))
    for i in range(50):
        run(v.verify(bearer(token(sub=f"u{i}"))))
    assert v._cache is not None and len(v._cache) <= 10


def test_cache_disabled_with_size_zero() -> None:
    v = JwtVerifier(hs_config(cache_size=0))
    tok = bearer(token())
    assert run(v.verify(tok)).subject == run(v.verify(tok)).subject == "user-1"


# --- JWKS -------------------------------------------------------------------------------------


def test_jwks_valid_and_unknown_kid_with_cooldown() -> None:
    async def main() -> None:
        async with jwks_server([jwk(RSA_KEY, "k1"), jwk(EC_KEY, "e1")]) as srv:
            v = JwtVerifier(JwtConfig(jwks_url=srv.url, issuer=ISS, audience=AUD,
                                      jwks_cooldown=30))
            await v.start()
            try:
                ident = await v.verify(bearer(token(RSA_KEY, "RS256", {"kid": "k1"})))
                assert ident.subject == "user-1"
                ident = await v.verify(bearer(token(EC_KEY, "ES256", {"kid": "e1"})))
                assert ident.subject == "user-1"
                assert len(srv.hits) == 1
                # a new kid appears at the provider, but the last fetch was < cooldown ago
                srv.keys.append(jwk(RSA_KEY_2, "k2"))
                with pytest.raises(AuthFailure) as info:
                    await v.verify(bearer(token(RSA_KEY_2, "RS256", {"kid": "k2"})))
                assert (info.value.status, info.value.cause) == (401, "unknown_kid")
                for _ in range(5):
                    with pytest.raises(AuthFailure):
                        await v.verify(bearer(token(RSA_KEY_2, "RS256", {"kid": "k9"})))
                assert len(srv.hits) == 1
                assert v.jwks_fetches == 1
            finally:
                await v.close()
    run(main())


def test_jwks_unknown_kid_refetches_after_cooldown() -> None:
    async def main() -> None:
        async with jwks_server([jwk(RSA_KEY, "k1")]) as srv:
            v = JwtVerifier(JwtConfig(jwks_url=srv.url, jwks_cooldown=0))
            try:
                assert (await v.verify(bearer(token(RSA_KEY, "RS256", {"kid": "k1"})))).subject
                assert len(srv.hits) == 1
                # known kid: no fetch
                await v.verify(bearer(token(RSA_KEY, "RS256", {"kid": "k1"}, sub="u2")))
                assert len(srv.hits) == 1
                with pytest.raises(AuthFailure) as info:
                    await v.verify(bearer(token(RSA_KEY_2, "RS256", {"kid": "k2"})))
                assert info.value.cause == "unknown_kid"
                assert len(srv.hits) == 2
                srv.keys.append(jwk(RSA_KEY_2, "k2"))  # the provider rotates
                ident = await v.verify(bearer(token(RSA_KEY_2, "RS256", {"kid": "k2"})))
                assert ident.subject == "user-1"
                assert len(srv.hits) == 3
            finally:
                await v.close()
    run(main())


def test_jwks_concurrent_requests_share_one_fetch() -> None:
    async def main() -> None:
        async with jwks_server([jwk(RSA_KEY, "k1")]) as srv:
            v = JwtVerifier(JwtConfig(jwks_url=srv.url))
            try:
                toks = [bearer(token(RSA_KEY, "RS256", {"kid": "k1"}, sub=f"u{i}"))
                        for i in range(20)]
                idents = await asyncio.gather(*(v.verify(t) for t in toks))
                assert {i.subject for i in idents} == {f"u{i}" for i in range(20)}
                assert len(srv.hits) == 1
            finally:
                await v.close()
    run(main())


def test_jwks_that_hangs_answers_within_the_timeout() -> None:
    async def main() -> None:
        async with jwks_server([jwk(RSA_KEY, "k1")], hang=True) as srv:
            v = JwtVerifier(JwtConfig(jwks_url=srv.url, jwks_timeout=0.3, jwks_cooldown=30))
            await v.start()
            try:
                tok = bearer(token(RSA_KEY, "RS256", {"kid": "k1"}))
                start = time.monotonic()
                results = await asyncio.gather(*(v.verify(tok) for _ in range(10)),
                                               return_exceptions=True)
                elapsed = time.monotonic() - start
                assert elapsed < 1.5, elapsed
                assert all(isinstance(r, AuthFailure) and r.status == 503
                           and r.cause == "jwks_unavailable" for r in results), results
                assert v.jwks_error is not None and "timed out" in v.jwks_error
                # within the cooldown: answered at once, no new fetch
                start = time.monotonic()
                with pytest.raises(AuthFailure):
                    await v.verify(tok)
                assert time.monotonic() - start < 0.1
                assert len(srv.hits) == 1
            finally:
                await v.close()
    run(main())


def test_jwks_dead_endpoint_is_prompt_503() -> None:
    async def main() -> None:
        v = JwtVerifier(JwtConfig(jwks_url=f"http://127.0.0.1:{free_port()}/jwks",
                                  jwks_timeout=2))
        try:
            start = time.monotonic()
            with pytest.raises(AuthFailure) as info:
                await v.verify(bearer(token(RSA_KEY, "RS256", {"kid": "k1"})))
            assert time.monotonic() - start < 1.0
            assert info.value.status == 503 and info.value.www_authenticate() is None
            assert v.jwks_error
        finally:
            await v.close()
    run(main())


def test_jwks_keeps_keys_when_a_refetch_fails() -> None:
    async def main() -> None:
        async with jwks_server([jwk(RSA_KEY, "k1")]) as srv:
            v = JwtVerifier(JwtConfig(jwks_url=srv.url, jwks_cooldown=0))
            try:
                await v.verify(bearer(token(RSA_KEY, "RS256", {"kid": "k1"})))
                srv.keys.clear()  # now an empty, unusable set
                with pytest.raises(AuthFailure) as info:
                    await v.verify(bearer(token(RSA_KEY, "RS256", {"kid": "k2"})))
                assert info.value.cause == "unknown_kid"
                assert v.jwks_error == "no usable signature keys"
                await v.verify(bearer(token(RSA_KEY, "RS256", {"kid": "k1"}, sub="again")))
            finally:
                await v.close()
    run(main())


def test_jwks_kid_bound_to_its_key_type_and_oct_keys_skipped() -> None:
    async def main() -> None:
        oct_key = {"kty": "oct", "kid": "h1", "k": b64(SECRET.encode())}
        async with jwks_server([jwk(EC_KEY, "e1"), oct_key, jwk(RSA_KEY, "r1", alg="RS256")]) as srv:
            v = JwtVerifier(JwtConfig(jwks_url=srv.url, jwks_cooldown=30))
            try:
                # RS256 token naming the EC key
                with pytest.raises(AuthFailure) as info:
                    await v.verify(bearer(token(RSA_KEY, "RS256", {"kid": "e1"})))
                assert info.value.cause == "algorithm_not_allowed"
                # the JWK pins alg=RS256: PS256 with the same key is refused
                with pytest.raises(AuthFailure) as info:
                    await v.verify(bearer(token(RSA_KEY, "PS256", {"kid": "r1"})))
                assert info.value.cause == "algorithm_not_allowed"
                # a symmetric JWK is never used: HS256 isn't allowed for a JWKS-only config
                with pytest.raises(AuthFailure) as info:
                    await v.verify(bearer(token(SECRET, "HS256", {"kid": "h1"})))
                assert info.value.cause == "algorithm_not_allowed"
                assert (await v.verify(bearer(token(RSA_KEY, "RS256", {"kid": "r1"})))).subject
            finally:
                await v.close()
    run(main())


def test_jku_and_jwk_headers_are_ignored() -> None:
    async def main() -> None:
        attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        async with jwks_server([jwk(attacker, "evil")]) as evil:
            v = JwtVerifier(JwtConfig(public_keys=(RSA_PEM,)))
            headers = {"kid": "evil", "jku": evil.url, "x5u": evil.url,
                       "jwk": jwk(attacker, "evil")}
            with pytest.raises(AuthFailure) as info:
                await v.verify(bearer(token(attacker, "RS256", headers)))
            assert info.value.cause == "bad_signature"
            assert evil.hits == []
    run(main())


def test_token_without_kid_tries_fitting_jwks_keys() -> None:
    async def main() -> None:
        async with jwks_server([jwk(RSA_KEY_2, "k2"), jwk(RSA_KEY, "k1")]) as srv:
            v = JwtVerifier(JwtConfig(jwks_url=srv.url))
            try:
                assert (await v.verify(bearer(token(RSA_KEY, "RS256")))).subject == "user-1"
            finally:
                await v.close()
    run(main())


# --- configuration ----------------------------------------------------------------------------


def test_unconfigured_verifier_answers_503() -> None:
    v = JwtVerifier(JwtConfig())
    assert v.problem is not None and "no JWT key is configured" in v.problem
    f = fail(v, bearer(token()))
    assert (f.status, f.error, f.cause) == (503, None, "not_configured")
    assert f.www_authenticate() is None
    run(v.start())  # logs the reason, does not raise
    run(v.close())


@pytest.mark.parametrize(("config", "words"), [
    (JwtConfig(), "no JWT key is configured"),
    (JwtConfig(secret=SECRET, algorithms=("none",)), "'none'"),
    (JwtConfig(secret=SECRET, algorithms=("HS257",)), "unknown algorithm"),
    (JwtConfig(public_keys=(RSA_PEM,), algorithms=("HS256",)), "EDGEPROXY_JWT_SECRET is not set"),
    (JwtConfig(secret=SECRET, algorithms=("RS256",)), "no public key or EDGEPROXY_JWKS_URL"),
    (JwtConfig(secret="short"), "needs at least 32"),
    (JwtConfig(secret=secrets.token_urlsafe(32), algorithms=("HS512",)), "HS512 needs at least 64"),
    (JwtConfig(secret=RSA_PEM), "PEM"),
    (JwtConfig(public_keys=("not a key",)), "not PEM"),
    (JwtConfig(public_keys=(RSA_KEY.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode(),)), "private key"),
    # a weak key on purpose: the config check must refuse it
    (JwtConfig(public_keys=(public_pem(rsa.generate_private_key(65537, 1024)),)),  # noqa: S505
     "1024-bit"),
    (JwtConfig(public_keys=(RSA_PEM,), algorithms=("ES256",)), "fits the configured RSA"),
    (JwtConfig(jwks_url="ftp://idp/jwks"), "not an http(s) URL"),
    (JwtConfig(secret=SECRET, leeway=-1), "leeway"),
])
def test_config_problems(config: JwtConfig, words: str) -> None:
    problem = jwt_config_problem(config)
    assert problem is not None and words in problem, problem


def test_good_configs_and_derived_algorithms() -> None:
    assert jwt_config_problem(JwtConfig(secret=SECRET)) is None
    assert JwtConfig(secret="x" * 32).allowed_algorithms == ("HS256",)
    assert JwtConfig(secret="x" * 64).allowed_algorithms == ("HS256", "HS384", "HS512")
    assert JwtConfig(public_keys=(EC_PEM,)).allowed_algorithms == ("ES256",)
    assert JwtConfig(public_keys=(ED_PEM,)).allowed_algorithms == ("EdDSA",)
    rsa_algs = JwtConfig(public_keys=(RSA_PEM,)).allowed_algorithms
    assert "RS256" in rsa_algs and "PS256" in rsa_algs and "HS256" not in rsa_algs
    jwks_algs = JwtConfig(jwks_url="https://idp/jwks").allowed_algorithms
    assert "HS256" not in jwks_algs and "ES256" in jwks_algs and "none" not in jwks_algs
    assert jwt_config_problem(JwtConfig(jwks_url="https://idp.example/.well-known/jwks.json")) is None
    assert jwt_config_problem(JwtConfig(secret=SECRET, public_keys=(RSA_PEM,))) is None


def test_parse_algorithms() -> None:
    assert parse_algorithms("RS256, es256 EdDSA") == ("RS256", "ES256", "EdDSA")
    assert parse_algorithms("HS256,HS256") == ("HS256",)
    for bad, words in (("none", "'none'"), ("RS256,None", "'none'"), ("RS1", "'RS1' is not one"),
                       ("", "comma-separated")):
        with pytest.raises(ValueError, match=words):
            parse_algorithms(bad)


def test_identity_is_frozen() -> None:
    ident = Identity("u", ("a",), 1.0)
    with pytest.raises(AttributeError):
        ident.subject = "v"  # type: ignore[misc]
    assert auth.token_scopes({"scope": 3, "scp": ["a", 4, ""]}) == ("a",)
