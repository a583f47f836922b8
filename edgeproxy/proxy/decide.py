"""The pure decision for one request: which route, or which answer the proxy gives itself.

`decide` is the first step of the request pipeline and the whole of `/explain`: both call it
with the same inputs, so what `/explain` reports is what the proxy does. No I/O, no event loop.
"""

from __future__ import annotations

from typing import NamedTuple

from edgeproxy.core.headers import Headers, host_name, request_host
from edgeproxy.core.hosts import host_problem
from edgeproxy.core.paths import (
    CHALLENGE_PREFIX,
    PathError,
    challenge_token,
    normalize_path,
    split_absolute,
    split_target,
    strip_prefix,
)
from edgeproxy.core.tls import Edge, hsts_value, https_redirect_url
from edgeproxy.proxy.exchange import LocalAnswer, Refusal
from edgeproxy.proxy.requestcheck import check_request
from edgeproxy.routes.model import Route, RouteSpec
from edgeproxy.routes.table import RouteTable


class Plan(NamedTuple):
    """A request to forward: the route, the path it matched on and the target the replica gets.

    `authority` is the absolute-form target's host[:port], which replaces Host (None: the
    client's Host stands). `extra_headers` are ours for every answer (HSTS, CORS).

    A NamedTuple: immutable like a frozen dataclass, without the frozen __init__'s setattr
    call per field on every request."""

    route: Route
    prefix: str
    host: str
    path: str
    target: str
    authority: str | None = None
    extra_headers: dict[str, str] | None = None
    origin_target: str = ""  # the matched (normalised) path and the query: forward auth's URI


Decision = Plan | Refusal | LocalAnswer


def decide(table: RouteTable, method: str, target: str, headers: Headers, secure: bool,
           edge: Edge) -> Decision:
    """Route the request, or answer it here (refusal, https redirect, CORS preflight, ACME)."""
    refusal = check_request(headers)  # Host syntax, a repeated Authorization
    if refusal is not None:
        return refusal
    asked = target
    authority: str | None = None
    if not asked.startswith("/"):
        try:
            absolute = split_absolute(asked)
        except PathError as exc:
            return Refusal(400, "bad_target", str(exc))
        if absolute is not None:  # http://host/path: its host replaces the Host header
            authority, asked = absolute
            problem = host_problem(authority)
            if problem is not None:
                return Refusal(400, "bad_target", "request target: " + problem)
    raw_path, query = split_target(asked)
    challenge = edge.challenge is not None and raw_path.startswith(CHALLENGE_PREFIX)
    if challenge and edge.challenge is not None:
        token = challenge_token(raw_path)
        answer = edge.challenge(token) if token else None
        if answer is not None:
            return LocalAnswer(200, body=answer.encode(), content_type="text/plain",
                               route="acme-challenge")
    try:
        path = normalize_path(raw_path)
    except PathError as exc:
        return Refusal(400, "bad_path", str(exc))
    # Exempt from https redirects only what really is a challenge path once normalised
    # (/.well-known/acme-challenge/../../admin is not).
    challenge = challenge and path.startswith(CHALLENGE_PREFIX)
    host = request_host(headers) if authority is None else host_name(authority)
    found = table.match(host, path)
    if ";" in path and semicolon_confusion(table, host, path, found):
        # Java backends drop ';params' from segments: /api;x/admin is /api/admin to them.
        return Refusal(400, "bad_path", "';' in this path would reach another or a protected "
                       "route on some backends")
    if found is None:
        return Refusal(404, "no_route", f"no route matches host {host!r} and path {path!r}")
    route, prefix = found
    spec = route.spec
    extra: dict[str, str] | None = None
    if spec.tls is not None:
        if not secure and spec.tls_redirect and not challenge and (
                edge.covers is not None and edge.covers(host)):
            location = https_redirect_url(
                (headers.get("Host") or "") if authority is None else authority, asked,
                edge.redirect_port)
            if location is None:
                return Refusal(400, "bad_host", "the Host header cannot be redirected to "
                               "https", route=route.name)
            return LocalAnswer(308, {"Location": location}, route=route.name)
        if secure and spec.hsts is not None:
            extra = {"Strict-Transport-Security": hsts_value(spec.hsts, spec.hsts_subdomains)}
    if spec.cors is not None:
        origin = headers.get("Origin")
        if origin is not None:
            if method == "OPTIONS" and "Access-Control-Request-Method" in headers:
                # Preflights are answered here, before auth: browsers send no credentials.
                return LocalAnswer(204, spec.cors.preflight_headers(
                    origin, headers.get("Access-Control-Request-Headers")), route=route.name)
            cors = spec.cors.response_headers(origin)
            if cors:
                extra = {**extra, **cors} if extra else dict(cors)
    fwd_path = strip_prefix(path, prefix) if spec.strip_prefix else path
    if spec.rewrite is not None:
        try:
            fwd_path = spec.rewrite.apply(fwd_path)
        except PathError as exc:
            return Refusal(400, "bad_rewrite", str(exc), route=route.name)
    if spec.add_prefix:
        fwd_path = spec.add_prefix + fwd_path
    # The auth service decides on the path we matched and forward, never the raw one: told
    # /public/../admin it would apply its /public rule while the replica serves /admin.
    return Plan(route, prefix, host, path, fwd_path + "?" + query if query else fwd_path,
                authority, extra, path + "?" + query if query else path)


def semicolon_confusion(table: RouteTable, host: str, path: str,
                        found: tuple[Route, str] | None) -> bool:
    """True when ';' path parameters could make us route one path and a backend serve another
    (a different route once the parameters are stripped, or any protected route)."""
    stripped = "/".join(seg.split(";", 1)[0] for seg in path.split("/"))
    other = table.match(host, stripped)
    if found is not None and _protected(found[0].spec):
        return True
    if other is not None and _protected(other[0].spec):
        return True
    return (other[0] if other else None) is not (found[0] if found else None)


def _protected(spec: RouteSpec) -> bool:
    return spec.auth is not None or spec.ip is not None
