"""Admin listener: /healthz, /routes and /containers as JSON, apart from proxied traffic."""

from __future__ import annotations

import contextlib
import ipaddress
import time
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict
from yarl import URL

from edgeproxy import __version__
from edgeproxy.control.providers.docker import DiscoveryStatus
from edgeproxy.control.watcher import Watcher
from edgeproxy.core.headers import request_host
from edgeproxy.core.hosts import HostError, parse_host
from edgeproxy.core.logs import get_logger
from edgeproxy.core.paths import PathError, normalize_path, split_target
from edgeproxy.core.settings import Address
from edgeproxy.ops.dashboard import add_dashboard
from edgeproxy.ops.views import access_checks, decision_json, route_json, upstream_json
from edgeproxy.proxy.decide import decide
from edgeproxy.proxy.errors import error_response
from edgeproxy.proxy.exchange import LocalAnswer, Refusal
from edgeproxy.telemetry.dataview import DataPlaneView, WorkerReports
from edgeproxy.telemetry.metrics import CONTENT_TYPE, render

_WILDCARD = frozenset(("0.0.0.0", "::", ""))
_LOOPBACK_NAMES = frozenset(("localhost", "127.0.0.1", "::1"))


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def admin_host_allowed(host: str | None, listen: Address,
                       extra: tuple[tuple[str, int | None], ...] = ()) -> bool:
    """Whether the admin listener answers a request with this Host value (DNS rebinding guard).

    A page on another site can make the operator's browser reach the admin listener only under
    its own name (DNS rebinding), never under a loopback name or an IP literal, so those are
    what is let in, as Caddy's admin API does with its `origins`:
    - no Host at all (HTTP/1.0: browsers always send one);
    - a name listed in EDGEPROXY_ADMIN_HOSTS (an entry without a port matches any port);
    - the listener's own host:port, and for a loopback listener localhost, 127.0.0.1 and [::1]
      with its port (without a port when it is 80);
    - for a wildcard listener (0.0.0.0, ::; inside a container, where the published port is
      unknown) localhost and any IP literal, with any port."""
    if host is None:
        return True
    try:
        name, port = parse_host(host)
    except HostError:
        return False
    if any(n == name and (p is None or p == port) for n, p in extra):
        return True
    own = listen.host.lower()
    if own in _WILDCARD:
        return name == "localhost" or _is_ip(name)
    if port != listen.port and not (port is None and listen.port == 80):
        return False
    if _is_ip(own):
        own = ipaddress.ip_address(own).compressed
    return name == own or (_is_loopback(own) and name in _LOOPBACK_NAMES)


def _docker_state(watcher: Watcher) -> str:
    if not watcher.settings.docker:
        return "disabled"
    return {True: "connected", False: "disconnected", None: "connecting"}[watcher.docker_connected]


