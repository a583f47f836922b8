"""The live dashboard in a real headless Chromium (Debian `chromium`, driven over the DevTools
protocol): a labelled container's route appears, its replica stops, the route goes, no reload."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import engine
import pytest
import requests
from docker_fixtures import run_container, unique
from helpers import ProxyProcess, free_port, run_proxy, wait_for, write_routes

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1280,900", "--remote-debugging-port=0",
)
NO_VALUE = "\u2013"  # what the page shows for a rate it cannot compute yet
T = TypeVar("T")

def require_chromium() -> None:
    """Fail, never skip: scripts/test.sh installs Debian's chromium."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: apt-get install chromium (scripts/test.sh does)",
                    pytrace=False)


async def until(check: Callable[[], Awaitable[T | None]], timeout: float, what: str) -> T:
    """Await `check` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        last = await check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        await asyncio.sleep(0.05)


class Page:
    """One browser tab over a DevTools websocket: commands, events and console errors."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.errors: list[str] = []
        self.navigations: list[str] = []

    async def read(self) -> None:
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
            else:
                self._event(data["method"], data.get("params", {}))
        for future in self._pending.values():
            future.set_exception(ConnectionError("DevTools connection closed"))

    def _event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            args = [a.get("value", a.get("description")) for a in params.get("args", [])]
            self.errors.append(f"console.{params['type']}: {args}")
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append("exception: " + details.get("exception", {}).get(
                "description", details.get("text", "")))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            entry = params["entry"]
            self.errors.append(f"log: {entry['text']} {entry.get('url', '')}")
        elif method == "Page.frameNavigated" and "parentId" not in params["frame"]:
            self.navigations.append(params["frame"]["url"])

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        await self._ws.send_str(json.dumps({"id": ident, "method": method, "params": params}))
        async with asyncio.timeout(10):
            reply = await future
        if "error" in reply:
            raise AssertionError(f"{method}: {reply['error']}")
        return reply["result"]  # type: ignore[no-any-return]

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def screenshot(self, path: Path) -> Path:
        shot = await self.send("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


@contextlib.asynccontextmanager
async def chromium(tmp: Path) -> AsyncIterator[Page]:
    """Start headless Chromium with a fresh profile; yield its first tab, then stop it."""
    profile = tmp / "chromium-profile"
    log = (tmp / "chromium.log").open("wb")
    proc = subprocess.Popen([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                             "about:blank"], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            start_new_session=True)  # its own group: renderers go with it
    try:
        port_file = profile / "DevToolsActivePort"

        async def devtools_port() -> int | None:
            if proc.poll() is not None:
                raise AssertionError(f"chromium exited with {proc.returncode}; see {log.name}")
            lines = port_file.read_text().splitlines() if port_file.exists() else []
            return int(lines[0]) if len(lines) >= 2 else None

        port = await until(devtools_port, 20, "chromium's DevToolsActivePort")
        async with aiohttp.ClientSession() as http:
            async def first_tab() -> str | None:
                async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                    tabs = [t for t in await r.json() if t["type"] == "page"]
                return tabs[0]["webSocketDebuggerUrl"] if tabs else None

            url = await until(first_tab, 10, "a chromium tab")
            async with http.ws_connect(url, max_msg_size=0) as ws:
                page = Page(ws)
                reader = asyncio.create_task(page.read())
                try:
                    for domain in ("Page", "Runtime", "Log"):
                        await page.send(f"{domain}.enable")
                    yield page
                finally:
                    reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await reader
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


# What the page shows, read from the DOM the way a person would: card text, badges, numbers.
CARDS_JS = """JSON.stringify(Object.fromEntries(
  [...document.querySelectorAll('#routes [data-route]')].map((card) => [card.dataset.route, {
    text: card.innerText,
    states: [...card.querySelectorAll('tr[data-replica]')].map((r) => r.dataset.state),
    badges: [...card.querySelectorAll('tr[data-replica] .badge')].map((b) => b.textContent),
    rps: card.querySelector('[data-stat=rps] b').textContent,
    c4xx: card.querySelector('[data-stat=pct_4xx] b').textContent,
    c5xx: card.querySelector('[data-stat=pct_5xx] b').textContent,
    p99: card.querySelector('[data-stat=p99] b').textContent,
    sparks: Object.fromEntries([...card.querySelectorAll('[data-spark]')].map((s) =>
      [s.dataset.spark, {points: Number(s.dataset.points),
                         lines: [...s.querySelectorAll('polyline')].map((l) => l.getAttribute('points'))}])),
  }])))"""


async def cards(page: Page, proxy: ProxyProcess) -> dict[str, dict[str, Any]]:
    # A proxy that died (or was killed from outside) would leave the page waiting forever.
    code = proxy.proc.poll()
    assert code is None, f"the proxy exited with {code}:\n{proxy.log_text()[-2000:]}"
    return json.loads(await page.evaluate(CARDS_JS))  # type: ignore[no-any-return]


# What aiohttp and asyncio log when a handler or a task goes wrong (streams ending included).
TROUBLE = ("Traceback", "Error handling request", "Task was destroyed", "never retrieved",
           " aiohttp.", " asyncio ")


def trouble(log: str) -> list[str]:
    return [line for line in log.splitlines() if any(t in line for t in TROUBLE)]


@pytest.fixture()
def proxy(docker_engine: None, tmp_path: Path) -> Iterator[ProxyProcess]:
    # A file route to a closed port gives the page a route whose every request is a 5xx.
    routes = write_routes(tmp_path / "routes.toml",
                          {"dead": {"path": "/dead", "upstreams": [f"http://127.0.0.1:{free_port()}"]}})
    with run_proxy(tmp_path, hold_period="0s", routes_file=str(routes)) as p:
        wait_for(lambda: p.admin("/healthz")["docker"] == "connected", 15, what="docker connected")
        yield p


def test_dashboard_follows_a_container_live(proxy: ProxyProcess, tmp_path: Path) -> None:
    require_chromium()
    asyncio.run(_follow_a_container(proxy, tmp_path))
    assert trouble(proxy.log_text()) == []


async def _follow_a_container(proxy: ProxyProcess, tmp: Path) -> None:
    name, bad = unique("dash-c"), unique("dash-bad")
    path = "/" + unique("dash")
    xss = '<img src=x onerror="window.__xss=1">'
    async with chromium(tmp) as page, aiohttp.ClientSession() as http:
        dashboard = proxy.admin_base + "/"
        await page.send("Page.navigate", url=dashboard)
        # Other containers on this engine may be routed too: look only at the routes made here.
        await until(lambda: page.evaluate(
            "document.getElementById('conn')?.dataset.state === 'live'"
            " && !!document.querySelector('#routes [data-route=dead]')"),
            10, "the page to go live with the file route")
        # Gone if the page ever reloads: everything below must happen over the open stream.
        await page.evaluate("window.__notReloaded = true")

        # A container whose label is markup: shown as text under "Skipped containers".
        await asyncio.to_thread(run_container, bad, {"gateway.port": xss})
        await asyncio.to_thread(run_container, name, {
            "gateway.path": path, "gateway.strip_prefix": "true", "gateway.ratelimit": "600/m"})

        async def route_running() -> dict[str, Any] | None:
            card = (await cards(page, proxy)).get(name)
            return card if card and path in card["text"] and card["states"] == ["running"] else None

        card = await until(route_running, 10, f"route {name} with {path} on the page")
        assert card["badges"] == ["running"]
        assert "strip prefix" in card["text"] and "rate limit 600/min" in card["text"], card

        # Traffic: the container's route answers 200s (once httpd listens), the dead one 5xx.
        async def answers(target: str) -> int:
            async with http.get(proxy.url(target)) as r:
                await r.read()
                return r.status

        async def serving() -> bool:
            return await answers(path + "/") == 200

        await until(serving, 10, f"{path}/ answering 200 through the proxy")
        # The container's route: 200s and, from the replica itself, 404s (4xx, not errors of
        # ours); the dead route: all 5xx. The page must tell them apart.
        for _ in range(5):
            assert await answers(path + "/") == 200
            assert await answers(path + "/missing") == 404
            assert await answers(path + "/missing2") == 404
            assert await answers("/dead") >= 500

        async def rates_shown() -> dict[str, dict[str, Any]] | None:
            now = await cards(page, proxy)
            live, dead = now.get(name), now.get("dead")
            ok = (live and live["rps"] not in (NO_VALUE, "0.0") and live["c4xx"] not in (NO_VALUE, "0%")
                  and live["c5xx"].endswith("%") and live["p99"].endswith("ms")
                  and dead and dead["rps"] not in (NO_VALUE, "0.0") and dead["c5xx"] == "100%"
                  and dead["c4xx"] == "0%")
            return now if ok else None

        shown = await until(rates_shown, 5, "req/s, 4xx %, 5xx % and p99 on the page")
        # Some 200s raced httpd's start at most; roughly two in three answers were 404s.
        assert 40 <= float(shown[name]["c4xx"].rstrip("%")) <= 70, shown[name]

        # Sparklines: drawn server-side points, one per 5 s; two points make a line.
        async def sparks_drawn() -> dict[str, Any] | None:
            for _ in range(3):  # keep some traffic flowing while the points accumulate
                await answers(path + "/missing")
                await answers("/dead")
            card = (await cards(page, proxy)).get(name)
            sparks = card["sparks"] if card else {}
            ok = (set(sparks) == {"rps", "p99", "errors"}
                  and all(s["points"] >= 2 for s in sparks.values())
                  and len(sparks["errors"]["lines"]) == 2 and all(sparks["errors"]["lines"]))
            return card if ok else None

        await until(sparks_drawn, 20, "sparklines of rate, p99 and errors")
        problems = await page.evaluate("document.getElementById('problems').innerText")
        assert bad in problems and xss in problems
        assert await page.evaluate("document.querySelector('img') === null && !window.__xss")
        await page.screenshot(tmp / "dashboard-live.png")
        # "Recent changes" says what changed, not only that something did.
        added = await page.evaluate(
            f"document.querySelector('#changes li[data-event=route_added][data-route={json.dumps(name)}]')"
            "?.innerText")
        assert added and f"replica {name}" in added, added

        await asyncio.to_thread(engine.docker, "stop", name)

        async def replica_stopped() -> dict[str, Any] | None:
            card = (await cards(page, proxy)).get(name)
            return card if card and card["states"] == ["stopped"] else None

        card = await until(replica_stopped, 10, f"{name}'s replica shown stopped")
        assert card["badges"] == ["stopped"]
        changed = await until(lambda: page.evaluate(
            f"document.querySelector('#changes li[data-event=route_changed][data-route={json.dumps(name)}]')"
            "?.innerText"), 5, "the change listed")
        assert re.search(rf"replica {name} \w+ -> (stopped|draining)", changed), changed
        await page.screenshot(tmp / "dashboard-stopped.png")

        await asyncio.to_thread(engine.docker, "rm", "-f", name, bad)

        async def route_gone() -> bool:
            return name not in await cards(page, proxy) and bool(await page.evaluate(
                f"!!document.querySelector('#changes li[data-event=route_removed]"
                f"[data-route={json.dumps(name)}]')"))

        await until(route_gone, 10, f"route {name} gone from the page and listed as removed")
        await page.screenshot(tmp / "dashboard-removed.png")

        assert await page.evaluate("window.__notReloaded === true"), "the page was reloaded"
        assert page.navigations == [dashboard], page.navigations
        assert await page.evaluate("document.getElementById('conn').dataset.state") == "live"
        assert page.errors == []

        # The proxy going away shows on the page rather than old numbers passing for live ones.
        proxy.proc.send_signal(signal.SIGTERM)
        await until(lambda: page.evaluate(
            "['reconnecting', 'offline'].includes(document.getElementById('conn').dataset.state)"),
            10, "the page showing that it lost the stream")
        await page.screenshot(tmp / "dashboard-disconnected.png")


def test_events_stream_headers_disconnect_and_shutdown(proxy: ProxyProcess) -> None:
    """A snapshot at once with the right headers; clients leaving and a shutdown end cleanly."""
    for _ in range(3):  # each client reads one snapshot and hangs up
        with requests.get(proxy.admin_base + "/events", stream=True, timeout=5) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            assert r.headers["Cache-Control"] == "no-cache"
            assert r.headers["X-Accel-Buffering"] == "no"
            first = next(line for line in r.iter_lines() if line.startswith(b"data: "))
            snap = json.loads(first[len(b"data: "):])
            dead = next(rt for rt in snap["routes"] if rt["name"] == "dead")
            assert dead["traffic"]["requests"] == 0 and dead["paths"] == ["/dead"]
    page = requests.get(proxy.admin_base + "/", timeout=5)
    assert page.headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]

    # A page still watching at shutdown: its stream ends properly (no cut chunk), and at once.
    with requests.get(proxy.admin_base + "/events", stream=True, timeout=5) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith(b"data: "))
        started = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        rest = list(lines)  # raises ChunkedEncodingError if the server cut the stream
        assert time.monotonic() - started < 3, rest
    assert proxy.proc.wait(10) == 0
    assert trouble(proxy.log_text()) == []

