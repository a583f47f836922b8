"""A test backend (aiohttp): echoes what it received, streams, sleeps, speaks WebSocket.

Run: python tests/backend.py PORT [NAME]
"""

from __future__ import annotations

import asyncio
import gzip
import json
import sys

from aiohttp import web
from aiohttp.typedefs import Handler


def make_app(name: str) -> web.Application:
    """Echo app used by the proxy tests."""
    # Every request received (method and raw target), so a test can tell what got through.
    seen: list[str] = []

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in ("/__seen", "/ready"):
            seen.append(f"{request.method} {request.raw_path}")
        return await handler(request)

    async def seen_list(_: web.Request) -> web.Response:
        return web.json_response({"seen": seen})

    async def gzipped(_: web.Request) -> web.Response:
        body = gzip.compress(json.dumps({"name": name, "compressed": True}).encode(), mtime=0)
        return web.Response(body=body, headers={"Content-Encoding": "gzip",
                                                "Content-Type": "application/json"})

    async def hop(_: web.Request) -> web.Response:
        # Hop-by-hop headers, one named in Connection, and a repeated end-to-end header.
        resp = web.Response(text="hop", headers={
            "Connection": "keep-alive, X-Hop-Secret", "X-Hop-Secret": "s", "Keep-Alive": "timeout=5",
            "Proxy-Authenticate": "Basic", "Trailer": "X-T", "Upgrade": "h2c", "X-End": "e"})
        resp.headers.add("Set-Cookie", "a=1")
        resp.headers.add("Set-Cookie", "b=2")
        return resp

    async def echo(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        payload = {
            "name": name,
            "method": request.method,
            "raw_path": request.raw_path,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_len": len(body),
        }
        return web.json_response(payload, headers={"X-Backend": name})

    async def upload(request: web.Request) -> web.Response:
        # ?hold=S: read nothing for S seconds first, as a busy backend would.
        await asyncio.sleep(float(request.query.get("hold", "0")))
        total = 0
        async for chunk in request.content.iter_any():
            total += len(chunk)
        return web.json_response({"received": total, "name": name})

    async def stream(request: web.Request) -> web.StreamResponse:
        size = int(request.query.get("bytes", "1048576"))
        chunked = request.query.get("chunked") == "1"
        resp = web.StreamResponse()
        resp.content_type = "application/octet-stream"
        if not chunked:
            resp.content_length = size
        await resp.prepare(request)
        block = b"x" * 65536
        left = size if request.method != "HEAD" else 0  # aiohttp would send it anyway
        while left > 0:
            piece = block[: min(left, len(block))]
            await resp.write(piece)
            left -= len(piece)
        await resp.write_eof()
        return resp

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("s", "1")))
        return web.Response(text=f"slept {name}")

    async def respond(request: web.Request) -> web.Response:
        # ?h=Name:Value (repeatable) sets response headers; ?body= sets the body.
        resp = web.Response(text=request.query.get("body", "ok"))
        for item in request.query.getall("h", []):
            key, _, value = item.partition(":")
            resp.headers.add(key, value)
        return resp

    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="status")

    async def cut(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = 1000
        await resp.prepare(request)
        await resp.write(b"y" * 100)
        assert request.transport is not None
        request.transport.abort()
        return resp

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse(protocols=("chat", "other"))
        await sock.prepare(request)
        async for msg in sock:
            if msg.type == web.WSMsgType.TEXT and msg.data == "close-me":
                await sock.close(code=4001, message=b"bye")
            elif msg.type == web.WSMsgType.TEXT:
                await sock.send_str(f"{name}:{msg.data}")
            elif msg.type == web.WSMsgType.BINARY:
                await sock.send_bytes(msg.data[::-1])
        seen.append(f"ws-closed {sock.close_code}")
        return sock

    app = web.Application(client_max_size=1024**3, middlewares=[record])
    app.router.add_get("/__seen", seen_list)
    app.router.add_get("/gzip", gzipped)
    app.router.add_get("/hop", hop)
    app.router.add_route("*", "/upload", upload)
    app.router.add_get("/stream", stream)
    app.router.add_get("/slow", slow)
    app.router.add_get("/status/{code}", status)
    app.router.add_get("/respond", respond)
    app.router.add_get("/cut", cut)
    app.router.add_get("/ws", ws)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


if __name__ == "__main__":
    port = int(sys.argv[1])
    name = sys.argv[2] if len(sys.argv) > 2 else f"backend-{port}"
    print(json.dumps({"listening": port}), flush=True)
    web.run_app(make_app(name), host="127.0.0.1", port=port, print=None, access_log=None)