def make_admin_app(watcher: Watcher, proxy: DataPlaneView,
                   workers: WorkerReports | None = None,
                   discovery: Callable[[], DiscoveryStatus | None] | None = None) -> web.Application:
    """The admin aiohttp application, on the process that holds the control plane: `watcher`
    for the table, Docker and change history; `proxy` for the data plane's side (the one
    worker's Proxy, or every worker's reports); `discovery` reads the Docker provider's
    status."""
    started = time.time()

    async def healthz(_: web.Request) -> web.Response:
        # Discovery on and failing: 503, so the image's HEALTHCHECK turns unhealthy.
        status = discovery() if discovery is not None and watcher.settings.docker else None
        failing = status is not None and status.state == "failing"
        doc: dict[str, Any] = {
            "status": "failing" if failing else "ok",
            "reason": f"Docker discovery fails: {status.error}" if failing and status else None,
            "discovery": status.as_json() if status is not None else None,
            "version": __version__,
            "uptime_s": round(time.time() - started, 1),
            "docker": _docker_state(watcher),
            "routes": len(watcher.table.routes),
            "in_flight": proxy.in_flight,
            "jwt": {"configured": proxy.verifier.problem is None,
                    "problem": proxy.verifier.problem, "jwks_error": proxy.verifier.jwks_error},
            "tls": proxy.tls_status(),
            "ratelimit": {"backend": watcher.settings.ratelimit_backend,
                          "healthy": proxy.limiter.healthy,
                          "last_error": proxy.limiter.last_error},
        }
        if workers is not None:
            doc["workers"] = workers.workers_json()
        return web.json_response(doc, status=503 if failing else 200)

    async def routes(_: web.Request) -> web.Response:
        table = watcher.table
        return web.json_response({
            "swaps": watcher.swaps,
            "last_swap": watcher.last_swap or None,
            "docker": _docker_state(watcher),
            "routes": [route_json(r, proxy.balancer) for r in table.routes],
            "conflicts": [{"container": c.container, "reason": c.reason}
                          for c in table.conflicts],
        })

    async def containers(_: web.Request) -> web.Response:
        return web.json_response({
            "containers": [decision_json(d) for d in watcher.table.decisions],
        })

    async def metrics(_: web.Request) -> web.Response:
        body = render(proxy.metrics)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    settings = watcher.settings
    log = get_logger("admin")

    @web.middleware
    async def host_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.headers.get("Host")
        if not admin_host_allowed(host, settings.admin_listen, settings.admin_hosts):
            log.warning("admin_host_refused", host=host, path=request.path,
                        peer=request.remote)
            return error_response(
                403, "host_not_allowed",
                f"Host {host!r} is not an address of this admin listener "
                f"({settings.admin_listen}); add the name to EDGEPROXY_ADMIN_HOSTS to use it",
                uuid.uuid4().hex)
        return await handler(request)

    app = web.Application(middlewares=[host_guard])
    app.router.add_get("/metrics", metrics)
    add_dashboard(app, watcher, proxy)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/routes", routes)
    app.router.add_get("/containers", containers)
    app.router.add_get("/explain", lambda request: explain(request, watcher, proxy))
    return app


async def explain(request: web.Request, watcher: Watcher, proxy: DataPlaneView) -> web.Response:
    """What the proxy would do with a request, without sending it anywhere: the same `decide`
    as the request pipeline, so the two cannot disagree."""
    url_text = request.query.get("url", "")
    method = request.query.get("method", "GET").upper()
    headers = CIMultiDict(
        (k.strip(), v.strip()) for k, _, v in
        (h.partition(":") for h in request.query.getall("header", [])) if k.strip()
    )
    try:
        url = URL(url_text, encoded=True)  # as given: yarl would resolve dot segments
    except ValueError:
        url = URL()
    if not url.is_absolute() or url.scheme not in ("http", "https"):
        return web.json_response({"error": f"url={url_text!r}: expected an absolute http(s) URL "
                                  "such as http://api.example.com/orders/7"}, status=400)
    if "Host" not in headers:
        headers["Host"] = url.raw_authority
    target = url.raw_path_qs
    out: dict[str, Any] = {"method": method, "url": url_text, "host": request_host(headers)}
    with contextlib.suppress(PathError):
        out["path"] = normalize_path(split_target(target)[0])
    table = watcher.table
    decision = decide(table, method, target, headers, url.scheme == "https", proxy.edge)
    if isinstance(decision, Refusal):
        if decision.code == "no_route":
            out.update(status=404, decision="no route matches this host and path",
                       routes_considered=len(table.routes))
        else:
            out.update(status=decision.status, decision=f"refused: {decision.message}")
        return web.json_response(out)
    if isinstance(decision, LocalAnswer):
        what = {308: "redirected to https", 204: "CORS preflight answered by the proxy",
                200: "answered by the proxy (ACME challenge)"}.get(decision.status, "answered")
        out.update(status=decision.status, decision=what,
                   location=decision.headers.get("Location"))
        return web.json_response(out)
    route = decision.route
    candidates = [u for u in route.pool if not proxy.balancer.is_ejected(u)]
    out.update(
        route=route_json(route, proxy.balancer),
        matched_prefix=decision.prefix,
        forwarded_path=decision.target,
        replica=upstream_json(candidates[0], proxy.balancer) if candidates else None,
        checks=access_checks(route),
    )
    if not route.pool:
        out.update(status=503, decision="route has no healthy replica: 503 with Retry-After")
    else:
        out.update(status=None, decision="forwarded to one of the eligible replicas "
                   f"({route.spec.lb}, {len(candidates)} of {len(route.upstreams)} eligible)")
    return web.json_response(out)
