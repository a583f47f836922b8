"""Policy objects from the settings: the JWT verifier's config and the rate-limit backend."""

from __future__ import annotations

from typing import Literal

from edgeproxy.core.settings import Settings, SettingsError
from edgeproxy.policies.auth import JwtConfig, split_pem
from edgeproxy.policies.ratelimit import Limiter, LocalLimiter
from edgeproxy.policies.shared import SharedLimiter, shared_table


def jwt_config(settings: Settings) -> JwtConfig:
    """JWT keys and rules from the settings (the key file is read here, once)."""
    keys: list[str] = []
    if settings.jwt_public_key:
        keys.extend(split_pem(settings.jwt_public_key))
    if settings.jwt_public_key_file is not None:
        try:
            keys.extend(split_pem(settings.jwt_public_key_file.read_text()))
        except OSError as exc:
            raise SettingsError("EDGEPROXY_JWT_PUBLIC_KEY_FILE", str(settings.jwt_public_key_file),
                                f"a readable PEM file ({exc.strerror})") from None
    return JwtConfig(
        secret=settings.jwt_secret, public_keys=tuple(keys), jwks_url=settings.jwks_url,
        algorithms=settings.jwt_algorithms, issuer=settings.jwt_issuer,
        audience=settings.jwt_audience, leeway=settings.jwt_leeway,
        jwks_timeout=settings.jwks_timeout, jwks_cooldown=settings.jwks_cooldown,
    )


def make_limiter(settings: Settings) -> Limiter:
    """The rate-limit backend the settings ask for."""
    if settings.ratelimit_backend == "redis":
        failure: Literal["open", "closed"] = (
            "closed" if settings.ratelimit_failure == "closed" else "open")
        from edgeproxy.policies.redis_limiter import RedisLimiter  # loads redis: only when used

        return RedisLimiter(settings.redis_url, failure)
    table = shared_table()
    if table is not None:  # several workers: one budget for all of them
        return SharedLimiter(table)
    return LocalLimiter(settings.ratelimit_max_keys)
