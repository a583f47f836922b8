"""HTTP Basic authentication (`gateway.auth=basic`): bcrypt htpasswd entries from labels and/or a
users file, verified off the event loop with bounded concurrency and a cache of good credentials.

Security rules kept here on purpose:
- only bcrypt entries (what `htpasswd -B` writes) are accepted; plain, crypt, MD5 ($apr1$, $1$),
  SHA1 ({SHA}) and SHA-crypt entries are refused when the labels or the file are read;
- bcrypt runs in a small thread pool; at most `max_pending` verifications wait or run at once,
  beyond that the answer is 503 with Retry-After, so a burst of wrong passwords cannot pin the
  CPU or queue without end;
- requests that arrive with the same header for the same route while its check runs wait for
  that one check (a client opening 50 connections with a cold cache costs one bcrypt, not 50,
  and does not fill `max_pending` with copies of itself);
- the cache holds credentials that verified, keyed by an HMAC (random per-process key) of the
  header's credentials, never the password; an entry is used only while the user still has the
  same hash, expires after `cache_ttl`, and the whole cache is dropped when a users file changes;
- an unknown user costs a bcrypt check too, so timing does not tell which users exist.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import bcrypt

from edgeproxy.core.logs import get_logger
from edgeproxy.core.state import fast_state

_BCRYPT = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")
_DES_CRYPT = re.compile(r"[./0-9A-Za-z]{13}")
_USER = re.compile(r"[^\x00-\x20\x7f:,]{1,255}")
_REALM_BAD = re.compile(r'[\x00-\x1f\x7f"\\]')
USERS_FILE_POLL = 1.0  # seconds between looks at a users file's mtime/size/inode


def make_entry_hint(user: str) -> str:
    """How to make a bcrypt entry for `user` (shown in every refusal)."""
    return (f"make a bcrypt entry with `htpasswd -nbB {user} 'PASSWORD'` (Debian/Ubuntu: "
            "apache2-utils; in a compose file write each $ as $$)")


def hash_scheme(hashed: str) -> str:
    """The scheme of an htpasswd hash: 'bcrypt', or the name of a refused one."""
    if _BCRYPT.fullmatch(hashed):
        return "bcrypt"
    if hashed.startswith("$apr1$"):
        return "MD5 ($apr1$)"
    if hashed.startswith("$1$"):
        return "MD5-crypt ($1$)"
    if hashed.startswith("{SHA}"):
        return "SHA1 ({SHA})"
    if hashed.startswith(("$5$", "$6$")):
        return "SHA-crypt ($5$/$6$)"
    if hashed.startswith("$2"):
        return "a malformed bcrypt hash"
    if _DES_CRYPT.fullmatch(hashed):
        return "crypt (DES)"
    return "a plain-text password"


def parse_entry(line: str) -> tuple[str, str]:
    """'alice:$2y$05$...' -> ('alice', hash); ValueError says what is wrong and how to fix it."""
    user, colon, hashed = line.strip().partition(":")
    if not colon or not user:
        raise ValueError(f"{line.strip()[:40]!r} is not an htpasswd line 'user:bcrypt-hash'; "
                         + make_entry_hint(user or "USER"))
    if not _USER.fullmatch(user):
        raise ValueError(f"user name {user!r} must be 1-255 characters without spaces, ':', ',' "
                         "or control characters")
    scheme = hash_scheme(hashed)
    if scheme != "bcrypt":
        raise ValueError(f"user {user!r}: {scheme} is not accepted, only bcrypt is; "
                         + make_entry_hint(user))
    return user, hashed


def parse_users(value: str) -> tuple[tuple[str, str], ...]:
    """`gateway.auth.users`: htpasswd lines, comma-separated (bcrypt hashes hold no ',')."""
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if not parts:
        raise ValueError("htpasswd lines 'user:bcrypt-hash', comma-separated; "
                         + make_entry_hint("alice"))
    return _unique([parse_entry(p) for p in parts])


def parse_users_text(text: str) -> tuple[tuple[str, str], ...]:
    """A users file: one htpasswd line each; blank lines and '#' comments are skipped."""
    entries: list[tuple[str, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            entries.append(parse_entry(line))
        except ValueError as exc:
            raise ValueError(f"line {number}: {exc}") from None
    return _unique(entries)


def _unique(entries: list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    seen: set[str] = set()
    for user, _ in entries:
        if user in seen:
            raise ValueError(f"user {user!r} is listed twice")
        seen.add(user)
    return tuple(entries)


def parse_realm(value: str) -> str:
    """`gateway.auth.realm`: shown by browsers in the login prompt."""
    v = value.strip()
    if not v or len(v) > 200 or _REALM_BAD.search(v):
        raise ValueError("a realm of 1-200 characters without quotes, backslashes or control "
                         "characters, such as Admin area")
    return v


def parse_users_file(value: str) -> str:
    """`gateway.auth.users_file`: an absolute path inside the proxy's container."""
    v = value.strip()
    if not v.startswith("/") or any(ord(ch) < 0x20 for ch in v):
        raise ValueError("an absolute path to an htpasswd file inside the proxy container, "
                         "such as /etc/edgeproxy/admin.htpasswd")
    return v


