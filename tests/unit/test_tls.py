"""CertStore: real TLS handshakes over loopback with trustme certificates (SNI, wildcards, default,
reload without dropping connections, ACME-added certificates) and the plain-HTTP helpers."""

from __future__ import annotations

import asyncio
import datetime
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from edgeproxy.core.tls import CertError, CertStore, hsts_value, https_redirect_url


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def write_pair(ca: trustme.CA, directory: Path, stem: str, *names: str) -> tuple[Path, Path]:
    """A fresh certificate for `names` as directory/stem.crt + .key (chain included)."""
    cert = ca.issue_cert(*names)
    crt, key = directory / f"{stem}.crt", directory / f"{stem}.key"
    # Write to a temp name and rename, as a careful operator (or cert-manager) does.
    for path, data in ((key, cert.private_key_pem.bytes()),
                       (crt, b"".join(p.bytes() for p in cert.cert_chain_pems))):
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return crt, key


def pem_pair(ca: trustme.CA, *names: str) -> tuple[bytes, bytes]:
    cert = ca.issue_cert(*names)
    return b"".join(p.bytes() for p in cert.cert_chain_pems), cert.private_key_pem.bytes()


class TLSServer:
    """A thread that accepts TLS connections with the store's context and echoes lines."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                raw, _ = self.sock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(5)
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as conn:
                while line := conn.recv(1024):
                    conn.sendall(line)
        except (ssl.SSLError, OSError) as exc:
            self.errors.append(exc)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()


@contextmanager
def serving(store: CertStore) -> Iterator[TLSServer]:
    server = TLSServer(store.context())
    try:
        yield server
    finally:
        server.close()


@dataclass
class Peer:
    names: list[str]
    serial: int
    alpn: str | None
    version: str | None
    conn: ssl.SSLSocket


def client_context(ca: trustme.CA, check_hostname: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.check_hostname = check_hostname
    return ctx


@contextmanager
def connect(port: int, server_name: str | None, ctx: ssl.SSLContext,
            alpn: list[str] | None = None) -> Iterator[Peer]:
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    with ctx.wrap_socket(raw, server_hostname=server_name) as conn:
        der = conn.getpeercert(binary_form=True)
        assert der is not None
        cert = x509.load_der_x509_certificate(der)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        yield Peer(list(san.value.get_values_for_type(x509.DNSName)), cert.serial_number,
                   conn.selected_alpn_protocol(), conn.version(), conn)


def peer(port: int, server_name: str | None, ca: trustme.CA, check_hostname: bool = True) -> Peer:
    with connect(port, server_name, client_context(ca, check_hostname)) as p:
        return p


def test_sni_picks_the_certificate_for_each_name(tmp_path: Path, ca: trustme.CA) -> None:
    write_pair(ca, tmp_path, "a", "a.example.com")
    write_pair(ca, tmp_path, "b", "b.example.com", "www.b.example.com")
    store = CertStore(certs_dir=tmp_path)
    store.load()
    with serving(store) as server:
        assert peer(server.port, "a.example.com", ca).names == ["a.example.com"]
        assert peer(server.port, "b.example.com", ca).names == ["b.example.com", "www.b.example.com"]
        assert peer(server.port, "www.b.example.com", ca).names[0] == "b.example.com"
        assert peer(server.port, "A.Example.COM", ca).names == ["a.example.com"]
    assert store.names() == ("a.example.com", "b.example.com", "www.b.example.com")


def test_wildcard_covers_one_label_and_exact_names_win(tmp_path: Path, ca: trustme.CA) -> None:
    write_pair(ca, tmp_path, "0-default", "default.test")
    write_pair(ca, tmp_path, "wild", "*.wild.test")
    write_pair(ca, tmp_path, "exact", "api.wild.test")
    store = CertStore(certs_dir=tmp_path)
    store.load()
    with serving(store) as server:
        assert peer(server.port, "x.wild.test", ca).names == ["*.wild.test"]
        assert peer(server.port, "api.wild.test", ca).names == ["api.wild.test"]
        # One label only: deeper names and the bare parent fall back to the default.
        assert peer(server.port, "a.b.wild.test", ca, check_hostname=False).names == ["default.test"]
        assert peer(server.port, "wild.test", ca, check_hostname=False).names == ["default.test"]
    assert store.lookup("x.wild.test") is not None
    assert "*.wild.test" in store.names()
    for name, covered in (("x.wild.test", True), ("api.wild.test", True), ("default.test", True),
                          ("a.b.wild.test", False), ("other.test", False)):
        assert store.covers(name) is covered, name


def test_unknown_name_and_no_sni_get_the_explicit_default(tmp_path: Path, ca: trustme.CA) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    write_pair(ca, certs, "a", "a.example.com")
    crt, key = write_pair(ca, tmp_path, "main", "main.example.com")
    store = CertStore(certs_dir=certs, cert_file=crt, key_file=key)
    store.load()
    with serving(store) as server:
        assert peer(server.port, "nobody.example.com", ca, check_hostname=False).names == [
            "main.example.com"]
        assert peer(server.port, None, ca, check_hostname=False).names == ["main.example.com"]
        assert peer(server.port, "a.example.com", ca).names == ["a.example.com"]
    (default,) = [c for c in store.certificates() if c.default]
    assert default.source == str(crt)
    assert store.has_default


def test_without_a_file_certificate_unknown_names_fail_the_handshake(ca: trustme.CA) -> None:
    store = CertStore()
    store.load()
    store.add_certificate(["app.test"], *pem_pair(ca, "app.test"))
    assert not store.has_default
    with serving(store) as server:
        assert peer(server.port, "app.test", ca).names == ["app.test"]
        for name in ("other.test", None):
            with pytest.raises(ssl.SSLError, match=r"UNRECOGNIZED_NAME|unrecognized name"):
                peer(server.port, name, ca, check_hostname=False)


def test_reload_on_change_keeps_open_connections(tmp_path: Path, ca: trustme.CA) -> None:
    write_pair(ca, tmp_path, "a", "a.example.com")
    store = CertStore(certs_dir=tmp_path)
    store.load()
    assert store.reload_if_changed() is False  # nothing changed: no work
    with serving(store) as server, connect(server.port, "a.example.com", client_context(ca)) as old:
        old.conn.sendall(b"before\n")
        assert old.conn.recv(100) == b"before\n"

        write_pair(ca, tmp_path, "a", "a.example.com")  # renewed in place
        write_pair(ca, tmp_path, "b", "b.example.com")  # and a new one
        assert store.reload_if_changed() is True
        new = peer(server.port, "a.example.com", ca)
        assert new.serial != old.serial
        assert peer(server.port, "b.example.com", ca).names == ["b.example.com"]

        # The connection made before the reload is still up and keeps its certificate.
        old.conn.sendall(b"after\n")
        assert old.conn.recv(100) == b"after\n"

        (tmp_path / "b.crt").unlink()
        (tmp_path / "b.key").unlink()
        assert store.reload_if_changed() is True
        assert store.lookup("b.example.com") is not None  # the default (first pair) answers now
        assert store.lookup("b.example.com").names == ("a.example.com",)  # type: ignore[union-attr]


def test_a_broken_file_keeps_the_previous_certificate(tmp_path: Path, ca: trustme.CA) -> None:
    write_pair(ca, tmp_path, "a", "a.example.com")
    store = CertStore(certs_dir=tmp_path)
    store.load()
    before = store.lookup("a.example.com")
    (tmp_path / "a.crt").write_text("-----BEGIN CERTIFICATE-----\ngarbage\n")
    assert store.reload_if_changed() is True
    assert store.lookup("a.example.com") == before
    # A mismatched key is refused too.
    other_crt, _ = write_pair(ca, tmp_path / "..", "other", "other.example.com")
    os.replace(other_crt, tmp_path / "a.crt")
    store.reload_if_changed()
    assert store.lookup("a.example.com") == before
    write_pair(ca, tmp_path, "a", "a.example.com")
    store.reload_if_changed()
    assert store.lookup("a.example.com") != before


def test_a_vanished_directory_keeps_every_certificate(tmp_path: Path, ca: trustme.CA) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    write_pair(ca, certs, "a", "a.example.com")
    store = CertStore(certs_dir=certs)
    store.load()
    (certs / "a.crt").unlink()
    (certs / "a.key").unlink()
    certs.rmdir()  # an unmounted volume, say
    assert store.reload_if_changed() is False
    assert store.names() == ("a.example.com",)


def test_unpaired_crt_is_skipped(tmp_path: Path, ca: trustme.CA) -> None:
    write_pair(ca, tmp_path, "a", "a.example.com")
    write_pair(ca, tmp_path, "b", "b.example.com")
    (tmp_path / "b.key").unlink()
    store = CertStore(certs_dir=tmp_path)
    store.load()
    assert store.names() == ("a.example.com",)


def test_watch_reloads_in_the_background(tmp_path: Path, ca: trustme.CA) -> None:
    write_pair(ca, tmp_path, "a", "a.example.com")
    store = CertStore(certs_dir=tmp_path)
    store.load()

    async def scenario() -> None:
        task = asyncio.create_task(store.watch(interval=0.02))
        try:
            write_pair(ca, tmp_path, "b", "b.example.com")
            async with asyncio.timeout(5):
                while "b.example.com" not in store.names():
                    await asyncio.sleep(0.01)
        finally:
            task.cancel()

    asyncio.run(scenario())


def test_added_certificates_yield_to_files_and_can_be_replaced(tmp_path: Path, ca: trustme.CA) -> None:
    write_pair(ca, tmp_path, "file", "shared.test")
    store = CertStore(certs_dir=tmp_path)
    store.load()
    store.add_certificate(["shared.test"], *pem_pair(ca, "shared.test"))
    info = store.add_certificate(["app.test"], *pem_pair(ca, "app.test"))
    assert info.source == "acme"
    assert store.lookup("shared.test").source == str(tmp_path / "file.crt")  # type: ignore[union-attr]
    renewed = store.add_certificate(["app.test"], *pem_pair(ca, "app.test"))
    assert store.lookup("app.test") == renewed != info
    assert len([c for c in store.certificates() if c.source == "acme"]) == 2
    store.remove_certificate(["app.test"])
    assert "app.test" not in store.names()
    with pytest.raises(CertError, match=r"does not cover other\.test"):
        store.add_certificate(["other.test"], *pem_pair(ca, "app.test"))
    # A reload of the files keeps the added certificates.
    write_pair(ca, tmp_path, "more", "more.test")
    store.reload_if_changed()
    assert "shared.test" in store.names() and "more.test" in store.names()


def test_not_after_is_exposed(tmp_path: Path, ca: trustme.CA) -> None:
    write_pair(ca, tmp_path, "a", "a.example.com")
    store = CertStore(certs_dir=tmp_path)
    store.load()
    (info,) = store.certificates()
    assert info.not_after.tzinfo is not None
    assert info.not_after > datetime.datetime.now(datetime.UTC)
    assert info.as_dict()["names"] == ["a.example.com"]


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_protocol_policy(tmp_path: Path, ca: trustme.CA) -> None:
    write_pair(ca, tmp_path, "a", "a.example.com")
    store = CertStore(certs_dir=tmp_path)
    store.load()
    assert store.context().minimum_version == ssl.TLSVersion.TLSv1_2
    with serving(store) as server:
        with connect(server.port, "a.example.com", client_context(ca), ["h2", "http/1.1"]) as p:
            assert p.alpn == "h2"  # HTTP/2 when the client offers it
            assert p.version in ("TLSv1.2", "TLSv1.3")
        with connect(server.port, "a.example.com", client_context(ca), ["http/1.1"]) as p:
            assert p.alpn == "http/1.1"
        with connect(server.port, "a.example.com", client_context(ca), ["spdy/3"]) as p:
            assert p.alpn is None  # no overlap: no ALPN, the handshake still succeeds
        old = client_context(ca)
        old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        try:
            old.set_ciphers("DEFAULT:@SECLEVEL=0")
        except ssl.SSLError:
            pass
        with pytest.raises(ssl.SSLError), connect(server.port, "a.example.com", old):
            pass
        tls12 = client_context(ca)
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        with connect(server.port, "a.example.com", tls12) as p:
            assert p.version == "TLSv1.2"
            cipher = p.conn.cipher()
            assert cipher is not None and ("GCM" in cipher[0] or "CHACHA20" in cipher[0])
            assert cipher[0].startswith("ECDHE")


def test_configuration_errors(tmp_path: Path, ca: trustme.CA) -> None:
    crt, key = write_pair(ca, tmp_path, "a", "a.example.com")
    with pytest.raises(CertError, match="must be set together"):
        CertStore(cert_file=crt)
    with pytest.raises(CertError, match="not a directory"):
        CertStore(certs_dir=tmp_path / "missing").load()
    with pytest.raises(CertError, match=r"missing\.key: cannot read"):
        CertStore(cert_file=crt, key_file=tmp_path / "missing.key").load()
    _, other_key = write_pair(ca, tmp_path, "b", "b.example.com")
    with pytest.raises(CertError, match="does not fit"):
        CertStore(cert_file=crt, key_file=other_key).load()
    with pytest.raises(CertError, match="not a PEM certificate"):
        CertStore(cert_file=key, key_file=key).load()


@pytest.mark.parametrize(("host", "path", "port", "expected"), [
    ("app.test", "/a?b=1", 443, "https://app.test/a?b=1"),
    ("app.test:8080", "/", 443, "https://app.test/"),
    ("app.test:8080", "/x", 8443, "https://app.test:8443/x"),
    ("[::1]:8080", "/x", 443, "https://[::1]/x"),
    ("[::1]", "/x", 8443, "https://[::1]:8443/x"),
    ("app.test", "", 443, "https://app.test/"),
    ("App.Test:80", "/", 443, "https://app.test/"),
    ("evil.test@app.test", "/", 443, None),
    ("app.test/evil", "/", 443, None),
    ("", "/", 443, None),
    ("[::1", "/", 443, None),
])
def test_https_redirect_url(host: str, path: str, port: int, expected: str | None) -> None:
    assert https_redirect_url(host, path, port) == expected


def test_hsts_value() -> None:
    assert hsts_value(31536000) == "max-age=31536000"
    assert hsts_value(600, include_subdomains=True, preload=True) == (
        "max-age=600; includeSubDomains; preload")
