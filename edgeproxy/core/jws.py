"""JWS algorithm names: those edgeproxy verifies, and the one parser of a list of them (pure), shared
by the EDGEPROXY_JWT_ALGORITHMS setting and the JWT verifier."""

from __future__ import annotations

import re

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
# JWS EC algorithms are bound to one curve each (RFC 7518 3.4, RFC 8812 for ES256K).
EC_ALGORITHMS = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521", "ES256K": "secp256k1"}
OKP_ALGORITHMS = ("EdDSA",)
KNOWN_ALGORITHMS: tuple[str, ...] = (
    HMAC_ALGORITHMS + RSA_ALGORITHMS + tuple(EC_ALGORITHMS) + OKP_ALGORITHMS
)

ALGORITHMS_EXPECTED = "JWS algorithm names from " + ", ".join(KNOWN_ALGORITHMS) + ", comma-separated"


def parse_algorithms(text: str) -> tuple[str, ...]:
    """'RS256, ES256' -> ('RS256', 'ES256'); 'none' and unknown names raise ValueError."""
    canonical = {a.lower(): a for a in KNOWN_ALGORITHMS}
    out: list[str] = []
    for part in re.split(r"[,\s]+", text.strip()):
        if not part:
            continue
        if part.lower() == "none":
            raise ValueError(f"{ALGORITHMS_EXPECTED}; 'none' (unsigned tokens) can never be allowed")
        name = canonical.get(part.lower())
        if name is None:
            raise ValueError(f"{ALGORITHMS_EXPECTED}; {part!r} is not one")
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError(ALGORITHMS_EXPECTED)
    return tuple(out)
