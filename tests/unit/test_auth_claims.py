"""JWT claims PyJWT lets through and the proxy refuses: NumericDates that are not numbers,
duplicate members, NaN/Infinity, and scopes that would read differently at the replica.
Every token here is really signed with the configured secret: only the claims are hostile."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import time

import pytest

from edgeproxy.policies.auth import AuthFailure, Identity, JwtConfig, JwtVerifier, token_scopes

SECRET = secrets.token_urlsafe(48)
HEADER = '{"alg":"HS256","typ":"JWT"}'


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(payload: str, header: str = HEADER) -> str:
    """A token whose header and claims are exactly these JSON texts, HS256-signed."""
    signing_input = f"{b64(header.encode())}.{b64(payload.encode())}"
    mac = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def verify(tok: str) -> Identity:
    async def main() -> Identity:
        return await JwtVerifier(JwtConfig(secret=SECRET)).verify("Bearer " + tok)
    return asyncio.run(main())


def refused(tok: str) -> AuthFailure:
    with pytest.raises(AuthFailure) as info:
        verify(tok)
    assert info.value.status == 401 and info.value.error == "invalid_token"
    return info.value


LATER = int(time.time()) + 600


def test_plain_numeric_dates_pass() -> None:
    assert verify(signed(f'{{"sub":"a","exp":{LATER}}}')).subject == "a"
    assert verify(signed(f'{{"sub":"a","exp":{LATER}.5,"iat":{LATER - 700}.25}}')).subject == "a"


@pytest.mark.parametrize("payload", [
    '{"sub":"a","exp":"9999999999"}',                      # the review's finding
    f'{{"sub":"a","exp":{LATER},"nbf":"0"}}',
    f'{{"sub":"a","exp":{LATER},"iat":"0"}}',
    f'{{"sub":"a","exp":{LATER},"iat":true}}',
    f'{{"sub":"a","exp":{LATER},"nbf":false}}',
    '{"sub":"a","exp":' + "9" * 400 + "}",                 # int() is fine, float() overflows
])
def test_numeric_dates_must_be_numbers(payload: str) -> None:
    failure = refused(signed(payload))
    assert failure.cause in ("invalid_claim", "expired", "malformed_token"), failure


def test_string_exp_is_named_in_the_refusal() -> None:
    failure = refused(signed('{"sub":"a","exp":"9999999999"}'))
    assert failure.cause == "invalid_claim"
    assert "exp must be a number" in failure.description


@pytest.mark.parametrize("payload", [
    f'{{"sub":"a","exp":{LATER},"exp":{LATER + 1}}}',
    f'{{"sub":"alice","sub":"admin","exp":{LATER}}}',
    f'{{"sub":"a","exp":{LATER},"scope":"read","scope":"admin"}}',
    f'{{"sub":"a","exp":{LATER},"ctx":{{"role":"user","role":"admin"}}}}',
])
def test_duplicate_claims_are_refused(payload: str) -> None:
    failure = refused(signed(payload))
    assert failure.cause == "invalid_claim" and "twice" in failure.description


def test_duplicate_header_members_are_refused() -> None:
    failure = refused(signed(f'{{"sub":"a","exp":{LATER}}}',
                             '{"alg":"HS256","kid":"a","kid":"b"}'))
    assert failure.cause == "invalid_claim" and "header" in failure.description


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_refused(constant: str) -> None:
    refused(signed(f'{{"sub":"a","exp":{LATER},"x":{constant}}}'))
    refused(signed(f'{{"sub":"a","exp":{constant}}}'))


def test_non_string_sub_is_refused() -> None:
    refused(signed(f'{{"sub":7,"exp":{LATER}}}'))
    refused(signed(f'{{"sub":["a"],"exp":{LATER}}}'))


def test_scope_items_holding_whitespace_are_no_scopes() -> None:
    assert token_scopes({"scp": ["read write", "read", "x\tadmin"]}) == ("read",)
    assert token_scopes({"scope": "read  write\tadmin"}) == ("read", "write", "admin")
    identity = verify(signed(f'{{"sub":"a","exp":{LATER},"scp":["orders:read orders:write"]}}'))
    assert identity.scopes == ()
