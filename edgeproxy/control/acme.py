"""Automatic certificates: ACME (RFC 8555) orders with the HTTP-01 challenge, one per host.

The protocol is certbot's `acme` package; its blocking calls run in a daemon thread, never on
the event loop. State lives under `state_dir` and survives restarts:

    acme/account.key        the account's RSA key (0600)
    acme/account.json       the account URL at the directory it was registered with
    acme/lock               flock()ed around account set-up and every order
    acme/challenges/<token> HTTP-01 answers, readable by every replica sharing the volume
    certs/<host>.crt, .key  full chain and key (0600) of each host's certificate

Several replicas on one host may share the state volume: an order runs only under an exclusive
flock on `acme/lock`, and whoever gets the lock first re-reads the certificate from disk, so
the replica that waited picks up the one just issued instead of ordering again. Pebble or the
CA may send the challenge request to any replica: each one answers from `acme/challenges/`.
(flock is reliable on a local volume; replicas on several machines need a shared file system
with working flock, or one replica with ACME enabled.)
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
import fcntl
import ipaddress
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, cast

from acme import challenges, client, errors, messages
from acme import crypto_util as acme_crypto
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from josepy.jwk import JWKRSA

from edgeproxy import __version__
from edgeproxy.core.logs import get_logger
from edgeproxy.core.paths import CHALLENGE_PREFIX, challenge_token
from edgeproxy.core.tls import CertError, CertInfo, CertStore, parse_certificate

LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})+")
_ACCOUNT_DOES_NOT_EXIST = "urn:ietf:params:acme:error:accountDoesNotExist"
T = TypeVar("T")


class AcmeError(RuntimeError):
    """An order could not complete; the message says which step and why."""


class _Closing(AcmeError):
    """The manager is closing: stop the order where it is."""


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class _Stored:
    cert_pem: bytes
    key_pem: bytes
    not_after: datetime.datetime
    signature: tuple[int, int, int]  # inode, size, mtime of the .crt


@dataclass(slots=True)
class _Host:
    """Bookkeeping for one managed host name."""

    name: str
    task: asyncio.Task[None] | None = None
    info: CertInfo | None = None
    signature: tuple[int, int, int] | None = None
    failures: int = 0
    last_error: str | None = None
    retry_at: float | None = None  # wall-clock time of the next try after a failure


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _describe(exc: BaseException) -> str:
    """One line saying why an order failed, with the CA's own words when it gave them."""
    if isinstance(exc, errors.ValidationError):
        parts = []
        for authzr in exc.failed_authzrs:
            for challb in authzr.body.challenges:
                if challb.error is not None:
                    parts.append(f"{authzr.body.identifier.value}: {challb.error}")
        return "challenge failed: " + ("; ".join(parts) or "no detail from the CA")
    if isinstance(exc, errors.TimeoutError):
        return "the CA did not finish the order in time"
    if isinstance(exc, messages.Error):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _in_daemon_thread(fn: Callable[[], T]) -> T:
    """Run blocking `fn` in a daemon thread: unlike asyncio.to_thread, a request hanging on the
    CA can't hold up the process exit after close()."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, exc: BaseException | None) -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(cast(T, result))

    def target() -> None:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
                loop.call_soon_threadsafe(settle, None, exc)
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=target, name="edgeproxy-acme", daemon=True).start()
    return await future


class ChallengeBook:
    """The HTTP-01 answers a worker serves: tokens the control plane published, else the token
    files in the shared state directory (written before the CA is asked to validate, so an
    answer whose message is still on its way is found there)."""

    def __init__(self, state_dir: Path) -> None:
        self.challenges_dir = state_dir / "acme" / "challenges"
        self.tokens: dict[str, str] = {}
        self._status: list[dict[str, object]] = []

    def challenge_response(self, token: str) -> str | None:
        """The key authorization for GET /.well-known/acme-challenge/<token>, or None (-> 404)."""
        if challenge_token(CHALLENGE_PREFIX + token) is None:
            return None
        answer = self.tokens.get(token)
        if answer is not None:
            return answer
        try:
            return (self.challenges_dir / token).read_text("ascii").strip() or None
        except (OSError, UnicodeDecodeError):
            return None

    def put(self, token: str, answer: str | None) -> None:
        """A token published by the control plane (None: the order is over)."""
        if answer is None:
            self.tokens.pop(token, None)
        else:
            self.tokens[token] = answer

    def status(self) -> list[dict[str, object]]:
        """Orders are the control plane's: its admin API shows them."""
        return self._status


