"""ACME end to end against Pebble: issuance over HTTP-01, HTTPS with the issued certificate
verified against Pebble's root, reuse across a restart, renewal, failures with backoff, two
replicas sharing a state volume, and the plain-HTTP listener's redirect with the challenge path
exempt. The listeners are aiohttp servers wired the way server.py wires edgeproxy's."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import structlog
from aiohttp import web
from cryptography import x509
from helpers import free_port
from pebble_fixtures import Pebble

from edgeproxy.control.acme import CHALLENGE_PREFIX, AcmeManager, challenge_token
from edgeproxy.core.tls import CertInfo, CertStore, https_redirect_url

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def pebble(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pebble]:
    server = Pebble(tmp_path_factory.mktemp("pebble"))
    server.start()
    yield server
    server.stop()


@dataclass
class Edge:
    """The two listeners of a proxy replica: plain HTTP (challenges, redirects) and HTTPS."""

    pebble: Pebble
    https_port: int = field(default_factory=free_port)
    answerers: list[AcmeManager] = field(default_factory=list)

    async def plain(self, request: web.Request) -> web.StreamResponse:
        # What the lead's HTTP handler does first: the challenge path is never redirected.
        if request.path.startswith(CHALLENGE_PREFIX):
            token = challenge_token(request.path)
            for manager in self.answerers:
                answer = manager.challenge_response(token) if token else None
                if answer is not None:
                    return web.Response(text=answer, content_type="text/plain")
            return web.Response(status=404, text="no such challenge")
        location = https_redirect_url(request.host, request.raw_path, self.https_port)
        if location is None:
            return web.Response(status=400, text="bad Host")
        return web.Response(status=308, headers={"Location": location})

    async def secure(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text=f"{request.host} {request.scheme}")

    @asynccontextmanager
    async def serving(self, store: CertStore) -> AsyncIterator[None]:
        plain_app, secure_app = web.Application(), web.Application()
        plain_app.router.add_route("*", "/{tail:.*}", self.plain)
        secure_app.router.add_route("*", "/{tail:.*}", self.secure)
        runners = [web.AppRunner(plain_app, access_log=None),
                   web.AppRunner(secure_app, access_log=None)]
        for r in runners:
            await r.setup()
        try:
            await web.TCPSite(runners[0], "127.0.0.1", self.pebble.http_port).start()
            await web.TCPSite(runners[1], "127.0.0.1", self.https_port,
                              ssl_context=store.context()).start()
            yield
        finally:
            for r in runners:
                await r.cleanup()

    def client_ssl(self) -> ssl.SSLContext:
        return ssl.create_default_context(cadata=self.pebble.root_pem())

    async def get_https(self, host: str) -> tuple[str, int]:
        """GET / with SNI `host`, verified against Pebble's root: (body, leaf serial)."""
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", self.https_port, ssl=self.client_ssl(), server_hostname=host)
        try:
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            response = await reader.read()
        finally:
            writer.close()
        head, _, body = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        return body.decode(), x509.load_der_x509_certificate(der).serial_number


def manager(pebble: Pebble, state: Path, store: CertStore, **kw: float) -> AcmeManager:
    return AcmeManager(pebble.directory, "ops@example.test", state, store,
                       verify_ssl=str(pebble.ca_bundle), backoff_initial=kw.pop("backoff", 0.3),
                       **kw)  # type: ignore[arg-type]


async def until(check: Callable[[], object], timeout: float = 20.0, what: str = "condition",
                ) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


def test_issue_serve_restart_and_renew(pebble: Pebble, tmp_path: Path) -> None:
    state = tmp_path / "state"
    edge = Edge(pebble)

    orders_before = pebble.orders()

    async def first_run() -> int:
        store = CertStore()
        store.load()
        acme = manager(pebble, state, store)
        edge.answerers = [acme]
        async with edge.serving(store):
            started = time.monotonic()
            await acme.ensure({"app.test"})  # returns at once: the order runs in the background
            assert time.monotonic() - started < 1.0
            assert acme.status()[0]["state"] == "ordering"
            await until(lambda: store.lookup("app.test"), what="a certificate for app.test")
            body, serial = await edge.get_https("app.test")
            assert body == "app.test https"
            info = acme.certificate("app.test")
            assert isinstance(info, CertInfo) and info.serial == serial
            assert acme.orders == 1 and acme.issued == 1
            assert acme.status()[0]["state"] == "valid"
            await acme.ensure({"app.test"})  # idempotent: no second order
            await acme.close()
            assert acme.orders == 1
        return serial

    serial = asyncio.run(first_run())
    assert pebble.orders() == orders_before + 1
    assert serial in pebble.issued_serials()
    assert (state / "certs" / "app.test.crt").exists()
    assert (state / "certs" / "app.test.key").stat().st_mode & 0o777 == 0o600
    assert (state / "acme" / "account.key").stat().st_mode & 0o777 == 0o600
    assert (state / "acme" / "account.json").exists()
    assert list((state / "acme" / "challenges").iterdir()) == []  # cleaned up

    async def after_restart() -> None:
        store = CertStore()
        store.load()
        acme = manager(pebble, state, store)
        edge.answerers = [acme]
        async with edge.serving(store):
            await acme.ensure({"app.test"})
            # Served straight from the state directory, no order.
            assert store.lookup("app.test") is not None
            assert (await edge.get_https("app.test"))[1] == serial
            await acme.check_renewals()
            await asyncio.sleep(0.3)
            assert acme.orders == 0
            assert all(s["state"] == "valid" for s in acme.status())
            await acme.close()

    asyncio.run(after_restart())
    assert pebble.orders() == orders_before + 1  # the CA saw no new order

    async def renewal() -> None:
        store = CertStore()
        store.load()
        # Pebble issues 5-year certificates: a 10-year window makes the renewal due now.
        acme = manager(pebble, state, store, renew_before_days=3650, check_interval=0.1)
        edge.answerers = [acme]
        async with edge.serving(store):
            await acme.ensure({"app.test"})
            # The old certificate is served while the renewal runs.
            assert store.lookup("app.test").serial == serial  # type: ignore[union-attr]
            await until(lambda: store.lookup("app.test").serial != serial,  # type: ignore[union-attr]
                        what="the renewed certificate")
            assert acme.orders == 1
            body, renewed = await edge.get_https("app.test")
            assert renewed != serial and body == "app.test https"
            assert pebble.issued_serials()[-1] == renewed

            # The renewal loop: a renewed certificate found due again is renewed again.
            loop_task = asyncio.create_task(acme.run())
            await until(lambda: acme.orders >= 2, what="a renewal started by run()")
            await until(lambda: store.lookup("app.test").serial not in (  # type: ignore[union-attr]
                serial, renewed), what="the certificate renewed by run()")
            loop_task.cancel()
            await acme.close()

    asyncio.run(renewal())


