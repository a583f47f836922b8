#!/usr/bin/env python3
"""Mint a test JWT (HS256) for compose.example.yml's protected /api route; stdlib only.

    TOKEN=$(python3 examples/mint-jwt.py --sub alice)
    curl -H "Authorization: Bearer $TOKEN" localhost:8080/api

The key is --secret, else EDGEPROXY_JWT_SECRET, else the example's default (the same
default as in compose.example.yml).  The token carries `sub`, `iat` and `exp` (edgeproxy
refuses tokens without `exp`), plus `iss`/`aud` when given.  --ttl may be negative to
mint an expired token.  For testing only: real tokens come from your identity provider.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import sys
import time

EXAMPLE_SECRET = "edgeproxy-example-secret-change-me-0123456789"  # noqa: S105 - public by design
"""compose.example.yml's default EDGEPROXY_JWT_SECRET."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint(claims: dict[str, object], secret: str) -> str:
    """Encode and sign `claims` as a compact HS256 JWT."""
    header = {"alg": "HS256", "typ": "JWT"}
    signing_input = ".".join(
        _b64(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
    )
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sub", default="alice", help="subject (default: alice)")
    parser.add_argument("--ttl", type=int, default=3600,
                        help="seconds until it expires (default: 3600; negative: already expired)")
    parser.add_argument("--iss", help="issuer, if EDGEPROXY_JWT_ISSUER is set")
    parser.add_argument("--aud", help="audience, if EDGEPROXY_JWT_AUDIENCE is set")
    parser.add_argument("--secret", help="HMAC key (default: $EDGEPROXY_JWT_SECRET or the example's)")
    args = parser.parse_args(argv)

    now = int(time.time())
    claims: dict[str, object] = {"sub": args.sub, "iat": now, "exp": now + args.ttl}
    if args.iss:
        claims["iss"] = args.iss
    if args.aud:
        claims["aud"] = args.aud
    secret = args.secret or os.environ.get("EDGEPROXY_JWT_SECRET") or EXAMPLE_SECRET
    print(mint(claims, secret))
    return 0


if __name__ == "__main__":
    sys.exit(main())
