"""JSON views of routes, replicas and routing decisions: what /routes, /containers, /explain and
the dashboard show, in one place so the admin API and the dashboard cannot drift apart."""

from __future__ import annotations

from typing import Any

from edgeproxy.routes.model import Route, Upstream
from edgeproxy.routes.table import Decision
from edgeproxy.telemetry.dataview import BalancerView


def upstream_json(u: Upstream, balancer: BalancerView | None = None) -> dict[str, Any]:
    """One replica as shown by /routes."""
    state: str = u.state
    reason = u.reason or None
    ejected = balancer.ejected_for(u) if balancer is not None and u.eligible else None
    if ejected is not None:
        state, reason = "ejected", f"connection failures; back in rotation in {ejected}s"
    return {
        "name": u.name,
        "container_id": u.container_id[:12] if u.container_id else None,
        "address": u.address if u.host else None,
        "url": f"{u.scheme}://{u.address}" if u.host else None,
        "scheme": u.scheme,  # how the proxy speaks to it: http, https, h2c (gRPC), h2
        "state": state,
        "eligible": u.eligible and ejected is None,
        "reason": reason,
        "weight": u.weight,
        "ejected_for_s": ejected,
        "in_flight": balancer.inflight.get(u.key, 0) if balancer is not None else None,
    }


def policies_json(r: Route) -> dict[str, Any]:
    """A route's policies as shown by /routes and /explain."""
    out: dict[str, Any] = {}
    ip = r.spec.ip
    if ip is not None:  # checked first, then auth, then the rate limit
        out["ip"] = {"allow": [str(n) for n in ip.allow], "deny": [str(n) for n in ip.deny]}
    auth = r.spec.auth
    if auth is not None and auth.basic is not None:
        b = auth.basic
        # Never the hashes: user names and where they come from are enough to debug.
        out["auth"] = {"type": "basic", "users": [u for u, _ in b.users],
                       "users_file": b.users_file, "realm": b.realm or r.name,
                       "keep_authorization": b.keep_authorization}
    elif auth is not None and auth.forward is not None:
        f = auth.forward
        out["auth"] = {"type": "forward", "url": f.url,
                       "response_headers": list(f.response_headers),
                       "request_headers": None if f.request_headers is None
                       else list(f.request_headers), "timeout_s": f.timeout}
    elif auth is not None:
        out["auth"] = {"type": "jwt", "scopes": list(auth.scopes), "audience": auth.audience}
    if r.spec.tls is not None:
        out["tls"] = {"certificates": r.spec.tls, "redirect": r.spec.tls_redirect,
                      "hsts_max_age": r.spec.hsts}
    rl = r.spec.ratelimit
    if rl is not None:
        out["ratelimit"] = {"limit": rl.limit, "period_s": rl.period, "burst": rl.burst,
                            "key": rl.key}
    return out


def access_checks(r: Route) -> list[str]:
    """The checks a request to this route passes, in the order the proxy runs them."""
    spec = r.spec
    out = []
    if spec.ip is not None:
        out.append("ip")
    if spec.auth is not None:
        out.append("auth:" + spec.auth.kind)
    if spec.ratelimit is not None:
        out.append("ratelimit")
    return out


def transforms_json(r: Route) -> dict[str, Any]:
    """What a route changes on the way through, as shown by /routes."""
    spec = r.spec
    out: dict[str, Any] = {}
    for name, rules in (("request_headers", spec.request_headers),
                        ("response_headers", spec.response_headers)):
        if rules:
            out[name] = {"set": dict(rules.set), "remove": list(rules.remove)}
    if spec.rewrite is not None:
        out["rewrite"] = {"pattern": spec.rewrite.pattern.pattern,
                          "replacement": spec.rewrite.replacement}
    if spec.add_prefix:
        out["add_prefix"] = spec.add_prefix
    if spec.cors is not None:
        c = spec.cors
        out["cors"] = {"origins": sorted(c.origins) if c.origins is not None else "*",
                       "methods": list(c.methods), "headers": list(c.headers),
                       "credentials": c.credentials, "max_age": c.max_age,
                       "expose": list(c.expose)}
    if spec.compress:
        out["compress"] = "gzip"
    if spec.scheme != "http":
        out["upstream_scheme"] = spec.scheme
        out["tls"] = {"verify": spec.tls_verify, "ca": spec.tls_ca,
                      "server_name": spec.tls_server_name}
    if spec.max_body is not None:
        out["max_body"] = spec.max_body
    return out


def route_json(r: Route, balancer: BalancerView | None = None) -> dict[str, Any]:
    """One route as shown by /routes."""
    spec = r.spec
    health = spec.health
    return {
        "name": r.name,
        "source": r.source,
        "hosts": list(spec.hosts),
        "paths": list(spec.paths),
        "strip_prefix": spec.strip_prefix,
        "lb": spec.lb,
        "retries": spec.retries,
        "timeouts": {"connect_s": spec.connect_timeout, "read_s": spec.read_timeout},
        "health_check": None if health is None else {
            "path": health.path, "interval_s": health.interval, "timeout_s": health.timeout,
            "status": f"{health.status_min}-{health.status_max}", "fails": health.fails,
            "passes": health.passes,
        },
        "policies": policies_json(r),
        "transforms": transforms_json(r),
        "replicas": [upstream_json(u, balancer) for u in r.upstreams],
        "healthy": sum(1 for u in r.pool if balancer is None or not balancer.is_ejected(u)),
    }


def decision_json(d: Decision) -> dict[str, Any]:
    """One container's routing decision as shown by /containers."""
    return {
        "container": d.container,
        "routed": d.routed,
        "route": d.route,
        "reason": d.reason,
        "errors": [{"label": e.label, "value": e.value, "reason": e.reason} for e in d.errors],
    }
