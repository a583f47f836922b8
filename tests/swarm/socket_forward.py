"""The Swarm stage's stand-in for a socket proxy: TCP :2375 -> /var/run/docker.sock, unfiltered.

(No registry here for tecnativa/docker-socket-proxy.) It forwards bytes only; restarting its
service is how the tests break the proxy's API connection and event stream.
"""

import asyncio

SOCKET = "/var/run/docker.sock"


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
    try:
        docker_r, docker_w = await asyncio.open_unix_connection(SOCKET)
    except OSError:
        client_w.close()
        return
    await asyncio.gather(pipe(client_r, docker_w), pipe(docker_r, client_w))


async def main() -> None:
    server = await asyncio.start_server(handle, "0.0.0.0", 2375)
    async with server:
        await server.serve_forever()


asyncio.run(main())
