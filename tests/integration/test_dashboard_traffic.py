"""The dashboard in headless Chromium with routes-file routes only (no Docker): a route refusing
almost everything with 401/429 shows its 4xx share, not "0 % errors"; 5xx are apart; the
sparklines of rate, p99 and errors are drawn as inline SVG; recent changes say what changed."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
from helpers import ProxyProcess, free_port, run_backend, run_proxy, write_routes
from test_dashboard import NO_VALUE, chromium, require_chromium, until

STATS_JS = """JSON.stringify(Object.fromEntries(
  [...document.querySelectorAll('#routes [data-route]')].map((card) => [card.dataset.route, {
    stats: Object.fromEntries([...card.querySelectorAll('[data-stat]')].map((s) =>
      [s.dataset.stat, s.querySelector('b').textContent + ' ' + s.querySelector('span').textContent])),
    sparks: Object.fromEntries([...card.querySelectorAll('[data-spark]')].map((s) =>
      [s.dataset.spark, {points: Number(s.dataset.points),
                         label: s.querySelector('svg').getAttribute('aria-label'),
                         lines: [...s.querySelectorAll('polyline')].map((l) => l.getAttribute('points'))}])),
  }])))"""

ADDRESSES_JS = """JSON.stringify(Object.fromEntries(
  [...document.querySelectorAll('#routes [data-route]')].map((card) => [card.dataset.route,
    [...card.querySelectorAll('tr[data-replica] td:nth-child(2)')].map((td) => td.textContent)])))"""


def test_4xx_5xx_p99_and_sparklines(tmp_path: Path) -> None:
    require_chromium()
    with run_backend() as backend:
        routes = write_routes(tmp_path / "routes.toml", {
            "login": {"path": "/login", "strip_prefix": True, "upstreams": [backend]},
            "orders": {"path": "/orders", "strip_prefix": True, "upstreams": [backend]},
            "dead": {"path": "/dead", "upstreams": [f"http://127.0.0.1:{free_port()}"]},
            "grpc": {"path": "/grpc.Svc", "upstreams": [f"h2c://127.0.0.1:{free_port()}"]},
        })
        with run_proxy(tmp_path, docker="false", routes_file=str(routes)) as proxy:
            asyncio.run(_watch(proxy, tmp_path))


async def _watch(proxy: ProxyProcess, tmp: Path) -> None:
    async with chromium(tmp) as page, aiohttp.ClientSession() as http:
        await page.send("Page.navigate", url=proxy.admin_base + "/")
        await until(lambda: page.evaluate(
            "document.getElementById('conn')?.dataset.state === 'live'"
            " && !!document.querySelector('#routes [data-route=login]')"), 10, "the page")

        async def get(path: str) -> int:
            async with http.get(proxy.url(path)) as r:
                await r.read()
                return r.status

        stop = asyncio.Event()

        async def traffic() -> None:
            # login: 1 in 10 succeeds, the rest are 401 and 429; orders: all 200; dead: 5xx.
            n = 0
            while not stop.is_set():
                n += 1
                await get("/login/" if n % 10 == 0 else
                          "/login/status/401" if n % 2 else "/login/status/429")
                await get("/orders/x")
                if n % 3 == 0:
                    await get("/dead")
                await asyncio.sleep(0.01)

        sender = asyncio.create_task(traffic())
        try:
            async def shown() -> dict[str, Any] | None:
                cards = json.loads(await page.evaluate(STATS_JS))
                login, orders, dead = cards["login"], cards["orders"], cards["dead"]
                sparks = login["sparks"]
                ok = (login["stats"]["pct_4xx"] not in (f"{NO_VALUE} 4xx", "0% 4xx")
                      and login["stats"]["pct_5xx"] == "0% 5xx"
                      and login["stats"]["p99"].endswith("ms p99")
                      and orders["stats"]["pct_4xx"] == "0% 4xx"
                      and dead["stats"]["pct_5xx"] == "100% 5xx"
                      and set(sparks) == {"rps", "p99", "errors"}
                      and all(s["points"] >= 2 for s in sparks.values()))
                return cards if ok else None

            cards = await until(shown, 25, "4xx/5xx shares, p99 and sparklines")
        finally:
            stop.set()
            await sender
        login = cards["login"]
        share = float(login["stats"]["pct_4xx"].split("%")[0])
        assert 80 <= share <= 95, login  # nine in ten refused: the page must say so
        # The error sparkline has the 4xx and 5xx lines, and says its peak.
        assert len(login["sparks"]["errors"]["lines"]) == 2
        assert "peak" in login["sparks"]["errors"]["label"]
        header = await page.evaluate("document.querySelector('header.top').innerText")
        assert "4xx" in header and "5xx" in header
        what = await page.evaluate(
            "document.querySelector('#changes li[data-event=route_added][data-route=login]')"
            ".innerText")
        assert "replica http://127.0.0.1:" in what and "(running)" in what, what
        # A replica's scheme shows before its address unless it is plain http (#19).
        addresses = json.loads(await page.evaluate(ADDRESSES_JS))
        assert addresses["grpc"][0].startswith("h2c://127.0.0.1:"), addresses
        assert addresses["orders"][0].startswith("127.0.0.1:"), addresses
        await page.screenshot(tmp / "dashboard-traffic.png")
        assert page.errors == []
