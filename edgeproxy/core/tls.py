"""Certificates for the HTTPS listener: chosen by SNI name, from files and ACME, reloaded live.

One server SSLContext is handed to the listener once. Its SNI callback looks the requested name up
in an immutable index of per-certificate SSLContexts and switches the handshake to the one that
fits. A reload builds a new index and swaps one reference: handshakes that already happened keep
the context they got, new handshakes see the new certificates, no connection is dropped.

Which certificate answers a name:
- an exact SAN name beats a wildcard (`*.example.com` covers exactly one extra label);
- for the same name, file certificates beat ACME ones: the explicit pair first, then the pairs
  of the directory in file-name order, then certificates added at run time (ACME);
- a name no certificate covers, or a client that sends no SNI, gets the default certificate:
  the explicit pair if given, else the first pair of the directory in file-name order. Without
  any file certificate there is no default, and such a handshake fails with the TLS alert
  `unrecognized_name` (so scanners that connect by IP learn no host names).

`Edge` and `ChallengeAnswers` are the TLS facts a request decision reads (which hosts have a
certificate, the HTTPS redirect port, ACME HTTP-01 answers); they live here, below both planes,
so the data plane reads them without importing the control plane's ACME manager.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import re
import ssl
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Protocol

from cryptography import x509
from cryptography.x509.oid import NameOID

from edgeproxy.core.logs import get_logger

# Mozilla's "intermediate" TLS 1.2 suites: forward secret AEAD only. TLS 1.3 suites are
# OpenSSL's defaults (all AEAD) and are not affected by set_ciphers.
TLS12_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
))
ALPN_PROTOCOLS = ("h2", "http/1.1")  # h2 first: HTTP/2 when the client offers it


class CertError(ValueError):
    """A certificate or key cannot be used; the message names the file and the problem."""

    def __init__(self, source: str, problem: str) -> None:
        super().__init__(f"{source}: {problem}")
        self.source = source
        self.problem = problem


@dataclass(frozen=True, slots=True)
class CertInfo:
    """What the admin API shows about one loaded certificate."""

    names: tuple[str, ...]  # SAN DNS names, lower-case (the CN only when there is no SAN)
    not_after: datetime.datetime  # UTC
    serial: int
    source: str  # the .crt path, or "acme" for certificates added at run time
    default: bool = False

    def as_dict(self) -> dict[str, object]:
        """JSON-ready view for /healthz or /routes."""
        return {"names": list(self.names), "not_after": self.not_after.isoformat(),
                "serial": format(self.serial, "x"), "source": self.source,
                "default": self.default}


@dataclass(frozen=True, slots=True)
class _Entry:
    info: CertInfo
    context: ssl.SSLContext = field(compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class _Index:
    """Immutable name -> certificate lookup, built once per change."""

    exact: Mapping[str, _Entry] = field(default_factory=dict)
    wildcard: Mapping[str, _Entry] = field(default_factory=dict)  # "example.com" for *.example.com
    default: _Entry | None = None
    entries: tuple[_Entry, ...] = ()

    def lookup(self, server_name: str | None) -> _Entry | None:
        if server_name:
            name = server_name.rstrip(".").lower()
            entry = self.exact.get(name)
            if entry is not None:
                return entry
            _, dot, parent = name.partition(".")
            if dot:
                entry = self.wildcard.get(parent)
                if entry is not None:
                    return entry
        return self.default


def _build_index(entries: Iterable[_Entry], default: _Entry | None) -> _Index:
    exact: dict[str, _Entry] = {}
    wildcard: dict[str, _Entry] = {}
    ordered = tuple(entries)
    for entry in ordered:  # first one wins: callers pass entries in priority order
        for name in entry.info.names:
            if name.startswith("*."):
                wildcard.setdefault(name[2:], entry)
            else:
                exact.setdefault(name, entry)
    return _Index(MappingProxyType(exact), MappingProxyType(wildcard), default, ordered)


def _matches(names: Iterable[str], server_name: str) -> bool:
    name = server_name.rstrip(".").lower()
    parent = name.partition(".")[2]
    return any(n == name or (n.startswith("*.") and n[2:] == parent) for n in names)


def server_context() -> ssl.SSLContext:
    """A server SSLContext with our policy: TLS 1.2 minimum, AEAD ciphers, ALPN h2 and
    http/1.1.

    Every per-certificate context uses it too: after the SNI switch OpenSSL takes the ALPN
    callback from the new context."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.set_alpn_protocols(list(ALPN_PROTOCOLS))
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_SINGLE_ECDH_USE
    return ctx