class AcmeManager:
    """Obtains, stores, loads and renews one certificate per host, serving them via `store`."""

    def __init__(
        self,
        directory_url: str,
        email: str | None,
        state_dir: Path,
        store: CertStore,
        *,
        renew_before_days: float = 30.0,
        verify_ssl: bool | str = True,
        lock_timeout: float = 600.0,
        check_interval: float = 3600.0,
        order_timeout: float = 90.0,
        backoff_initial: float = 60.0,
        backoff_max: float = 6 * 3600.0,
        network_timeout: int = 30,
    ) -> None:
        self.directory_url = directory_url
        self.email = email
        self.state_dir = state_dir
        self.store = store
        self.renew_before = datetime.timedelta(days=renew_before_days)
        self.verify_ssl = verify_ssl
        self.lock_timeout = lock_timeout
        self.check_interval = check_interval
        self.order_timeout = order_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.network_timeout = network_timeout
        self.acme_dir = state_dir / "acme"
        self.certs_dir = state_dir / "certs"
        self.challenges_dir = self.acme_dir / "challenges"
        self.orders = 0  # orders placed with the CA by this manager (for tests and status)
        self.issued = 0
        self._hosts: dict[str, _Host] = {}
        self._skipped: dict[str, str] = {}  # host -> why no certificate is ordered for it
        self._challenges: dict[str, str] = {}  # token -> key authorization (this replica's)
        self._client: tuple[client.ClientV2, JWKRSA] | None = None
        self._order_lock = asyncio.Lock()  # one order at a time in this process
        self._ensure_lock = asyncio.Lock()
        self._pending: set[asyncio.Task[None]] = set()
        self._closing = threading.Event()
        self._log = get_logger("acme")
        self._random = secrets.SystemRandom()
        # Hooks for the control plane, which hands both to the workers: a certificate this
        # manager serves (called on the event loop), an HTTP-01 token placed or dropped
        # (called from the ordering thread).
        self.on_certificate: Callable[[tuple[str, ...], bytes, bytes], None] | None = None
        self.on_challenge: Callable[[str, str | None], None] | None = None

    # --- the HTTP-01 answer -----------------------------------------------------------------

    def challenge_response(self, token: str) -> str | None:
        """The key authorization for GET /.well-known/acme-challenge/<token>, or None (-> 404).

        Tokens placed by another replica are read from the shared state directory."""
        if challenge_token(CHALLENGE_PREFIX + token) is None:
            return None
        answer = self._challenges.get(token)
        if answer is not None:
            return answer
        try:
            return (self.challenges_dir / token).read_text("ascii").strip() or None
        except (OSError, UnicodeDecodeError):
            return None

    # --- which hosts are managed --------------------------------------------------------------

    def ensure_soon(self, hosts: Iterable[str]) -> None:
        """ensure() from synchronous code (a route-table swap callback); returns at once."""
        task = asyncio.get_running_loop().create_task(self.ensure(frozenset(hosts)),
                                                      name="acme-ensure")
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def ensure(self, hosts: Iterable[str]) -> None:
        """Manage exactly these hosts: load their stored certificates and start an order in the
        background for each one without a usable certificate. Idempotent; never waits for a CA.

        Hosts dropped from the set stop being renewed (their certificate stays served until it
        expires or the process restarts). Wildcards and IP addresses can't use HTTP-01 and are
        skipped with `acme_host_skipped`."""
        if self._closing.is_set():
            return
        wanted: set[str] = set()
        skipped: dict[str, str] = {}
        for raw in hosts:
            host = raw.strip().rstrip(".").lower()
            reason = None
            if host.startswith("*."):
                reason = "a wildcard name needs the DNS-01 challenge, which edgeproxy does not use"
            elif not _HOST.fullmatch(host) or _is_ip(host):
                reason = "not a DNS name with at least two labels (IP addresses are not ordered)"
            if reason is None:
                wanted.add(host)
                continue
            skipped[host] = reason
            if host not in self._skipped:
                self._log.warning("acme_host_skipped", host=host, reason=reason)
        self._skipped = skipped
        async with self._ensure_lock:
            for name in set(self._hosts) - wanted:
                state = self._hosts.pop(name)
                if state.task is not None:
                    state.task.cancel()
                self._log.info("acme_host_removed", host=name)
            new = sorted(wanted - set(self._hosts))
            if not new:
                return
            stored = await asyncio.to_thread(lambda: {h: self._read_stored(h) for h in new})
            for name in new:
                state = self._hosts[name] = _Host(name)
                found = stored[name]
                if found is not None:
                    self._serve(state, found, "acme_certificate_loaded")
                if found is None or self._due(found.not_after):
                    self._start(state)

    def status(self) -> list[dict[str, object]]:
        """Per host: state (valid, ordering, retrying, missing, skipped), not_after, last error
        (for skipped hosts: why)."""
        out: list[dict[str, object]] = [
            {"host": h, "state": "skipped", "not_after": None, "failures": 0, "last_error": why,
             "retry_in_s": None} for h, why in self._skipped.items()]
        for name in sorted(self._hosts):
            s = self._hosts[name]
            ordering = s.task is not None and not s.task.done()
            state = ("retrying" if s.retry_at is not None else "ordering") if ordering else (
                "valid" if s.info is not None else "missing")
            out.append({
                "host": name, "state": state,
                "not_after": s.info.not_after.isoformat() if s.info else None,
                "failures": s.failures, "last_error": s.last_error,
                "retry_in_s": round(max(0.0, s.retry_at - time.time()), 1)
                if s.retry_at is not None else None,
            })
        return sorted(out, key=lambda row: str(row["host"]))

    def certificate(self, host: str) -> CertInfo | None:
        """The certificate currently served for a managed host."""
        state = self._hosts.get(host)
        return state.info if state else None

    # --- renewal ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Every `check_interval`: pick up certificates renewed by another replica and start a
        renewal for each one within `renew_before` of expiry. Runs until cancelled."""
        while True:
            await asyncio.sleep(self.check_interval)
            try:
                await self.check_renewals()
            except Exception as exc:  # noqa: BLE001 - the loop must outlive one bad check
                self._log.error("acme_check_failed", error=_describe(exc))

    async def check_renewals(self) -> None:
        """One pass of the renewal loop (run() calls it; tests may too)."""
        idle = [s for s in self._hosts.values() if s.task is None or s.task.done()]
        if not idle:
            return
        stored = await asyncio.to_thread(lambda: {s.name: self._read_stored(s.name) for s in idle})
        for state in idle:
            if self._hosts.get(state.name) is not state:
                continue  # removed meanwhile
            found = stored[state.name]
            if found is not None and found.signature != state.signature:
                self._serve(state, found, "acme_certificate_loaded")
            if state.info is None or self._due(state.info.not_after):
                self._start(state)

    def _due(self, not_after: datetime.datetime) -> bool:
        return not_after - _utcnow() < self.renew_before

    # --- orders -------------------------------------------------------------------------------

    def _start(self, state: _Host) -> None:
        if self._closing.is_set():
            return
        if state.task is None or state.task.done():
            state.task = asyncio.get_running_loop().create_task(
                self._obtain_with_retries(state), name=f"acme-order-{state.name}")

    async def _obtain_with_retries(self, state: _Host) -> None:
        while True:
            try:
                async with self._order_lock:
                    if self._closing.is_set():
                        return
                    stored, ordered = await _in_daemon_thread(lambda: self._obtain(state.name))
            except asyncio.CancelledError:
                raise
            except _Closing:
                return
            except Exception as exc:  # noqa: BLE001 - every failure is logged and retried
                state.failures += 1
                delay = min(self.backoff_max, self.backoff_initial * 2 ** (state.failures - 1))
                delay *= self._random.uniform(0.9, 1.1)  # replicas don't retry in lockstep
                state.last_error = _describe(exc)
                state.retry_at = time.time() + delay
                self._log.warning("acme_order_failed", host=state.name, error=state.last_error,
                                  attempt=state.failures, retry_in_s=round(delay, 1))
                await asyncio.sleep(delay)
                continue
            state.failures, state.last_error, state.retry_at = 0, None, None
            self._serve(state, stored, "acme_certificate_issued" if ordered else
                        "acme_certificate_loaded")
            if ordered and self._due(stored.not_after):
                self._log.warning("acme_renew_window_too_long", host=state.name,
                                  not_after=stored.not_after.isoformat(),
                                  renew_before_days=self.renew_before.total_seconds() / 86400,
                                  hint="the CA issues certificates shorter than the renewal "
                                       "window: each check renews again")
            return

    def _serve(self, state: _Host, stored: _Stored, event: str) -> None:
        try:
            info = self.store.add_certificate([state.name], stored.cert_pem, stored.key_pem)
        except CertError as exc:
            self._log.warning("acme_certificate_invalid", host=state.name, error=exc.problem)
            return
        state.info, state.signature = info, stored.signature
        if self.on_certificate is not None:
            self.on_certificate((state.name,), stored.cert_pem, stored.key_pem)
        self._log.info(event, host=state.name, not_after=info.not_after.isoformat(),
                       serial=format(info.serial, "x"))

    def _obtain(self, host: str) -> tuple[_Stored, bool]:
        """Blocking: under the state lock, reuse a fresh certificate from disk or order one.
        Returns the certificate and whether it was ordered."""
        with self._state_lock():
            stored = self._read_stored(host)
            if stored is not None and not self._due(stored.not_after):
                return stored, False  # another replica (or an earlier run) just got it
            started = time.monotonic()
            try:
                cert_pem, key_pem = self._order(host, renewal=stored is not None)
            except Exception:
                self._client = None  # rebuild from scratch next time (new nonce, directory)
                raise
            self._check_closing()
            self.certs_dir.mkdir(parents=True, exist_ok=True)
            _write_atomic(self.certs_dir / f"{host}.key", key_pem, 0o600)
            _write_atomic(self.certs_dir / f"{host}.crt", cert_pem)
            self.issued += 1
            new = self._read_stored(host)
            if new is None:
                raise AcmeError(f"the certificate for {host} was written but cannot be read back")
            self._log.debug("acme_order_done", host=host,
                            duration_s=round(time.monotonic() - started, 2))
            return new, True

    def _order(self, host: str, renewal: bool) -> tuple[bytes, bytes]:
        acme, account_key = self._acme_client()
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        csr = acme_crypto.make_csr(key_pem, [host])
        self._log.info("acme_order_started", host=host, renewal=renewal,
                       directory=self.directory_url)
        try:
            order = acme.new_order(csr)
        except messages.Error as exc:
            if exc.typ == _ACCOUNT_DOES_NOT_EXIST:
                # The CA forgot the account (or the directory changed): register again next try.
                with contextlib.suppress(OSError):
                    (self.acme_dir / "account.json").unlink()
            raise
        self.orders += 1
        tokens: list[str] = []
        try:
            for authzr in order.authorizations:
                if authzr.body.status == messages.STATUS_VALID:
                    continue  # the CA reuses a recent validation
                challb = next((c for c in authzr.body.challenges
                               if isinstance(c.chall, challenges.HTTP01)), None)
                if challb is None:
                    raise AcmeError(f"the CA offers no http-01 challenge for {host}")
                response, validation = challb.chall.response_and_validation(account_key)
                token = challb.chall.encode("token")
                self._put_challenge(token, validation)
                tokens.append(token)
                self._check_closing()
                acme.answer_challenge(challb, response)
            deadline = datetime.datetime.now() + datetime.timedelta(seconds=self.order_timeout)
            order = acme.poll_and_finalize(order, deadline)
        finally:
            for token in tokens:
                self._drop_challenge(token)
        if not order.fullchain_pem:
            raise AcmeError(f"the CA finalized the order for {host} without a certificate")
        return order.fullchain_pem.encode("ascii"), key_pem

    def _put_challenge(self, token: str, validation: str) -> None:
        self._challenges[token] = validation
        self.challenges_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.challenges_dir / token, validation.encode("ascii"))
        if self.on_challenge is not None:
            self.on_challenge(token, validation)

    def _drop_challenge(self, token: str) -> None:
        self._challenges.pop(token, None)
        with contextlib.suppress(OSError):
            (self.challenges_dir / token).unlink()
        if self.on_challenge is not None:
            self.on_challenge(token, None)

    def _acme_client(self) -> tuple[client.ClientV2, JWKRSA]:
        """The client with a registered account (created, and the key generated, if needed),
        and the account key."""
        if self._client is not None:
            return self._client
        key = JWKRSA(key=self._load_account_key())
        net = client.ClientNetwork(key, user_agent=f"edgeproxy/{__version__}",
                                   timeout=self.network_timeout)
        # requests' `verify` takes a CA bundle path as well as a bool (acme types it as bool).
        net.verify_ssl = cast(bool, self.verify_ssl)
        directory = client.ClientV2.get_directory(self.directory_url, net)
        acme = client.ClientV2(directory, net)
        account_file = self.acme_dir / "account.json"
        uri = None
        with contextlib.suppress(OSError, ValueError):
            saved = json.loads(account_file.read_text())
            if saved.get("directory") == self.directory_url:
                uri = saved.get("uri")
        if isinstance(uri, str):
            net.account = messages.RegistrationResource(uri=uri, body=messages.Registration())
        else:
            new = messages.NewRegistration.from_data(email=self.email,
                                                     terms_of_service_agreed=True)
            try:
                regr = acme.new_account(new)
                event = "acme_account_registered"
            except errors.ConflictError as exc:  # this key already has an account there
                regr = messages.RegistrationResource(uri=exc.location, body=messages.Registration())
                net.account = regr
                event = "acme_account_found"
            _write_atomic(account_file, json.dumps(
                {"directory": self.directory_url, "uri": regr.uri, "email": self.email},
                indent=2).encode())
            self._log.info(event, uri=regr.uri, email=self.email)
        self._client = acme, key
        return self._client

    def _load_account_key(self) -> rsa.RSAPrivateKey:
        path = self.acme_dir / "account.key"
        try:
            loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except FileNotFoundError:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self.acme_dir.mkdir(parents=True, exist_ok=True)
            _write_atomic(path, key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()), 0o600)
            return key
        if not isinstance(loaded, rsa.RSAPrivateKey):
            raise AcmeError(f"{path}: expected an RSA private key, found {type(loaded).__name__}")
        return loaded

    def _read_stored(self, host: str) -> _Stored | None:
        """The stored certificate for `host` if it is readable, covers the host and has not
        expired; None otherwise (then it is ordered)."""
        crt, key = self.certs_dir / f"{host}.crt", self.certs_dir / f"{host}.key"
        try:
            st = crt.stat()
            cert_pem, key_pem = crt.read_bytes(), key.read_bytes()
            names, not_after, _ = parse_certificate(cert_pem, str(crt))
        except (OSError, CertError):
            return None
        if host not in names or not_after <= _utcnow():
            return None
        return _Stored(cert_pem, key_pem, not_after, (st.st_ino, st.st_size, st.st_mtime_ns))

    @contextlib.contextmanager
    def _state_lock(self) -> Iterator[None]:
        """Exclusive flock on acme/lock, polled so close() and lock_timeout can end the wait."""
        self.acme_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.acme_dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + self.lock_timeout
            waited = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                if not waited:
                    self._log.info("acme_lock_waiting", lock=str(self.acme_dir / "lock"))
                    waited = True
                if time.monotonic() > deadline:
                    raise AcmeError(f"{self.acme_dir / 'lock'} still held by another process "
                                    f"after {self.lock_timeout:g}s")
                self._check_closing()
                time.sleep(0.2)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _check_closing(self) -> None:
        if self._closing.is_set():
            raise _Closing("closing")

    async def close(self) -> None:
        """Stop orders and retries; a request in flight to the CA is abandoned, not awaited."""
        self._closing.set()
        tasks = [*self._pending, *(s.task for s in self._hosts.values() if s.task is not None)]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
