"""Upload sink for bench/run.py: reads each request body to its end, then answers with its size.

nginx's `return 200` answers before it has read a large body (and discards the rest
afterwards), so an upload through a proxy would "finish" early. This sink answers only once
the last byte has arrived, so the measured time covers the whole upload.

Run: python bench/sink.py PORT
"""

from __future__ import annotations

import asyncio
import signal
import sys

from aiohttp import web


async def handle(request: web.BaseRequest) -> web.Response:
    """Count the body's bytes without keeping them; answer with the count."""
    total = 0
    while True:
        chunk = await request.content.readany()
        if not chunk:
            break
        total += len(chunk)
    return web.Response(text=str(total))


async def serve(port: int) -> None:
    """Listen on 127.0.0.1:port until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.ServerRunner(web.Server(handle, access_log=None), handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
