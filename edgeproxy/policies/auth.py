"""JWT bearer authentication: keys from settings (HMAC secret, PEM keys, a JWKS URL), a cache of
verified tokens, and failures that map to 401/403/503 with RFC 6750 `WWW-Authenticate` values.

Security rules kept here on purpose (see ../shared/REFERENCE.md, JWT):
- the accepted algorithms always come from the configuration, never from the token;
- a key is only ever used with algorithms of its own family: the HMAC secret only for HS*, PEM and
  JWKS keys only for RS*/PS*/ES*/EdDSA, so a token "signed" with the public key as an HMAC secret
  cannot verify (CVE-2022-29217 style key confusion), and `none` can never be allowed;
- `kid` only indexes keys we fetched from the configured JWKS URL; `jku`, `x5u` and `jwk` headers
  are never looked at;
- the JWKS is fetched with aiohttp under a timeout, one fetch at a time, at most once per cooldown
  on unknown `kid`s, so a slow or dead identity provider never hangs requests.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt
from cachetools import TLRUCache
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.exceptions import InvalidJTIError, InvalidSubjectError

from edgeproxy.core.jws import (
    ALGORITHMS_EXPECTED,
    EC_ALGORITHMS,
    HMAC_ALGORITHMS,
    KNOWN_ALGORITHMS,
    OKP_ALGORITHMS,
    RSA_ALGORITHMS,
)
from edgeproxy.core.logs import get_logger

# RFC 7518 3.2: an HMAC key MUST be at least as long as the hash output.
_MIN_SECRET_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
_MIN_RSA_BITS = 2048
_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521", "secp256k1": "secp256k1"}
_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----.*?-----END \1-----", re.DOTALL)
# JWS compact serialisation; the signature part may be empty only for alg=none, refused later.
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_MAX_TOKEN = 16 * 1024
_MAX_JWKS_BYTES = 1024 * 1024
_MAX_JWKS_KEYS = 100
# A token without `kid` is tried against every key that fits its alg; cap the signature checks an
# anonymous client can make us do per request.
_MAX_CANDIDATES = 8

def split_pem(text: str) -> tuple[str, ...]:
    """Every PEM block in `text` (a key file may hold several keys during a rotation)."""
    return tuple(m.group(0) for m in _PEM_BLOCK.finditer(text))


@dataclass(frozen=True, slots=True)
class JwtConfig:
    """Keys and rules for `gateway.auth=jwt`, from EDGEPROXY_JWT_* settings.

    `public_keys` holds PEM texts (public keys or certificates; one text may hold several
    blocks). `algorithms=()` means: derived from the keys that are set (see
    `allowed_algorithms`). `leeway` applies to exp, nbf and iat. `jwks_max_age`: keys older than
    this are refreshed in the background so a key removed by the provider stops working.
    """

    secret: str | None = None
    public_keys: tuple[str, ...] = ()
    jwks_url: str | None = None
    algorithms: tuple[str, ...] = ()
    issuer: str | None = None
    audience: str | None = None
    leeway: float = 30.0
    jwks_timeout: float = 3.0
    jwks_cooldown: float = 30.0
    cache_size: int = 10000
    jwks_max_age: float = 600.0

    @property
    def allowed_algorithms(self) -> tuple[str, ...]:
        """The explicit allow-list, or the algorithms the configured keys can verify."""
        return self.algorithms or _derived_algorithms(self)


@dataclass(frozen=True, slots=True)
class _Key:
    """One verification key and what it may be used for."""

    key: Any  # a cryptography public key object, or the HMAC secret as bytes
    kty: str  # 'oct', 'RSA', 'EC' or 'OKP', as in JWK
    crv: str | None = None  # JWK curve name for EC and OKP keys
    alg: str | None = None  # an `alg` pinned by the JWK, if any
    kid: str | None = None
    source: str = ""


def _fits(alg: str, key: _Key) -> bool:
    """True when `key` may verify a token signed with `alg`: the family check against confusion."""
    if key.alg is not None and key.alg != alg:
        return False
    if alg in HMAC_ALGORITHMS:
        return key.kty == "oct"
    if alg in RSA_ALGORITHMS:
        return key.kty == "RSA"
    if alg in EC_ALGORITHMS:
        return key.kty == "EC" and key.crv == EC_ALGORITHMS[alg]
    if alg in OKP_ALGORITHMS:
        return key.kty == "OKP"
    return False


def _public_key(obj: Any, source: str) -> _Key:
    """A cryptography public key object -> _Key, or ValueError naming what is unsupported."""
    if isinstance(obj, rsa.RSAPublicKey):
        if obj.key_size < _MIN_RSA_BITS:
            raise ValueError(f"{source} is a {obj.key_size}-bit RSA key; at least {_MIN_RSA_BITS} "
                             "bits are required")
        return _Key(obj, "RSA", source=source)
    if isinstance(obj, ec.EllipticCurvePublicKey):
        crv = _CURVES.get(obj.curve.name)
        if crv is None:
            raise ValueError(f"{source} uses curve {obj.curve.name}, which JWS does not define")
        return _Key(obj, "EC", crv, source=source)
    if isinstance(obj, ed25519.Ed25519PublicKey):
        return _Key(obj, "OKP", "Ed25519", source=source)
    if isinstance(obj, ed448.Ed448PublicKey):
        return _Key(obj, "OKP", "Ed448", source=source)
    raise ValueError(f"{source} is a {type(obj).__name__}; expected an RSA, EC or Ed25519/Ed448 key")


def _load_pem_keys(texts: Iterable[str]) -> list[_Key]:
    """PEM public keys or certificates -> keys; ValueError says which one is unusable and why."""
    keys: list[_Key] = []
    for i, text in enumerate(texts, 1):
        blocks = split_pem(text)
        if not blocks:
            raise ValueError(f"public key #{i} is not PEM (expected -----BEGIN PUBLIC KEY-----)")
        for j, block in enumerate(blocks, 1):
            source = f"public key #{i}" + (f" block {j}" if len(blocks) > 1 else "")
            kind = block.split("-----", 2)[1].removeprefix("BEGIN ")
            if "PRIVATE" in kind:
                raise ValueError(f"{source} is a private key; give the proxy the public key only")
            try:
                if kind == "CERTIFICATE":
                    obj: Any = x509.load_pem_x509_certificate(block.encode()).public_key()
                else:
                    obj = load_pem_public_key(block.encode())
            except ValueError as exc:
                raise ValueError(f"{source} cannot be read: {exc}") from None
            keys.append(_public_key(obj, source))
    return keys


def _derived_algorithms(cfg: JwtConfig) -> tuple[str, ...]:
    out: list[str] = []
    if cfg.secret:
        size = len(cfg.secret.encode())
        out += [a for a in HMAC_ALGORITHMS if size >= _MIN_SECRET_BYTES[a]] or ["HS256"]
    try:
        pem = _load_pem_keys(cfg.public_keys)
    except ValueError:
        pem = []
    if cfg.jwks_url:
        # JWKS keys are typed (kty/crv/alg) and checked per key by _fits, so the wide list is safe.
        out += [a for a in KNOWN_ALGORITHMS if a not in HMAC_ALGORITHMS]
    else:
        out += [a for a in KNOWN_ALGORITHMS if any(_fits(a, k) for k in pem)]
    return tuple(dict.fromkeys(out))


def jwt_config_problem(cfg: JwtConfig) -> str | None:
    """None when `cfg` can verify tokens; else one sentence saying what is wrong or missing."""
    if cfg.leeway < 0 or cfg.jwks_timeout <= 0 or cfg.jwks_cooldown < 0 or cfg.cache_size < 0:
        return ("JWT leeway and JWKS cooldown must be >= 0, the JWKS timeout > 0 and the cache "
                "size >= 0")
    if any(a.lower() == "none" for a in cfg.algorithms):
        return "EDGEPROXY_JWT_ALGORITHMS allows 'none' (unsigned tokens), which can never be allowed"
    unknown = [a for a in cfg.algorithms if a not in KNOWN_ALGORITHMS]
    if unknown:
        return (f"EDGEPROXY_JWT_ALGORITHMS has unknown algorithm(s) {', '.join(unknown)}; "
                f"expected {ALGORITHMS_EXPECTED}")
    if not cfg.secret and not cfg.public_keys and not cfg.jwks_url:
        return ("no JWT key is configured: set EDGEPROXY_JWT_SECRET, EDGEPROXY_JWT_PUBLIC_KEY "
                "(or EDGEPROXY_JWT_PUBLIC_KEY_FILE) or EDGEPROXY_JWKS_URL")
    if cfg.jwks_url is not None and not re.fullmatch(r"https?://[^/\s]+(/\S*)?", cfg.jwks_url):
        return f"EDGEPROXY_JWKS_URL={cfg.jwks_url!r} is not an http(s) URL"
    try:
        pem = _load_pem_keys(cfg.public_keys)
    except ValueError as exc:
        return f"EDGEPROXY_JWT_PUBLIC_KEY: {exc}"
    algs = cfg.allowed_algorithms
    hmac = [a for a in algs if a in HMAC_ALGORITHMS]
    asym = [a for a in algs if a not in HMAC_ALGORITHMS]
    if cfg.secret:
        if split_pem(cfg.secret) or cfg.secret.lstrip().startswith("-----BEGIN"):
            return ("EDGEPROXY_JWT_SECRET holds a PEM key; an HMAC secret must be random bytes, and "
                    "public keys go in EDGEPROXY_JWT_PUBLIC_KEY")
        size = len(cfg.secret.encode())
        short = [a for a in hmac or ["HS256"] if size < _MIN_SECRET_BYTES[a]]
        if short:
            need = _MIN_SECRET_BYTES[short[-1]]
            return (f"EDGEPROXY_JWT_SECRET is {size} bytes; {short[-1]} needs at least {need} "
                    "(RFC 7518 3.2)")
    if hmac and not cfg.secret:
        return (f"{hmac[0]} is allowed but EDGEPROXY_JWT_SECRET is not set (an HMAC algorithm "
                "verifies only with the shared secret, never with a public key)")
    if asym and not pem and not cfg.jwks_url:
        return (f"{asym[0]} is allowed but no public key or EDGEPROXY_JWKS_URL is configured "
                "(the HMAC secret is never used for asymmetric algorithms)")
    if pem and not cfg.jwks_url and not hmac and not any(_fits(a, k) for a in asym for k in pem):
        kinds = "/".join(dict.fromkeys(k.kty for k in pem))
        return (f"no allowed algorithm ({', '.join(algs)}) fits the configured {kinds} public "
                "key(s)")
    if not algs:
        return "no algorithm is allowed"
    return None


class AuthFailure(Exception):
    """A request is not let through: 401 (invalid_token), 403 (insufficient_scope) or 503.

    `cause` is a short machine-readable name for logs and metrics; `description` is the
    human-readable reason sent in `error_description`.
    """

    def __init__(self, status: int, error: str | None, description: str, *, cause: str,
                 scope: str | None = None) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.description = description
        self.cause = cause
        self.scope = scope

    def www_authenticate(self) -> str | None:
        """The RFC 6750 `WWW-Authenticate` value, or None for a 503 (not the client's fault)."""
        if self.error is None:
            return None
        parts = [f'error="{self.error}"', f'error_description="{_quoted(self.description)}"']
        if self.scope:
            parts.append(f'scope="{_quoted(self.scope)}"')
        return "Bearer " + ", ".join(parts)

    def __repr__(self) -> str:
        return f"AuthFailure({self.status}, {self.error!r}, {self.description!r})"


def _quoted(text: str) -> str:
    # RFC 6750 3: error_description and scope exclude '"' and '\\' and control characters.
    return "".join(c if 0x20 <= ord(c) <= 0x7E and c not in '"\\' else "?" for c in text)


# Each cause has its own description so operators and clients can tell them apart.
_INVALID: dict[str, str] = {
    "missing_token": "missing bearer token",
    "malformed_header": "malformed Authorization header: expected 'Bearer <token>'",
    "malformed_token": "malformed token",
    "algorithm_not_allowed": "algorithm not allowed",
    "unknown_kid": "unknown key id (kid)",
    "no_key": "no configured key fits the token's algorithm",
    "bad_signature": "bad signature",
    "expired": "token expired",
    "not_yet_valid": "token not yet valid (nbf or iat in the future)",
    "wrong_issuer": "wrong issuer",
    "wrong_audience": "wrong audience",
    "missing_exp": "missing exp claim",
    "invalid_claim": "invalid claim",
}


def _invalid(cause: str, detail: str = "") -> AuthFailure:
    description = _INVALID[cause] + (f" ({detail})" if detail else "")
    return AuthFailure(401, "invalid_token", description, cause=cause)


def _claims_failure(exc: jwt.PyJWTError) -> AuthFailure:
    """A PyJWT claim/format error (the signature already verified) -> the 401 that names it."""
    if isinstance(exc, jwt.ExpiredSignatureError):
        return _invalid("expired")
    if isinstance(exc, jwt.ImmatureSignatureError):
        return _invalid("not_yet_valid")
    if isinstance(exc, jwt.InvalidIssuerError):
        return _invalid("wrong_issuer")
    if isinstance(exc, jwt.InvalidAudienceError):
        return _invalid("wrong_audience")
    if isinstance(exc, jwt.MissingRequiredClaimError):
        if exc.claim == "exp":
            return _invalid("missing_exp")
        if exc.claim == "iss":
            return _invalid("wrong_issuer", "no iss claim")
        if exc.claim == "aud":
            return _invalid("wrong_audience", "no aud claim")
        return _invalid("invalid_claim", f"missing {exc.claim}")
    if isinstance(exc, jwt.InvalidSignatureError):
        return _invalid("bad_signature")
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return _invalid("algorithm_not_allowed")
    if isinstance(exc, InvalidSubjectError | InvalidJTIError):
        return _invalid("invalid_claim", "sub and jti must be strings")
    return _invalid("malformed_token")


_NUMERIC_DATES = ("exp", "nbf", "iat")
_WHITESPACE = re.compile(r"\s")


class _Duplicate(ValueError):
    """A JSON object names one member twice."""


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            raise _Duplicate(name)
        out[name] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def claims_problem(token: str, claims: Mapping[str, Any]) -> str | None:
    """What PyJWT lets through and we refuse in a signature-checked token, or None.

    - NumericDate claims (`exp`, `nbf`, `iat`) must be JSON numbers (RFC 7519 2): PyJWT runs
      them through int(), so `"exp": "9999999999"` (a string) or `true` would pass, and an
      integer too large for a float would break our cache's expiry;
    - the header and the claims set must not name a member twice (RFC 7519 4: we take the
      last, a replica parsing the token again may take the first), nor hold NaN or Infinity,
      which Python's JSON parser accepts and JSON does not have.
    """
    for name in _NUMERIC_DATES:
        if name not in claims:
            continue
        value = claims[name]
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"{name} must be a number (NumericDate), not {type(value).__name__}"
        try:
            if not math.isfinite(float(value)):
                raise OverflowError
        except OverflowError:
            return f"{name} is out of range"
    for part, what in ((0, "header"), (1, "claims")):
        segment = token.split(".", 2)[part]
        try:
            json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)),
                       object_pairs_hook=_unique_members, parse_constant=_no_constant)
        except _Duplicate as exc:
            return f"the {what} names {str(exc)!r} twice"
        except ValueError as exc:  # already parsed by PyJWT: only NaN/Infinity get here
            return f"the {what} is not plain JSON ({exc})"
    return None


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a verified token speaks for: `sub` ('' when absent), its scopes, and its `exp`."""

    subject: str
    scopes: tuple[str, ...]
    expires_at: float


def token_scopes(claims: Mapping[str, Any]) -> tuple[str, ...]:
    """Scopes from `scope` and `scp`, each a space-separated string or a list of strings.

    A list item holding whitespace is no scope (RFC 6749 3.3 scope-token) and is dropped: the
    replica gets the scopes space-separated in X-Auth-Scopes, where `["read write"]` would read
    as two scopes the proxy never granted."""
    out: dict[str, None] = {}
    for name in ("scope", "scp"):
        value = claims.get(name)
        items = value.split() if isinstance(value, str) else value if isinstance(value, list) else []
        for item in items:
            if isinstance(item, str) and item and not _WHITESPACE.search(item):
                out[item] = None
    return tuple(out)


def bearer_token(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` value, or the AuthFailure naming why not."""
    if authorization is None or not authorization.strip():
        raise _invalid("missing_token")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise _invalid("malformed_header")
    if len(token) > _MAX_TOKEN or not _COMPACT_JWS.fullmatch(token):
        raise _invalid("malformed_token")
    return token


