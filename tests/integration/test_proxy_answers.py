"""What every answer of the proxy carries: no Server header (versions) of ours; the replica's
Server passes through; access lines name the client even when no route matched."""

from __future__ import annotations

import socketserver
import threading
from collections.abc import Iterator

import pytest
import requests
from helpers import ProxyProcess, run_backend, run_proxy, wait_for, write_routes

ANSWERS = {  # a replica that sends no Server header, in both framings
    b"/bare/plain": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok",
    b"/bare/chunked": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                       b"Content-Type: text/plain\r\n\r\n2\r\nok\r\n0\r\n\r\n"),
}


class _Bare(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        while True:
            line = self.rfile.readline()
            if not line:
                return
            target = line.split()[1]
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            self.wfile.write(ANSWERS.get(target, b"HTTP/1.1 404 Not Found\r\n"
                                         b"Content-Length: 0\r\n\r\n"))


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    tmp = tmp_path_factory.mktemp("answers")
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Bare)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with run_backend("aio") as aio:
            routes = write_routes(tmp / "routes.toml", {
                "bare": {"path": "/bare",
                         "upstreams": [f"http://127.0.0.1:{server.server_address[1]}"]},
                "aio": {"path": "/aio", "strip_prefix": True, "upstreams": [aio]},
            })
            with run_proxy(tmp, docker="false", routes_file=str(routes)) as p:
                yield p
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("path", ["/bare/plain", "/bare/chunked"])
def test_no_server_header_of_ours_when_the_replica_sends_none(proxy: ProxyProcess,
                                                             path: str) -> None:
    r = requests.get(proxy.url(path), timeout=5)
    assert r.status_code == 200 and r.text == "ok", r.text
    assert "Server" not in r.headers, r.headers


@pytest.mark.parametrize("path", ["/aio/respond?h=Server:replica-1.0", "/aio/stream?bytes=10&chunked=1"])
def test_the_replicas_server_header_passes_through_once(proxy: ProxyProcess, path: str) -> None:
    r = requests.get(proxy.url(path), timeout=5)
    assert r.status_code == 200
    expected = "replica-1.0" if "replica" in path else None
    server = r.raw.headers.getlist("Server")
    assert len(server) == 1, r.headers  # the aiohttp replica's own, or the one it was told
    if expected:
        assert server == [expected]


@pytest.mark.parametrize(("path", "status"), [("/nowhere", 404), ("/bare/a%2Fb", 400)])
def test_the_proxys_own_answers_carry_no_server_and_log_the_client(
        proxy: ProxyProcess, path: str, status: int) -> None:
    r = requests.get(proxy.url(path), timeout=5)
    assert r.status_code == status, r.text
    assert "Server" not in r.headers, r.headers
    rid = r.headers["X-Request-ID"]
    [line] = wait_for(lambda: [e for e in proxy.events("access") if e["request_id"] == rid], 5,
                      what="the access line")
    assert line["status"] == status and line["client"] == "127.0.0.1", line


def test_admin_listener_is_not_affected(proxy: ProxyProcess) -> None:
    assert requests.get(proxy.admin_base + "/healthz", timeout=5).status_code == 200


def test_no_jwt_event_without_an_auth_route(proxy: ProxyProcess) -> None:
    # No route uses gateway.auth: that no JWT key is configured is nobody's problem.
    assert [e for e in proxy.events() if "jwt" in e["event"] and e["level"] != "debug"] == []
