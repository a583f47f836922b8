"""HTTPS at the edge through the running proxy: SNI from files, redirects, HSTS, and ACME
certificates for a labelled container, issued by a real Pebble."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from docker_fixtures import run_container, unique
from helpers import free_port, run_backend, run_proxy, wait_for, write_routes
from pebble_fixtures import Pebble


def https_get(port: int, sni: str, path: str, ca_pem: str,
              headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes, dict]:
    """GET over TLS to 127.0.0.1:port with SNI `sni`, verifying against `ca_pem`."""
    ctx = ssl.create_default_context(cadata=ca_pem)
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    tls = ctx.wrap_socket(raw, server_hostname=sni)
    cert = tls.getpeercert()
    conn = http.client.HTTPSConnection(sni, port, context=ctx, timeout=10)
    conn.sock = tls
    conn.request("GET", path, headers={"Host": sni, **(headers or {})})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body, cert or {}


def http_get(port: int, host: str, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path, headers={"Host": host})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


def subject_names(cert: dict) -> set[str]:
    return {v for kind, v in cert.get("subjectAltName", ()) if kind == "DNS"}


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def file_tls(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("tls-files")
    certs = tmp / "certs"
    certs.mkdir()
    for name in ("a.test", "b.test"):
        issued = ca.issue_cert(name)
        issued.cert_chain_pems[0].write_to_path(str(certs / f"{name}.crt"))
        issued.private_key_pem.write_to_path(str(certs / f"{name}.key"))
    with run_backend("tls-backend") as backend:
        routes = write_routes(tmp / "routes.toml", {
            "a": {"host": "a.test", "upstreams": [backend], "tls": "true",
                  "tls.hsts": "365d"},
            "b": {"host": "b.test", "upstreams": [backend], "tls": "true",
                  "tls.redirect": False},
        })
        tls_port = free_port()
        with run_proxy(tmp, docker="false", routes_file=str(routes),
                       tls_listen=f"127.0.0.1:{tls_port}", tls_certs_dir=str(certs),
                       tls_redirect_port=str(tls_port), tls_reload="200ms") as p:
            yield {"proxy": p, "tls_port": tls_port, "certs": certs}


def test_sni_picks_the_certificate_and_forwarded_proto_is_https(file_tls: dict,
                                                                 ca: trustme.CA) -> None:
    ca_pem = ca.cert_pem.bytes().decode()
    for name in ("a.test", "b.test"):
        status, _, body, cert = https_get(file_tls["tls_port"], name, "/echo", ca_pem)
        assert status == 200
        assert subject_names(cert) == {name}
        seen = {k.lower(): v for k, v in json.loads(body)["headers"]}
        assert seen["x-forwarded-proto"] == "https"


def test_plain_http_redirects_with_308_except_acme_challenges(file_tls: dict) -> None:
    p, port = file_tls["proxy"], file_tls["tls_port"]
    status, headers, _ = http_get(p.port, "a.test", "/orders?x=1")
    assert status == 308
    assert headers["location"] == f"https://a.test:{port}/orders?x=1"
    # The challenge path is never redirected (unknown tokens fall through to routing).
    status, _, _ = http_get(p.port, "a.test", "/.well-known/acme-challenge/nope")
    assert status != 308
    # gateway.tls.redirect=false keeps plain HTTP, with the honest X-Forwarded-Proto.
    status, _, body = http_get(p.port, "b.test", "/echo")
    assert status == 200
    seen = {k.lower(): v for k, v in json.loads(body)["headers"]}
    assert seen["x-forwarded-proto"] == "http"


def test_absolute_form_request_redirects_to_its_own_authority(file_tls: dict) -> None:
    # GET http://a.test/orders with a Host that names another site: the target's authority
    # decides both the route and the redirect.
    p, port = file_tls["proxy"], file_tls["tls_port"]
    status, headers, _ = http_get(p.port, "b.test", "http://a.test/orders?x=1")
    assert status == 308
    assert headers["location"] == f"https://a.test:{port}/orders?x=1"


def test_hsts_only_when_asked_and_only_over_https(file_tls: dict, ca: trustme.CA) -> None:
    ca_pem = ca.cert_pem.bytes().decode()
    _, headers, _, _ = https_get(file_tls["tls_port"], "a.test", "/", ca_pem)
    assert headers["strict-transport-security"] == "max-age=31536000"
    _, headers, _, _ = https_get(file_tls["tls_port"], "b.test", "/", ca_pem)
    assert "strict-transport-security" not in headers


def test_certificate_files_reload_without_restart(file_tls: dict, ca: trustme.CA) -> None:
    certs: Path = file_tls["certs"]
    issued = ca.issue_cert("c.test")
    issued.private_key_pem.write_to_path(str(certs / "c.test.key"))
    issued.cert_chain_pems[0].write_to_path(str(certs / "c.test.crt"))
    ca_pem = ca.cert_pem.bytes().decode()

    def served() -> bool:
        _, _, _, cert = https_get(file_tls["tls_port"], "c.test", "/", ca_pem)
        return subject_names(cert) == {"c.test"}

    wait_for(served, 10, what="c.test certificate picked up")


@pytest.fixture(scope="module")
def pebble(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pebble]:
    server = Pebble(tmp_path_factory.mktemp("pebble-proxy"))
    server.start()
    yield server
    server.stop()


def test_acme_certificate_for_a_labelled_container(docker_engine: None, pebble: Pebble,
                                                   tmp_path: Path) -> None:
    run_container(unique("acme"), {"gateway.host": "app.test", "gateway.tls": "acme",
                                   "gateway.strip_prefix": "true"})
    state = tmp_path / "state"
    tls_port = free_port()
    settings = {
        "listen": f"127.0.0.1:{pebble.http_port}",  # where Pebble sends HTTP-01 requests
        "tls_listen": f"127.0.0.1:{tls_port}", "state_dir": str(state),
        "acme_directory": pebble.directory, "acme_ca_bundle": str(pebble.ca_bundle),
        "acme_email": "ops@example.test",
    }

    def issued(p: object) -> bool:
        acme = p.admin("/healthz")["tls"]["acme"]  # type: ignore[attr-defined]
        return any(a["host"] == "app.test" and a["state"] == "valid" for a in acme)

    with run_proxy(tmp_path, **settings) as p:
        wait_for(lambda: issued(p), 60, what="certificate for app.test from Pebble")
        root = pebble.root_pem()
        status, _, body, cert = https_get(tls_port, "app.test", "/", root)
        assert status == 200 and body.strip()  # busybox serves its hostname
        assert subject_names(cert) == {"app.test"}
        assert p.events("acme_certificate_issued")
    orders = pebble.orders()

    # A restart reuses the stored certificate: no new order.
    with run_proxy(tmp_path, **settings) as p:
        wait_for(lambda: issued(p), 20, what="stored certificate loaded")
        status, _, _, cert = https_get(tls_port, "app.test", "/", pebble.root_pem())
        assert status == 200 and subject_names(cert) == {"app.test"}
        assert pebble.orders() == orders

    # A renewal window longer than the certificate's life forces a renewal.
    with run_proxy(tmp_path, **settings, acme_renew_before="3650d") as p:
        wait_for(lambda: pebble.orders() > orders, 60, what="renewal order")
        wait_for(lambda: issued(p), 60, what="renewed certificate")