def parse_certificate(cert_pem: bytes, source: str) -> tuple[tuple[str, ...], datetime.datetime, int]:
    """The leaf's DNS names, not-after (UTC) and serial; CertError if it is not a certificate."""
    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as exc:
        raise CertError(source, f"not a PEM certificate ({exc})") from None
    leaf = certs[0]
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = [n.lower() for n in san.value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = [str(a.value).lower() for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    names = list(dict.fromkeys(n.rstrip(".") for n in names if n))
    if not names:
        raise CertError(source, "the certificate names no DNS host (no subjectAltName DNS entry)")
    return tuple(names), leaf.not_valid_after_utc, leaf.serial_number


@contextlib.contextmanager
def _pem_path(data: bytes) -> Iterator[str]:
    """A path holding `data` for load_cert_chain, which only reads files: an anonymous memory
    file where Linux has them, so private keys are never written to a temp directory."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("edgeproxy-pem", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    fd, path = tempfile.mkstemp(prefix="edgeproxy-", suffix=".pem")  # mode 0600
    try:
        os.write(fd, data)
        os.close(fd)
        yield path
    finally:
        os.unlink(path)


def make_entry(cert_pem: bytes, key_pem: bytes, source: str) -> _Entry:
    """Parse a certificate (chain) and its key into a ready per-certificate context."""
    names, not_after, serial = parse_certificate(cert_pem, source)
    ctx = server_context()
    try:
        with _pem_path(cert_pem) as cert_path, _pem_path(key_pem) as key_path:
            ctx.load_cert_chain(cert_path, key_path)
    except ssl.SSLError as exc:
        raise CertError(source, f"the key does not fit the certificate or is unreadable ({exc.reason})"
                        ) from None
    return _Entry(CertInfo(names, not_after, serial, source), ctx)


def _read_pair(cert_path: Path, key_path: Path) -> _Entry:
    try:
        cert_pem = cert_path.read_bytes()
    except OSError as exc:
        raise CertError(str(cert_path), f"cannot read ({exc.strerror or exc})") from None
    try:
        key_pem = key_path.read_bytes()
    except OSError as exc:
        raise CertError(str(key_path), f"cannot read ({exc.strerror or exc})") from None
    return make_entry(cert_pem, key_pem, str(cert_path))


_Signature = tuple[tuple[str, int, int, int], ...]


def _stat_signature(paths: Iterable[Path]) -> _Signature:
    out = []
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            out.append((str(p), -1, -1, -1))
        else:
            out.append((str(p), st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


class CertStore:
    """Certificates by SNI name: `*.crt`/`*.key` pairs of a directory, one explicit pair, and
    certificates added at run time (ACME). Thread-safe; the SNI callback never blocks."""

    def __init__(self, certs_dir: Path | None = None, cert_file: Path | None = None,
                 key_file: Path | None = None) -> None:
        if (cert_file is None) != (key_file is None):
            given = "EDGEPROXY_TLS_CERT" if cert_file is not None else "EDGEPROXY_TLS_KEY"
            raise CertError(given, "EDGEPROXY_TLS_CERT and EDGEPROXY_TLS_KEY must be set together")
        self.certs_dir = certs_dir
        self.cert_file = cert_file
        self.key_file = key_file
        self._lock = threading.Lock()  # serialises index rebuilds (watch thread vs add_certificate)
        self._index = _Index()
        self._files: dict[str, _Entry] = {}  # .crt path -> last good entry
        self._added: dict[frozenset[str], _Entry] = {}
        self._signature: _Signature | None = None
        self._context: ssl.SSLContext | None = None
        self._log = get_logger("tls")
        self.reloads = 0

    # --- loading ----------------------------------------------------------------------------

    def load(self) -> None:
        """First load at start: CertError if the explicit pair or the directory is unusable.
        A bad pair inside the directory is only logged and skipped, like a bad label."""
        if self.certs_dir is not None and not self.certs_dir.is_dir():
            raise CertError(str(self.certs_dir), "EDGEPROXY_TLS_CERTS_DIR is not a directory")
        if self.cert_file is not None and self.key_file is not None:
            _read_pair(self.cert_file, self.key_file)  # raises with the file and the problem
        self.reload_if_changed()

    def _pairs(self) -> tuple[list[tuple[Path, Path]], list[Path]]:
        """(crt, key) pairs in priority order, and .crt files without their .key.
        OSError if the directory can't be listed."""
        pairs: list[tuple[Path, Path]] = []
        unpaired: list[Path] = []
        if self.cert_file is not None and self.key_file is not None:
            pairs.append((self.cert_file, self.key_file))
        if self.certs_dir is not None:
            crts = sorted(p for p in self.certs_dir.iterdir() if p.suffix == ".crt")
            for crt in crts:
                key = crt.with_suffix(".key")
                if key.exists():
                    pairs.append((crt, key))
                else:
                    unpaired.append(crt)
        return pairs, unpaired

    def reload_if_changed(self) -> bool:
        """Re-read the files if any changed (inode, size or mtime); True when the index changed.

        A pair that fails to load keeps its previous version (if any) and logs
        `tls_cert_invalid`; the next change of its files tries again."""
        try:
            pairs, unpaired = self._pairs()
        except OSError as exc:
            # An unmounted or unreadable volume must not unload every certificate: keep them.
            self._log.warning("tls_certs_dir_unreadable", dir=str(self.certs_dir),
                              error=exc.strerror or str(exc))
            return False
        signature = _stat_signature([p for pair in pairs for p in pair] + unpaired)
        if signature == self._signature:
            return False
        files: dict[str, _Entry] = {}
        for crt, key in pairs:
            try:
                files[str(crt)] = _read_pair(crt, key)
            except CertError as exc:
                self._log.warning("tls_cert_invalid", file=exc.source, error=exc.problem,
                                  kept_previous=str(crt) in self._files)
                if str(crt) in self._files:
                    files[str(crt)] = self._files[str(crt)]
        for crt in unpaired:
            self._log.warning("tls_cert_unpaired", file=str(crt),
                              expected=str(crt.with_suffix(".key")))
        with self._lock:
            self._files = files
            self._signature = signature
            self._rebuild()
        self.reloads += 1
        self._log.info("tls_certs_loaded", files=len(files), names=len(self._index.exact)
                       + len(self._index.wildcard), default=self._default_source())
        return True

    def _default_source(self) -> str | None:
        default = self._index.default
        return default.info.source if default else None

    def _rebuild(self) -> None:
        """Called with the lock held: one new index from files (in order) then added certs."""
        files = list(self._files.values())
        default = None
        if files:  # the first pair that loaded: the explicit one, else the first by file name
            default = files[0] = _Entry(replace(files[0].info, default=True), files[0].context)
        self._index = _build_index([*files, *self._added.values()], default)

    async def watch(self, interval: float = 2.0) -> None:
        """Poll the files every `interval` seconds and reload on change (until cancelled)."""
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(self.reload_if_changed)
            except Exception as exc:  # noqa: BLE001 - keep watching whatever a reload hit
                self._log.error("tls_reload_failed", error=repr(exc))

    # --- certificates added at run time -----------------------------------------------------

    def add_certificate(self, names: Iterable[str], cert_pem: bytes, key_pem: bytes) -> CertInfo:
        """Serve this certificate for `names` (replacing one added before for the same names).
        CertError if it does not parse, the key does not fit, or it does not cover every name."""
        wanted = frozenset(n.lower() for n in names)
        entry = make_entry(cert_pem, key_pem, "acme")
        missing = sorted(wanted - set(entry.info.names))
        if missing:
            raise CertError("acme", f"the certificate does not cover {', '.join(missing)}")
        with self._lock:
            self._added[wanted] = entry
            self._rebuild()
        return entry.info

    def remove_certificate(self, names: Iterable[str]) -> None:
        """Stop serving the certificate added for `names`, if any."""
        with self._lock:
            if self._added.pop(frozenset(n.lower() for n in names), None) is not None:
                self._rebuild()

    # --- serving ----------------------------------------------------------------------------

    def context(self) -> ssl.SSLContext:
        """The listener's SSLContext (one object for the store's lifetime)."""
        if self._context is None:
            ctx = server_context()
            ctx.sni_callback = self._select
            self._context = ctx
        return self._context

    def _select(self, conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                _ctx: ssl.SSLContext) -> int | None:
        entry = self._index.lookup(server_name)
        if entry is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        conn.context = entry.context
        return None

    def lookup(self, server_name: str | None) -> CertInfo | None:
        """The certificate a handshake for `server_name` would get (None: handshake fails)."""
        entry = self._index.lookup(server_name)
        return entry.info if entry else None

    def covers(self, server_name: str) -> bool:
        """True when a certificate names `server_name` (exactly or by wildcard), so the
        default certificate is not what a client would get."""
        entry = self._index.lookup(server_name)
        return entry is not None and (entry is not self._index.default
                                      or _matches(entry.info.names, server_name))

    def names(self) -> tuple[str, ...]:
        """Every name some certificate covers, sorted (wildcards as `*.example.com`)."""
        index = self._index
        return tuple(sorted([*index.exact, *("*." + w for w in index.wildcard)]))

    def certificates(self) -> tuple[CertInfo, ...]:
        """Every loaded certificate, in priority order."""
        return tuple(e.info for e in self._index.entries)

    @property
    def has_default(self) -> bool:
        """True when unknown names get a certificate rather than a failed handshake."""
        return self._index.default is not None


# --- helpers for the plain-HTTP listener ------------------------------------------------------


_REDIRECT_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})|\[[0-9A-Fa-f:.]{2,45}\]")