@dataclass(slots=True)
class _JwkSet:
    by_kid: dict[str, _Key]
    keys: tuple[_Key, ...]
    loaded_at: float


def _parse_jwks(data: Any) -> tuple[_JwkSet, list[str]]:
    """A JWKS document -> usable signature keys, and one note per key skipped (never fatal)."""
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError("not a JWK Set: expected a JSON object with a 'keys' array")
    keys: list[_Key] = []
    skipped: list[str] = []
    for i, jwk in enumerate(data["keys"][:_MAX_JWKS_KEYS]):
        if not isinstance(jwk, dict):
            skipped.append(f"#{i}: not an object")
            continue
        kid = jwk.get("kid")
        name = f"kid={kid}" if isinstance(kid, str) else f"#{i}"
        kty = jwk.get("kty")
        if kty not in ("RSA", "EC", "OKP"):
            # A symmetric ('oct') key in a published JWKS would turn HS* into key confusion.
            skipped.append(f"{name}: kty {kty!r} not accepted")
            continue
        if jwk.get("use", "sig") != "sig":
            skipped.append(f"{name}: use {jwk.get('use')!r} is not 'sig'")
            continue
        alg = jwk.get("alg")
        if alg is not None and (alg not in KNOWN_ALGORITHMS or alg in HMAC_ALGORITHMS):
            skipped.append(f"{name}: alg {alg!r} not accepted")
            continue
        try:
            obj = jwt.PyJWK(jwk).key
            key = _public_key(obj, f"JWKS key {name}")
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            skipped.append(f"{name}: {exc}")
            continue
        keys.append(_Key(key.key, key.kty, key.crv, alg, kid if isinstance(kid, str) else None,
                         key.source))
    by_kid = {k.kid: k for k in keys if k.kid is not None}
    return _JwkSet(by_kid, tuple(keys), time.monotonic()), skipped