def test_failed_order_is_retried_with_backoff_and_blocks_no_other_host(
        pebble: Pebble, tmp_path: Path) -> None:
    pebble.resolve("down.test", "127.0.0.2")  # nothing answers the challenge there
    edge = Edge(pebble)

    async def scenario() -> None:
        store = CertStore()
        store.load()
        acme = manager(pebble, tmp_path / "state", store, backoff=0.2)
        edge.answerers = [acme]
        with structlog.testing.capture_logs() as logs:
            async with edge.serving(store):
                await acme.ensure({"down.test", "ok.test", "*.wild.test", "10.0.0.1"})
                await acme.ensure({"down.test", "ok.test", "*.wild.test", "10.0.0.1"})  # no news
                await until(lambda: store.lookup("ok.test"), what="ok.test's certificate")
                await until(lambda: sum(e["event"] == "acme_order_failed" for e in logs) >= 2,
                            what="two failed attempts for down.test")
                assert (await edge.get_https("ok.test"))[0] == "ok.test https"
                assert [(s["host"], s["state"]) for s in acme.status()] == [
                    ("*.wild.test", "skipped"), ("10.0.0.1", "skipped"),
                    ("down.test", "retrying"), ("ok.test", "valid")]
                await acme.close()
        failed = [e for e in logs if e["event"] == "acme_order_failed"]
        assert {e["host"] for e in failed} == {"down.test"}
        assert failed[0]["attempt"] == 1 and failed[1]["attempt"] == 2
        assert 0 < failed[0]["retry_in_s"] < failed[1]["retry_in_s"]
        # The CA's own words: which check failed and why.
        assert "urn:ietf:params:acme:error:connection" in failed[0]["error"]
        assert "127.0.0.2" in failed[0]["error"]
        skipped = [e["host"] for e in logs if e["event"] == "acme_host_skipped"]
        assert sorted(skipped) == ["*.wild.test", "10.0.0.1"]  # once each, not per ensure()
        (down,) = [s for s in acme.status() if s["host"] == "down.test"]
        assert down["failures"] >= 2 and down["last_error"]

    asyncio.run(scenario())


def test_replicas_sharing_a_state_volume_order_once(pebble: Pebble, tmp_path: Path) -> None:
    state = tmp_path / "state"
    edge = Edge(pebble)

    async def scenario() -> None:
        stores = [CertStore(), CertStore()]
        replicas = [manager(pebble, state, s) for s in stores]
        # The challenge request reaches a third replica that orders nothing: it can only answer
        # from the tokens the ordering replica wrote to the shared state directory.
        bystander = manager(pebble, state, CertStore())
        edge.answerers = [bystander]
        async with edge.serving(stores[0]):
            await asyncio.gather(*(r.ensure({"shared.test"}) for r in replicas))
            await until(lambda: all(s.lookup("shared.test") for s in stores),
                        what="both replicas serving shared.test")
            assert sum(r.orders for r in replicas) == 1
            serials = {s.lookup("shared.test").serial for s in stores}  # type: ignore[union-attr]
            assert len(serials) == 1
            for r in (*replicas, bystander):
                await r.close()

    asyncio.run(scenario())


def test_plain_http_redirects_except_acme_challenges(pebble: Pebble, tmp_path: Path) -> None:
    edge = Edge(pebble)
    state = tmp_path / "state"
    (state / "acme" / "challenges").mkdir(parents=True)
    (state / "acme" / "challenges" / "tok-EN_1").write_text("tok-EN_1.thumbprint")

    async def scenario() -> None:
        store = CertStore()
        store.load()
        acme = manager(pebble, state, store)
        edge.answerers = [acme]
        base = f"http://127.0.0.1:{pebble.http_port}"
        async with edge.serving(store), aiohttp.ClientSession() as session:
            async with session.get(base + "/a/b?x=1", headers={"Host": "app.test:8080"},
                                   allow_redirects=False) as resp:
                assert resp.status == 308
                assert resp.headers["Location"] == f"https://app.test:{edge.https_port}/a/b?x=1"
            async with session.get(base + CHALLENGE_PREFIX + "tok-EN_1",
                                   allow_redirects=False) as resp:
                assert resp.status == 200 and await resp.text() == "tok-EN_1.thumbprint"
            for token in ("unknown", "..%2Facme%2Faccount.key", "a.b"):
                async with session.get(base + CHALLENGE_PREFIX + token,
                                       allow_redirects=False) as resp:
                    assert resp.status == 404, token
        assert acme.challenge_response("../account.key") is None
        await acme.close()

    asyncio.run(scenario())