def https_redirect_url(host_header: str, path_qs: str, https_port: int = 443) -> str | None:
    """Where a plain-HTTP request should go: same host (its port replaced), same path and query.

    `host_header` is the request's Host (may carry a port or be an [IPv6] literal). None when it
    is not a plain host name or address (`a@b`, `a/b`, empty): answer 400, never redirect to
    something the client smuggled into Host."""
    host = host_header.strip()
    if host.startswith("[") and "]" in host:
        host = host[: host.index("]") + 1]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if not _REDIRECT_HOST.fullmatch(host):
        return None
    port = "" if https_port == 443 else f":{https_port}"
    return f"https://{host.lower()}{port}{path_qs if path_qs.startswith('/') else '/' + path_qs}"


def hsts_value(max_age: int, include_subdomains: bool = False, preload: bool = False) -> str:
    """The Strict-Transport-Security value (send it on HTTPS responses only)."""
    value = f"max-age={max_age}"
    if include_subdomains:
        value += "; includeSubDomains"
    if preload:
        value += "; preload"
    return value


@dataclass(frozen=True, slots=True)
class Edge:
    """What a decision needs to know about this proxy besides the table (fixed per worker).

    `covers(host)`: a certificate is served for host (None: no TLS listener);
    `challenge(token)`: the ACME HTTP-01 answer for a token, or None."""

    covers: Callable[[str], bool] | None = None
    redirect_port: int = 443
    challenge: Callable[[str], str | None] | None = None


class ChallengeAnswers(Protocol):
    """What the request path needs from ACME: HTTP-01 answers, and order status for /healthz."""

    def challenge_response(self, token: str) -> str | None: ...

    def status(self) -> list[dict[str, object]]: ...