@dataclass(slots=True)
class _JwksState:
    """Mutable JWKS bookkeeping, owned by one verifier on one event loop."""

    keyset: _JwkSet | None = None
    task: asyncio.Task[None] | None = None
    last_attempt: float | None = None  # monotonic time the last fetch started
    error: str | None = None
    fetches: int = 0
    session: aiohttp.ClientSession | None = field(default=None, repr=False)


class JwtVerifier:
    """Verifies bearer tokens against one JwtConfig; one instance for the process.

    Call `start()` once the event loop runs (it opens the JWKS session and begins the first fetch
    without waiting for it) and `close()` on shutdown. Without a JWKS URL both are cheap no-ops.
    """

    def __init__(self, config: JwtConfig) -> None:
        self.config = config
        self._log = get_logger("auth")
        self._problem = jwt_config_problem(config)
        self._algorithms: tuple[str, ...] = ()
        self._pem: tuple[_Key, ...] = ()
        self._secret: _Key | None = None
        if self._problem is None:
            self._algorithms = config.allowed_algorithms
            self._pem = tuple(_load_pem_keys(config.public_keys))
            if config.secret:
                self._secret = _Key(config.secret.encode(), "oct", source="secret")
        self._jwks = _JwksState()
        # Keyed by (sha256 of the token, audience): fixed-size keys however big tokens are; the
        # entry lives until the token's own exp (ttu), so a cached token never outlives it.
        self._cache: TLRUCache[tuple[bytes, str | None], Identity, float] | None = None
        self._hot: dict[tuple[str, str | None], Identity] = {}
        if config.cache_size > 0:
            self._cache = TLRUCache(config.cache_size, _until_exp, time.time)

    @property
    def problem(self) -> str | None:
        """Why this verifier cannot verify anything (routes using it answer 503), or None."""
        return self._problem

    @property
    def jwks_error(self) -> str | None:
        """The last JWKS fetch error, None after a good fetch (for the admin /healthz)."""
        return self._jwks.error

    @property
    def jwks_fetches(self) -> int:
        """How many JWKS fetches were started (for tests and metrics)."""
        return self._jwks.fetches

    async def start(self) -> None:
        """Log a configuration problem, or begin loading the JWKS in the background."""
        if self._problem is not None:
            cfg = self.config
            if cfg.secret is None and not cfg.public_keys and cfg.jwks_url is None:
                # Nothing configured is fine until a route asks for gateway.auth=jwt; the
                # server logs route_auth_unavailable (an error) for each such route then.
                self._log.debug("jwt_auth_unavailable", reason=self._problem)
            else:
                self._log.error("jwt_auth_unavailable", reason=self._problem)
            return
        self._log.info("jwt_auth_ready", algorithms=",".join(self._algorithms),
                       public_keys=len(self._pem), hmac=self._secret is not None,
                       jwks_url=self.config.jwks_url, issuer=self.config.issuer,
                       audience=self.config.audience)
        if self.config.jwks_url:
            self._start_fetch()

    async def close(self) -> None:
        """Stop a JWKS fetch in flight and close the JWKS session."""
        task, self._jwks.task = self._jwks.task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        session, self._jwks.session = self._jwks.session, None
        if session is not None:
            await session.close()

    def cached(self, authorization: str | None, audience: str | None,
               scopes: tuple[str, ...]) -> Identity | None:
        """The identity of a recently verified header, without awaiting; None: call verify."""
        if not authorization or self._problem is not None:
            return None
        aud = audience if audience is not None else self.config.audience
        hot = self._hot.get((authorization, aud))
        if hot is None or hot.expires_at <= time.time():
            return None
        return self._check_scopes(hot, scopes)

    async def verify(self, authorization: str | None, *, audience: str | None = None,
                     scopes: tuple[str, ...] = ()) -> Identity:
        """The identity behind an Authorization header value, or AuthFailure.

        `audience` overrides the configured one (per route); every scope in `scopes` must be in
        the token (checked after the cache, so routes with different scopes share entries).
        """
        if self._problem is not None:
            raise AuthFailure(503, None, f"JWT authentication is not configured: {self._problem}",
                              cause="not_configured")
        aud = audience if audience is not None else self.config.audience
        # A plain dict in front of the TLRU cache: a hot token costs one dict probe. Entries
        # exist only for tokens whose signature verified, so it can't be flooded.
        hot = self._hot.get((authorization, aud)) if authorization else None
        now = time.time()
        if hot is not None and hot.expires_at > now:
            return self._check_scopes(hot, scopes)
        token = bearer_token(authorization)
        key = (hashlib.sha256(token.encode()).digest(), aud)
        cached = self._cache.get(key) if self._cache is not None else None
        if cached is not None and cached.expires_at > time.time():
            identity = cached
        else:
            identity = await self._verify_token(token, aud)
            if self._cache is not None and identity.expires_at > time.time():
                self._cache[key] = identity
        if self._cache is not None and authorization:
            if len(self._hot) >= _HOT_SIZE:
                self._hot.clear()
            self._hot[(authorization, aud)] = identity
        return self._check_scopes(identity, scopes)

    @staticmethod
    def _check_scopes(identity: Identity, scopes: tuple[str, ...]) -> Identity:
        if scopes:
            missing = [s for s in scopes if s not in identity.scopes]
            if missing:
                raise AuthFailure(403, "insufficient_scope", "missing scope " + " ".join(missing),
                                  cause="insufficient_scope", scope=" ".join(scopes))
        return identity

    async def _verify_token(self, token: str, audience: str | None) -> Identity:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _invalid("malformed_token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise _invalid("algorithm_not_allowed")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _invalid("malformed_token")
        if alg in HMAC_ALGORITHMS:
            keys = [self._secret] if self._secret is not None else []
        else:
            keys = await self._asymmetric_keys(alg, kid)
        if not keys:
            raise _invalid("no_key")
        options: jwt.types.Options = {"require": ["exp"], "verify_aud": audience is not None}
        for candidate in keys:
            # algorithms= is the configured allow-list narrowed to this key's family; PyJWT
            # checks the token's alg against it, so the token never picks how its key is read.
            allowed = [a for a in self._algorithms if _fits(a, candidate)]
            try:
                claims: dict[str, Any] = jwt.decode(
                    token, candidate.key, algorithms=allowed, options=options, audience=audience,
                    issuer=self.config.issuer, leeway=self.config.leeway)
            except jwt.InvalidSignatureError:
                continue
            except jwt.InvalidKeyError:
                continue
            except jwt.PyJWTError as exc:
                raise _claims_failure(exc) from None
            problem = claims_problem(token, claims)
            if problem is not None:
                raise _invalid("invalid_claim", problem)
            return Identity(str(claims.get("sub") or ""), token_scopes(claims),
                            float(claims["exp"]))
        raise _invalid("bad_signature")

    async def _asymmetric_keys(self, alg: str, kid: str | None) -> list[_Key]:
        """Candidate keys for an RS/PS/ES/EdDSA token: the JWKS key named by `kid`, else PEM keys
        (and, without a kid, JWKS keys) that fit `alg`."""
        pem = [k for k in self._pem if _fits(alg, k)]
        if not self.config.jwks_url:
            return pem[:_MAX_CANDIDATES]
        keyset = self._jwks.keyset
        if kid is not None:
            if keyset is None or kid not in keyset.by_kid:
                await self._refetch()  # a new kid usually means the provider rotated keys
                keyset = self._jwks.keyset
            if keyset is not None and kid in keyset.by_kid:
                self._refresh_if_old(keyset)
                key = keyset.by_kid[kid]
                if not _fits(alg, key):
                    raise _invalid("algorithm_not_allowed", f"not usable with key {kid}")
                return [key]
            if pem:
                return pem[:_MAX_CANDIDATES]  # static keys may sign tokens that carry a kid
            if keyset is None:
                raise self._jwks_unavailable()
            raise _invalid("unknown_kid")
        if keyset is None and not pem:
            await self._refetch()
            keyset = self._jwks.keyset
            if keyset is None:
                raise self._jwks_unavailable()
        if keyset is None:
            return pem[:_MAX_CANDIDATES]
        self._refresh_if_old(keyset)
        return (pem + [k for k in keyset.keys if _fits(alg, k)])[:_MAX_CANDIDATES]

    def _jwks_unavailable(self) -> AuthFailure:
        # Never loaded: we cannot tell a good token from a bad one; that's on us, not the client.
        return AuthFailure(503, None, "JWKS unavailable: " + (self._jwks.error or "not loaded yet"),
                           cause="jwks_unavailable")

    def _refresh_if_old(self, keyset: _JwkSet) -> None:
        """Refetch in the background (never awaited) when the keys are older than max age."""
        now = time.monotonic()
        if now - keyset.loaded_at >= self.config.jwks_max_age and self._may_fetch(now):
            self._start_fetch()

    def _may_fetch(self, now: float) -> bool:
        state = self._jwks
        if state.task is not None and not state.task.done():
            return False
        return state.last_attempt is None or now - state.last_attempt >= self.config.jwks_cooldown

    async def _refetch(self) -> None:
        """Join the fetch in flight, or start one unless the cooldown forbids; bounded wait."""
        state = self._jwks
        if state.task is None or state.task.done():
            if not self._may_fetch(time.monotonic()):
                return
            self._start_fetch()
        task = state.task
        if task is None:
            return
        try:
            # The fetch has its own timeout; this bound only guards against it overrunning.
            # shield: one caller giving up must not cancel the fetch the others wait for.
            async with asyncio.timeout(self.config.jwks_timeout + 0.5):
                await asyncio.shield(task)
        except TimeoutError:
            pass

    def _start_fetch(self) -> None:
        state = self._jwks
        state.last_attempt = time.monotonic()
        state.fetches += 1
        state.task = asyncio.get_running_loop().create_task(self._fetch_jwks(),
                                                            name="jwks-fetch")

    async def _fetch_jwks(self) -> None:
        url = self.config.jwks_url
        state = self._jwks
        if url is None:
            return
        if state.session is None or state.session.closed:
            state.session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.config.jwks_timeout), trust_env=False)
        try:
            async with asyncio.timeout(self.config.jwks_timeout):
                async with state.session.get(url, headers={"Accept": "application/json"}) as resp:
                    if resp.status != 200:
                        raise ValueError(f"HTTP {resp.status}")
                    body = await resp.content.read(_MAX_JWKS_BYTES + 1)
            if len(body) > _MAX_JWKS_BYTES:
                raise ValueError(f"larger than {_MAX_JWKS_BYTES} bytes")
            keyset, skipped = _parse_jwks(json.loads(body))
        except TimeoutError:
            self._fetch_failed(url, f"timed out after {self.config.jwks_timeout}s")
            return
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            self._fetch_failed(url, str(exc) or type(exc).__name__)
            return
        for note in skipped:
            self._log.warning("jwks_key_skipped", url=url, key=note[:200])
        if not keyset.keys:
            self._fetch_failed(url, "no usable signature keys")
            return
        state.keyset = keyset
        state.error = None
        self._log.info("jwks_loaded", url=url, keys=len(keyset.keys),
                       kids=",".join(sorted(keyset.by_kid))[:500])

    def _fetch_failed(self, url: str, error: str) -> None:
        # Keep the keys we had: a flapping provider must not lock everyone out.
        self._jwks.error = error[:300]
        self._log.warning("jwks_fetch_failed", url=url, error=self._jwks.error,
                          keys_kept=len(self._jwks.keyset.keys) if self._jwks.keyset else 0,
                          retry_after_s=self.config.jwks_cooldown)


_HOT_SIZE = 4096


def _until_exp(_key: object, identity: Identity, _now: float) -> float:
    return identity.expires_at
