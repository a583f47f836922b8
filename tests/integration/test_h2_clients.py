"""HTTP/2 with real clients against the real proxy process: curl (nghttp2) over TLS with ALPN
and over h2c with prior knowledge, h2load with many multiplexed streams, and HTTP/1.1 and
WebSocket clients on the same TLS listener."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import requests
import trustme

from tests.helpers import ProxyProcess, free_port, run_backend, run_proxy, wait_for, write_routes

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@dataclass
class TlsProxy:
    """The proxy process with its TLS listener's port and the CA that signed its certificate."""

    p: ProxyProcess
    tls_port: int
    ca_file: Path

    def url(self, path: str) -> str:
        return self.p.url(path)


@pytest.fixture(scope="module")
def proxy(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsProxy]:
    tmp = tmp_path_factory.mktemp("h2-clients")
    (tmp / "ca.pem").write_bytes(ca.cert_pem.bytes())
    cert = ca.issue_cert("app.test")
    cert.cert_chain_pems[0].write_to_path(str(tmp / "app.crt"))
    cert.private_key_pem.write_to_path(str(tmp / "app.key"))
    with run_backend("h2-clients") as backend:
        routes = write_routes(tmp / "routes.toml", {
            "app": {"host": "app.test", "upstreams": [backend], "tls": "true",
                    "tls.redirect": False, "response.headers.X-Route": "app"},
            "api": {"path": "/api", "upstreams": [backend], "strip_prefix": True}})
        tls_port = free_port()
        with run_proxy(tmp, docker="false", routes_file=str(routes), h2c="true",
                       tls_listen=f"127.0.0.1:{tls_port}", tls_cert=str(tmp / "app.crt"),
                       tls_key=str(tmp / "app.key")) as p:
            yield TlsProxy(p, tls_port, tmp / "ca.pem")


def curl(*args: str) -> tuple[str, str, bytes]:
    """Run curl; (HTTP version, status, body)."""
    out = subprocess.run(["curl", "-sS", "--max-time", "20", "-o", "-", "-w",
                          "\n%{http_version} %{http_code}", *args],
                         capture_output=True, check=True, timeout=30).stdout
    body, _, tail = out.rpartition(b"\n")
    version, status = tail.decode().split()
    return version, status, body


def tls_args(p: TlsProxy) -> list[str]:
    return ["--cacert", str(p.ca_file),
            "--resolve", f"app.test:{p.tls_port}:127.0.0.1"]


def test_curl_over_tls_negotiates_h2(proxy: TlsProxy) -> None:
    version, status, body = curl("--http2", *tls_args(proxy), "-D", "/dev/stderr",
                                 f"https://app.test:{proxy.tls_port}/echo?q=1")
    assert (version, status) == ("2", "200")
    seen = json.loads(body)
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert headers["host"] == f"app.test:{proxy.tls_port}"
    assert headers["x-forwarded-proto"] == "https"
    assert seen["raw_path"] == "/echo?q=1"
    wait_for(lambda: any(e.get("protocol") == "HTTP/2" and e.get("route") == "app"
                         and e.get("status") == 200 for e in proxy.p.events("access")),
             what="an access log line with protocol HTTP/2")


def test_curl_http11_on_the_same_tls_listener(proxy: TlsProxy) -> None:
    version, status, _ = curl("--http1.1", *tls_args(proxy),
                              f"https://app.test:{proxy.tls_port}/echo")
    assert (version, status) == ("1.1", "200")


def test_h2c_prior_knowledge_with_a_body_and_the_path_rules(proxy: TlsProxy,
                                                            tmp_path: Path) -> None:
    upload = tmp_path / "body.bin"
    upload.write_bytes(b"z" * (3 * 1024 * 1024))  # many windows' worth
    version, status, body = curl("--http2-prior-knowledge", "--data-binary", f"@{upload}",
                                 proxy.url("/api/upload"))
    assert (version, status) == ("2", "200")
    assert json.loads(body)["received"] == 3 * 1024 * 1024
    version, status, body = curl("--http2-prior-knowledge", "--path-as-is",
                                 proxy.url("/api/%2Fadmin"))
    assert (version, status) == ("2", "400")
    assert json.loads(body)["error"]["code"] == "bad_path"
    version, status, body = curl("--http2-prior-knowledge", proxy.url("/nowhere"))
    assert (version, status) == ("2", "404")
    assert json.loads(body)["error"]["code"] == "no_route"
    # HTTP/1.1 still works on the plain listener with h2c on.
    assert requests.get(proxy.url("/api/echo"), timeout=5).status_code == 200


def test_response_header_rules_and_large_bodies_over_h2(proxy: TlsProxy) -> None:
    out = subprocess.run(["curl", "-sS", "--http2", *tls_args(proxy), "-D", "-", "-o",
                          "/dev/null", f"https://app.test:{proxy.tls_port}/stream?bytes=4000000"],
                         capture_output=True, check=True, timeout=30).stdout.decode()
    assert out.startswith("HTTP/2 200")
    assert re.search(r"(?im)^x-route: app\r?$", out)
    assert re.search(r"(?im)^content-length: 4000000\r?$", out)


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) missing")
@pytest.mark.parametrize("tls", [True, False])
def test_h2load_many_multiplexed_streams(proxy: TlsProxy, tls: bool) -> None:
    url = (f"https://127.0.0.1:{proxy.tls_port}/api/echo" if tls
           else proxy.url("/api/echo"))
    out = subprocess.run(["h2load", "-n", "400", "-c", "4", "-m", "20", url],
                         capture_output=True, check=True, timeout=60, text=True).stdout
    assert "Application protocol: h2" in out or "h2c" in out, out
    assert re.search(r"requests: 400 total, 400 started, 400 done, 400 succeeded", out), out
    assert re.search(r"status codes: 400 2xx", out), out


def test_websocket_on_the_tls_listener(proxy: TlsProxy) -> None:
    async def run() -> str:
        ctx = ssl.create_default_context(cafile=str(proxy.ca_file))
        port = proxy.tls_port
        connector = aiohttp.TCPConnector(resolver=_Fixed(port))
        async with aiohttp.ClientSession(connector=connector) as s, s.ws_connect(
                f"wss://app.test:{port}/ws", ssl=ctx) as ws:
            await ws.send_str("ping")
            msg = await ws.receive(timeout=10)
            return str(msg.data)

    assert "ping" in asyncio.run(run())


class _Fixed(aiohttp.abc.AbstractResolver):
    """Resolves every name to 127.0.0.1 (SNI and Host stay app.test)."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def resolve(self, host: str, port: int = 0, family: int = 0) -> list:  # type: ignore[override]
        import socket
        return [{"hostname": host, "host": "127.0.0.1", "port": port, "family": socket.AF_INET,
                 "proto": 0, "flags": 0}]

    async def close(self) -> None:
        return None