def basic_credentials(authorization: str) -> tuple[str, str] | None:
    """'Basic YWxpY2U6cHc=' -> ('alice', 'pw'); None when it is not a well-formed Basic
    header (RFC 7617: base64 of 'user:password' in UTF-8)."""
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    token = token.strip()
    if not token or len(token) > 4096:
        return None
    try:
        text = base64.b64decode(token, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    user, colon, password = text.partition(":")
    if not colon or not user:
        return None
    return user, password


def challenge(realm: str) -> str:
    """The `WWW-Authenticate` value of a 401 (RFC 7617, UTF-8 announced)."""
    return f'Basic realm="{realm}", charset="UTF-8"'


@fast_state
@dataclass(frozen=True, slots=True)
class BasicAuthSpec:
    """gateway.auth=basic on one route. `realm=None`: the route's name (HAProxy's default,
    which uses the backend's name)."""

    users: tuple[tuple[str, str], ...] = ()
    users_file: str | None = None
    realm: str | None = None
    keep_authorization: bool = False
    by_user: Mapping[str, bytes] = field(default_factory=dict, compare=False, hash=False,
                                         repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_user", {u: h.encode() for u, h in self.users})


class BasicFailure(Exception):
    """A request refused by basic auth: 401 (cause says why), or 503 (busy or no users)."""

    def __init__(self, status: int, cause: str, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.cause = cause
        self.description = description


@dataclass(slots=True)
class _UsersFile:
    """One users file: the users of its last good read, polled for changes."""

    path: str
    users: Mapping[str, bytes] | None = None
    error: str | None = None
    stamp: tuple[int, int, int] | None = None
    checked: float = float("-inf")


def _check(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:  # a hash bcrypt cannot read: treat as a mismatch, never a pass
        return False


class BasicVerifier:
    """Verifies Basic credentials for every route of the process; one instance per process.

    `threads` bcrypt checks run at once; `max_pending` may wait or run in total (default
    8 per thread); `on_hash` is called for every bcrypt check made (metrics, tests)."""

    def __init__(self, *, threads: int | None = None, max_pending: int | None = None,
                 cache_size: int = 10000, cache_ttl: float = 300.0,
                 on_hash: Callable[[], None] | None = None) -> None:
        # Half the cores at most: a flood of wrong passwords leaves the other half to traffic.
        self.threads = threads or max(1, (os.cpu_count() or 2) // 2)
        self.max_pending = max_pending or self.threads * 8
        self.cache_size = cache_size
        self.cache_ttl = cache_ttl
        self.on_hash = on_hash
        self.pending = 0
        self._key = os.urandom(32)
        self._cache: OrderedDict[bytes, tuple[str, bytes, float]] = OrderedDict()
        self._files: dict[str, _UsersFile] = {}
        self._dummies: dict[bytes, bytes] = {}
        # (cache key, id of the route's spec, the hash checked against) -> the bcrypt check
        # running for it. The task holds the spec, so its id is not reused while the entry
        # exists; the hash is part of the key because a users file may change while a check
        # runs, and a request that looked up the new hash must not take the old one's answer.
        self._running: dict[tuple[bytes, int, bytes | None], asyncio.Future[bool]] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._log = get_logger("auth")

    def close(self) -> None:
        """Stop the bcrypt threads (checks in flight finish)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def cache_key(self, authorization: str) -> bytes:
        """The cache key of a header value: an HMAC under a per-process random key, so the
        cache never holds (or lets anyone recompute) the password."""
        # hmac.digest: the one-shot C path, a third of hmac.new(...).digest()'s cost.
        return hmac.digest(self._key, authorization.encode("utf-8", "surrogateescape"),
                           "sha256")

    def cached(self, spec: BasicAuthSpec, authorization: str | None) -> str | None:
        """The user behind a header that verified recently, without a coroutine (the hot
        path); None: call `verify`, which checks (or refuses) it."""
        if not authorization:
            return None
        return self._fresh(spec, self._file_users(spec), self.cache_key(authorization))

    def _fresh(self, spec: BasicAuthSpec, file_users: Mapping[str, bytes] | None,
               key: bytes) -> str | None:
        """The cached user of `key` while the entry is fresh and the user still has the hash
        it verified against; a stale entry is dropped."""
        hit = self._cache.get(key)
        if hit is None:
            return None
        user, hashed, expires = hit
        if expires > time.monotonic() and self._lookup(spec, file_users, user) == hashed:
            return user
        del self._cache[key]  # expired, or the user's entry changed or went away
        return None

    async def verify(self, spec: BasicAuthSpec, authorization: str | None) -> str:
        """The user name behind the header, or BasicFailure."""
        if not authorization:
            raise BasicFailure(401, "missing_credentials", "credentials required")
        file_users = self._file_users(spec)
        key = self.cache_key(authorization)
        cached_user = self._fresh(spec, file_users, key)
        if cached_user is not None:
            return cached_user
        creds = basic_credentials(authorization)
        if creds is None:
            raise BasicFailure(401, "malformed_header",
                               "malformed Authorization header: expected 'Basic "
                               "<base64 of user:password>'")
        user, password = creds
        if spec.users_file is not None and file_users is None and not spec.by_user:
            state = self._files[spec.users_file]
            raise BasicFailure(503, "users_unavailable",
                               f"the users file {spec.users_file} cannot be used: {state.error}")
        hashed = self._lookup(spec, file_users, user)
        flight = (key, id(spec), hashed)
        running = self._running.get(flight)
        if running is None:
            if self.pending >= self.max_pending:
                raise BasicFailure(503, "busy", "too many password checks in progress; retry "
                                   "shortly")
            self.pending += 1  # counted now: the task starts on the loop's next turn
            running = asyncio.ensure_future(
                self._bcrypt(password.encode(), hashed, spec, file_users))
            self._running[flight] = running
            running.add_done_callback(lambda done: self._landed(flight, done))
        # shield: a client that leaves does not cancel the check the others wait for.
        ok = await asyncio.shield(running)
        if hashed is None:
            raise BasicFailure(401, "unknown_user", "invalid credentials")
        if not ok:
            raise BasicFailure(401, "wrong_password", "invalid credentials")
        self._cache[key] = (user, hashed, time.monotonic() + self.cache_ttl)
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return user

    def _landed(self, flight: tuple[bytes, int, bytes | None],
                done: asyncio.Future[bool]) -> None:
        del self._running[flight]
        self.pending -= 1
        if not done.cancelled():
            done.exception()  # retrieved, even when every waiter left before it ended

    async def _bcrypt(self, password: bytes, hashed: bytes | None, spec: BasicAuthSpec,
                      file_users: Mapping[str, bytes] | None) -> bool:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="bcrypt")
        target = hashed if hashed is not None else self._dummy(spec, file_users)
        if self.on_hash is not None:
            self.on_hash()
        ok = await asyncio.get_running_loop().run_in_executor(
            self._executor, _check, password, target)
        return ok and hashed is not None

    def _dummy(self, spec: BasicAuthSpec, file_users: Mapping[str, bytes] | None) -> bytes:
        """A hash at the cost of a real entry: unknown users take as long as known ones."""
        sample = next(iter(spec.by_user.values()), None) or next(
            iter((file_users or {}).values()), b"$2b$05$")
        cost = sample[4:6]
        dummy = self._dummies.get(cost)
        if dummy is None:
            dummy = self._dummies[cost] = bcrypt.hashpw(os.urandom(16).hex().encode(),
                                                        bcrypt.gensalt(int(cost)))
        return dummy

    @staticmethod
    def _lookup(spec: BasicAuthSpec, file_users: Mapping[str, bytes] | None,
                user: str) -> bytes | None:
        # The file wins over the labels for a user in both: it is what operators edit live.
        if file_users is not None:
            hashed = file_users.get(user)
            if hashed is not None:
                return hashed
        return spec.by_user.get(user)

    def _file_users(self, spec: BasicAuthSpec) -> Mapping[str, bytes] | None:
        """The users of the route's file as last read well; reread when it changed."""
        path = spec.users_file
        if path is None:
            return None
        state = self._files.get(path)
        if state is None:
            state = self._files[path] = _UsersFile(path)
        now = time.monotonic()
        if now - state.checked >= USERS_FILE_POLL:
            state.checked = now
            self._reload(state)
        return state.users

    def _reload(self, state: _UsersFile) -> None:
        try:
            st = os.stat(state.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError as exc:
            stamp = None
            error = f"cannot read it ({exc.strerror})"
        else:
            if stamp == state.stamp:
                return
            try:
                with open(state.path, encoding="utf-8") as f:
                    users = parse_users_text(f.read())
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                error = str(exc) if isinstance(exc, ValueError) else f"cannot read it ({exc})"
            else:
                state.stamp, state.error = stamp, None
                state.users = {u: h.encode() for u, h in users}
                self._cache.clear()  # the users changed: nothing verified before still counts
                self._log.info("basic_auth_users_loaded", path=state.path, users=len(users))
                return
        if stamp != state.stamp or state.error != error:
            state.stamp, state.error = stamp, error
            self._log.error("basic_auth_users_file_invalid", path=state.path, error=error,
                            kept_previous=state.users is not None)
