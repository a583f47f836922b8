"""Basic auth: htpasswd parsing and the scheme check, the header, and the verifier's cache,
bound and users-file reload (no network; bcrypt runs for real)."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from edgeproxy.policies import basic
from edgeproxy.policies.basic import (
    BasicAuthSpec,
    BasicFailure,
    BasicVerifier,
    basic_credentials,
    challenge,
    hash_scheme,
    parse_entry,
    parse_realm,
    parse_users,
    parse_users_file,
    parse_users_text,
)

# Made with `htpasswd -nbB alice pw-alice` / `htpasswd -nbB bob pw-bob` (cost 5).
ALICE = "alice:$2y$05$60chqj1SQq0tnFQyHYLlD.oL1feUdPNrSuOsvtyejP5WIuczv8Q6."
BOB = "bob:$2y$05$BP0ceXfATvL8Se6/ZPuccuNLePw1atAZQAjgd.HtEcrxxmKFOcliC"
HINT = "make a bcrypt entry with `htpasswd -nbB"


def header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(("hashed", "scheme"), [
    (ALICE.split(":", 1)[1], "bcrypt"),
    ("$2b$12$" + "a" * 53, "bcrypt"),
    ("$2a$10$" + "B" * 53, "bcrypt"),
    ("$apr1$lY3otKbC$9N//qdbIrmu4Iwwo2O8pC.", "MD5 ($apr1$)"),
    ("$1$abcdefgh$abcdefghijklmnopqrstuv", "MD5-crypt ($1$)"),
    ("{SHA}EfatjsUqKYSrqv18O1FlA3hcIHI=", "SHA1 ({SHA})"),
    ("$5$salt$hash", "SHA-crypt ($5$/$6$)"),
    ("$6$salt$hash", "SHA-crypt ($5$/$6$)"),
    ("qPJA1HZiXJdIU", "crypt (DES)"),
    ("$2y$05$short", "a malformed bcrypt hash"),
    ("hunter2", "a plain-text password"),
    ("", "a plain-text password"),
])
def test_hash_scheme(hashed: str, scheme: str) -> None:
    assert hash_scheme(hashed) == scheme


@pytest.mark.parametrize("line", [
    "bob:$apr1$lY3otKbC$9N//qdbIrmu4Iwwo2O8pC.", "carol:{SHA}EfatjsUqKYSrqv18O1FlA3hcIHI=",
    "dave:qPJA1HZiXJdIU", "erin:secret", "frank:$1$abcdefgh$abcdefghijklmnopqrstuv"])
def test_weak_entries_are_refused_with_the_fix(line: str) -> None:
    user = line.split(":")[0]
    with pytest.raises(ValueError) as exc:
        parse_entry(line)
    text = str(exc.value)
    assert f"user {user!r}" in text and "only bcrypt" in text
    assert f"htpasswd -nbB {user} 'PASSWORD'" in text


@pytest.mark.parametrize(("line", "why"), [
    ("alice", "is not an htpasswd line"), (":$2y$05$" + "a" * 53, "is not an htpasswd line"),
    ("al ice:$2y$05$" + "a" * 53, "user name 'al ice'"),
])
def test_malformed_entries(line: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_entry(line)


def test_users_label_and_file() -> None:
    assert parse_users(f" {ALICE} , {BOB} ") == (tuple(ALICE.split(":", 1)),
                                                 tuple(BOB.split(":", 1)))
    assert parse_users_text(f"# admins\n\n{ALICE}\n  # more\n{BOB}\n") == parse_users(
        f"{ALICE},{BOB}")
    with pytest.raises(ValueError, match="user 'alice' is listed twice"):
        parse_users(f"{ALICE},{ALICE}")
    with pytest.raises(ValueError, match="line 2: user 'x': MD5"):
        parse_users_text(f"{ALICE}\nx:$apr1$a$b\n")
    with pytest.raises(ValueError, match=HINT.replace("$", r"\$").replace("(", r"\(")):
        parse_users(" , ")


@pytest.mark.skipif(shutil.which("htpasswd") is None, reason="needs apache2-utils")
def test_what_htpasswd_B_writes_is_accepted() -> None:
    line = subprocess.run(["htpasswd", "-nbB", "zoe", "pass word"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert parse_entry(line)[0] == "zoe"
    weak = subprocess.run(["htpasswd", "-nbm", "zoe", "x"], capture_output=True, text=True,
                          check=True).stdout.strip()
    with pytest.raises(ValueError, match="MD5"):
        parse_entry(weak)


@pytest.mark.parametrize(("value", "ok"), [("Admin area", True), ("a" * 200, True), ("", False),
                                           ('say "hi"', False), ("a\\b", False), ("a\nb", False),
                                           ("a" * 201, False)])
def test_realm(value: str, ok: bool) -> None:
    if ok:
        assert parse_realm(value) == value
    else:
        with pytest.raises(ValueError):
            parse_realm(value)


def test_users_file_path() -> None:
    assert parse_users_file(" /etc/x ") == "/etc/x"
    for bad in ("etc/x", "", "/a\nb"):
        with pytest.raises(ValueError, match="absolute path"):
            parse_users_file(bad)


@pytest.mark.parametrize(("value", "expected"), [
    (header("alice", "pw"), ("alice", "pw")),
    (header("alice", "p:w:x"), ("alice", "p:w:x")),  # only the first ':' splits
    (header("al", ""), ("al", "")),
    ("basic " + base64.b64encode(b"a:b").decode(), ("a", "b")),  # the scheme is case-blind
    ("BASIC   " + base64.b64encode("ü:ß".encode()).decode(), ("ü", "ß")),
    ("Bearer abc", None),
    ("Basic", None),
    ("Basic !!!", None),
    ("Basic " + base64.b64encode(b"nocolon").decode(), None),
    ("Basic " + base64.b64encode(b":pw").decode(), None),
    ("Basic " + base64.b64encode(b"\xff:\xfe").decode(), None),  # not UTF-8
    ("Basic YWxpY2U6cHc", None),  # bad padding
    ("Basic " + "A" * 5000, None),
])
def test_basic_credentials(value: str, expected: tuple[str, str] | None) -> None:
    assert basic_credentials(value) == expected


def test_challenge() -> None:
    assert challenge("Admin") == 'Basic realm="Admin", charset="UTF-8"'


def spec(*lines: str, users_file: str | None = None) -> BasicAuthSpec:
    return BasicAuthSpec(users=tuple(tuple(line.split(":", 1)) for line in lines),  # type: ignore[misc]
                         users_file=users_file)


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_verify_good_wrong_unknown_malformed() -> None:
    calls = []
    v = BasicVerifier(on_hash=lambda: calls.append(1))
    s = spec(ALICE, BOB)

    async def main() -> None:
        assert await v.verify(s, header("alice", "pw-alice")) == "alice"
        assert await v.verify(s, header("bob", "pw-bob")) == "bob"
        for value, cause in ((header("alice", "nope"), "wrong_password"),
                             (header("mallory", "pw-alice"), "unknown_user"),
                             ("Basic %%%", "malformed_header"), ("Bearer x", "malformed_header"),
                             (None, "missing_credentials"), ("", "missing_credentials")):
            with pytest.raises(BasicFailure) as exc:
                await v.verify(s, value)
            assert (exc.value.status, exc.value.cause) == (401, cause)

    run(main())
    # an unknown user costs a bcrypt check too (timing must not reveal which users exist)
    assert len(calls) == 4
    v.close()


def test_cache_a_hot_client_costs_no_bcrypt_and_holds_no_password() -> None:
    calls = []
    v = BasicVerifier(on_hash=lambda: calls.append(1))
    s = spec(ALICE)

    async def main() -> None:
        for _ in range(20):
            assert await v.verify(s, header("alice", "pw-alice")) == "alice"

    run(main())
    assert len(calls) == 1
    assert list(v._cache) == [v.cache_key(header("alice", "pw-alice"))]
    assert b"pw-alice" not in b"".join(v._cache)
    # the key is an HMAC under a per-process key: another process can't recompute it
    assert BasicVerifier().cache_key(header("alice", "pw-alice")) != v.cache_key(
        header("alice", "pw-alice"))
    v.close()


def test_cache_entry_stops_counting_when_the_user_changes_and_when_it_expires() -> None:
    calls = []
    v = BasicVerifier(on_hash=lambda: calls.append(1), cache_ttl=0.05)

    async def main() -> None:
        assert await v.verify(spec(ALICE), header("alice", "pw-alice")) == "alice"
        # the same credentials on a route where alice has another hash (or none): no pass
        other = "alice:" + BOB.split(":", 1)[1]
        with pytest.raises(BasicFailure):
            await v.verify(spec(other), header("alice", "pw-alice"))
        with pytest.raises(BasicFailure):
            await v.verify(spec(BOB), header("alice", "pw-alice"))
        assert await v.verify(spec(ALICE), header("alice", "pw-alice")) == "alice"
        await asyncio.sleep(0.06)
        assert await v.verify(spec(ALICE), header("alice", "pw-alice")) == "alice"

    run(main())
    assert len(calls) == 5
    v.close()


def test_the_cached_path_follows_the_same_rules() -> None:
    # `cached` is the pipeline's no-coroutine path: it passes only what `verify` would pass
    # from its cache, and never refuses (None sends the request on to `verify`).
    v = BasicVerifier(cache_ttl=0.05)
    good = header("alice", "pw-alice")
    assert v.cached(spec(ALICE), good) is None  # nothing verified yet
    assert run(v.verify(spec(ALICE), good)) == "alice"
    assert v.cached(spec(ALICE), good) == "alice"
    assert v.cached(spec("alice:" + BOB.split(":", 1)[1]), good) is None  # another hash
    assert v.cached(spec(BOB), good) is None  # no such user on this route
    assert v.cached(spec(ALICE), header("alice", "nope")) is None
    assert v.cached(spec(ALICE), None) is None
    time.sleep(0.06)
    assert v.cached(spec(ALICE), good) is None  # expired
    v.close()


def test_cache_is_bounded() -> None:
    v = BasicVerifier(cache_size=2)

    async def main() -> None:
        for i in range(4):
            await v.verify(spec(ALICE), header("alice", "pw-alice") + " " * i)

    run(main())
    assert len(v._cache) == 2
    v.close()


def test_bounded_concurrency_answers_busy() -> None:
    v = BasicVerifier(threads=1, max_pending=2)
    s = spec(ALICE)

    async def main() -> list[object]:
        return await asyncio.gather(*(v.verify(s, header("alice", f"bad{i}")) for i in range(6)),
                                    return_exceptions=True)

    results = run(main())
    assert isinstance(results, list)
    causes = sorted(r.cause for r in results if isinstance(r, BasicFailure))
    assert causes == ["busy"] * 4 + ["wrong_password"] * 2
    assert all(r.status == 503 for r in results if isinstance(r, BasicFailure)
               and r.cause == "busy")
    assert v.pending == 0
    v.close()


def test_one_check_for_a_burst_of_the_same_credentials() -> None:
    # A client opening many connections at once with a cold cache: one bcrypt per distinct
    # header, every request answered, none refused as busy; a waiter that leaves (client gone)
    # does not cancel the check the others wait for.
    hashes: list[int] = []
    v = BasicVerifier(threads=1, max_pending=2, on_hash=lambda: hashes.append(1))
    s = spec(ALICE)

    async def main() -> tuple[list[object], list[object]]:
        leaving = asyncio.ensure_future(v.verify(s, header("alice", "pw-alice")))
        good = [v.verify(s, header("alice", "pw-alice")) for _ in range(20)]
        bad = [v.verify(s, header("alice", "nope")) for _ in range(20)]
        await asyncio.sleep(0)
        leaving.cancel()
        results = await asyncio.gather(*good, *bad, return_exceptions=True)
        return results[:20], results[20:]

    good, bad = run(main())
    assert good == ["alice"] * 20
    assert {(r.status, r.cause) for r in bad if isinstance(r, BasicFailure)} == {
        (401, "wrong_password")} and len(bad) == 20
    assert len(hashes) == 2
    assert v.pending == 0
    v.close()


def test_a_password_change_during_a_check_is_not_answered_by_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # alice's check against her old hash is running when the users file gives her a new one:
    # a request with the old password that looks up the new hash must get its own check (and
    # fail), not the running check's "yes".
    monkeypatch.setattr(basic, "USERS_FILE_POLL", 0.0)
    path = tmp_path / "users"
    path.write_text(ALICE + "\n")
    v = BasicVerifier()
    s = spec(users_file=str(path))
    old = header("alice", "pw-alice")

    async def main() -> tuple[object, object]:
        first = asyncio.ensure_future(v.verify(s, old))
        await asyncio.sleep(0)  # the first check is running
        path.write_text("alice:" + BOB.split(":", 1)[1] + "\n")  # her new password: pw-bob
        os.utime(path, ns=(1, 1))
        second = asyncio.ensure_future(v.verify(s, old))
        got = await asyncio.gather(first, second, return_exceptions=True)
        return got[0], got[1]

    first, second = run(main())
    assert first == "alice"  # checked against the hash it looked up
    assert isinstance(second, BasicFailure) and second.cause == "wrong_password"
    assert v.cached(s, old) is None
    v.close()


def test_users_file_reload_and_bad_file_keeps_previous(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(basic, "USERS_FILE_POLL", 0.0)
    path = tmp_path / "users"
    v = BasicVerifier()
    s = spec(users_file=str(path))

    async def main() -> None:
        with pytest.raises(BasicFailure) as exc:  # no file yet: unavailable, never a pass
            await v.verify(s, header("alice", "pw-alice"))
        assert (exc.value.status, exc.value.cause) == (503, "users_unavailable")
        path.write_text(ALICE + "\n")
        assert await v.verify(s, header("alice", "pw-alice")) == "alice"
        path.write_text(BOB + "\n# alice removed\n")
        os.utime(path, ns=(1, 1))  # a changed stamp even within one mtime tick
        with pytest.raises(BasicFailure):
            await v.verify(s, header("alice", "pw-alice"))
        assert await v.verify(s, header("bob", "pw-bob")) == "bob"
        path.write_text("bob:$apr1$weak$weak\n")  # refused: bob keeps working meanwhile
        os.utime(path, ns=(2, 2))
        assert await v.verify(s, header("bob", "pw-bob")) == "bob"
        assert v._files[str(path)].error is not None

    run(main())
    v.close()
