"""whoami: a tiny HTTP service that answers with the name of the container it runs in.

Put several replicas behind edgeproxy and the name changes from request to request, so
load balancing is visible::

    $ curl -s localhost:8080/hello
    {"container": "edgeproxy-hello-1", "hostname": "0f6bed0723a8", "method": "GET", "path": "/", ...}

``GET /healthz`` answers ``ok`` (for a HEALTHCHECK); every other path answers JSON with the
container's name, the request line and the headers that arrived (among them the proxy's
``X-Forwarded-*`` and ``X-Request-ID``).  ``?wait=2.5`` answers 2.5 s later (at most 60).

The container name is found by a reverse DNS lookup of the container's own address, which
Docker's embedded DNS answers on user-defined networks (Compose's); elsewhere it falls back
to the hostname.  ``WHOAMI_NAME`` overrides it; ``PORT`` (default 8000) is the port.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct

from aiohttp import web

NAME = web.AppKey("name", str)
"""Where the application keeps the container name."""


def _read_name(message: bytes, offset: int) -> tuple[str, int]:
    """Decode a DNS name at `offset` (following compression pointers); the name and the next offset."""
    labels: list[str] = []
    end = None
    while True:
        length = message[offset]
        if length >= 0xC0:  # pointer to a name earlier in the message
            end = offset + 2 if end is None else end
            offset = struct.unpack_from("!H", message, offset)[0] & 0x3FFF
        elif length == 0:
            return ".".join(labels), (offset + 1 if end is None else end)
        else:
            labels.append(message[offset + 1:offset + 1 + length].decode())
            offset += 1 + length


def reverse_dns(address: str, timeout: float = 1.0) -> str | None:
    """The PTR name of an IPv4 address, asked of the nameserver in /etc/resolv.conf.

    Asked directly because the C library would answer from /etc/hosts, where Docker lists
    only the hostname.  Docker's embedded DNS answers "<container>.<network>".
    """
    with open("/etc/resolv.conf") as f:
        servers = [line.split()[1] for line in f if line.startswith("nameserver")]
    if not servers:
        return None
    qname = ".".join(reversed(address.split("."))) + ".in-addr.arpa"
    question = b"".join(bytes([len(p)]) + p.encode() for p in qname.split(".")) + b"\0"
    query = struct.pack("!6H", 0x5EED, 0x0100, 1, 0, 0, 0) + question + struct.pack("!2H", 12, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(query, (servers[0], 53))
        reply = s.recv(512)
    if struct.unpack_from("!H", reply, 6)[0] == 0:  # no answer
        return None
    _, offset = _read_name(reply, 12)
    _, offset = _read_name(reply, offset + 4)  # the answer's owner name, after qtype/qclass
    return _read_name(reply, offset + 10)[0]  # after type, class, ttl, rdlength: the PTR name


def container_name() -> str:
    """This container's name as Docker's DNS knows it, else the hostname."""
    if os.environ.get("WHOAMI_NAME"):
        return os.environ["WHOAMI_NAME"]
    hostname = socket.gethostname()
    try:
        name = reverse_dns(socket.gethostbyname(hostname))
    except (OSError, IndexError, struct.error, UnicodeDecodeError):
        name = None
    # Compose never puts a dot in a container name; what follows it is the network.
    return name.split(".", 1)[0] if name else hostname


async def healthz(_: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def whoami(request: web.Request) -> web.Response:
    if "wait" in request.query:  # ?wait=SECONDS: a slow request, e.g. to watch the proxy drain
        try:
            seconds = min(max(float(request.query["wait"]), 0.0), 60.0)
        except ValueError:
            raise web.HTTPBadRequest(text="wait: expected seconds, e.g. wait=2.5\n") from None
        print(f"waiting {seconds}s before answering {request.path_qs}", flush=True)
        await asyncio.sleep(seconds)
    body = {
        "container": request.app[NAME],
        "hostname": socket.gethostname(),
        "method": request.method,
        "path": request.path_qs,
        "headers": dict(request.headers),
    }
    return web.Response(text=json.dumps(body) + "\n", content_type="application/json")


def make_app() -> web.Application:
    """The whoami application; the name is looked up once, at start."""
    app = web.Application()
    app[NAME] = container_name()
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/{tail:.*}", whoami)
    return app


if __name__ == "__main__":
    # run_app stops on SIGTERM, so `docker stop` is quick.
    web.run_app(make_app(), host="0.0.0.0", port=int(os.environ.get("PORT", "8000")),
                access_log=None, print=None)
