"""A route's access checks as the request handler runs them: the IP lists, then one auth kind
(jwt, basic or forward); each either refuses with the response to send or grants, saying who
the client is and how the replica's request headers change."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edgeproxy.policies import forwardauth
from edgeproxy.policies.auth import AuthFailure, JwtVerifier
from edgeproxy.policies.basic import BasicAuthSpec, BasicFailure, BasicVerifier, challenge
from edgeproxy.policies.forwardauth import ForwardAuthSpec, ForwardAuthUnavailable, Original
from edgeproxy.proxy.exchange import Exchange, LocalAnswer, Refusal, RequestView
from edgeproxy.routes.model import AuthSpec, Route
from edgeproxy.telemetry.metrics import Metrics

RawHeaders = Sequence[tuple[bytes, bytes]]
_AUTHORIZATION = frozenset((b"authorization",))


@dataclass(slots=True)  # not frozen: one is built per request, and frozen __init__ is slow
class Grant:
    """Let through: `subject` (and `scopes`) become X-Auth-Subject/-Scopes when set; `drop`
    (lower-case names) leave and `add` join the client's headers on the way to the replica."""

    subject: str | None = None
    scopes: tuple[str, ...] = ()
    drop: frozenset[bytes] = frozenset()
    add: tuple[tuple[bytes, bytes], ...] = ()

    def edit(self, raw: RawHeaders) -> RawHeaders:
        """The client's raw headers with this grant's changes."""
        if not self.drop and not self.add:
            return raw
        drop = self.drop
        return (*(p for p in raw if p[0].lower() not in drop), *self.add)


@dataclass(slots=True)  # not frozen: one is built per forward-auth request
class AccessContext:
    """What the access checks read of a request besides the request itself, worked out once
    by the pipeline."""

    client: str  # resolved through EDGEPROXY_TRUSTED_PROXIES
    peer: str | None
    trusted_peer: bool
    secure: bool
    target: str  # the request target as the client sent it (origin form)
    authority: str | None  # from an absolute-form target, else None (the Host header counts)


class Access:
    """The per-process state of the access policies: JWT keys, the bcrypt pool and cache, the
    HTTP client for forward auth, and the metrics they count into."""

    def __init__(self, jwt: JwtVerifier, basic: BasicVerifier,
                 fetch: forwardauth.Fetch | None,
                 metrics: Metrics, read_timeout: float) -> None:
        self.jwt = jwt
        self.basic = basic
        self.fetch = fetch
        self.metrics = metrics
        self.read_timeout = read_timeout

    def ip_refused(self, route: Route, client: str, ex: Exchange) -> Refusal:
        """403 ip_forbidden, counted."""
        ex.error = "ip_forbidden"
        self.metrics.access_refusals.labels(route.name, "ip", "ip_forbidden").inc()
        return Refusal(403, "ip_forbidden",
                       f"client address {client!r} may not reach route {route.name!r}")

    async def authenticate(self, route: Route, auth: AuthSpec, request: RequestView,
                           ctx: AccessContext, ex: Exchange) -> Grant | Refusal | LocalAnswer:
        """Check the route's one auth kind: a Grant, or the answer to send instead (a refusal,
        or a forward-auth service's own answer such as a redirect to its login page)."""
        if auth.kind == "basic" and auth.basic is not None:
            return await self._basic(route, auth.basic, request, ex)
        if auth.kind == "forward" and auth.forward is not None:
            return await self._forward(route, auth.forward, request, ctx, ex)
        return await self._jwt(route, auth, request, ex)

    def _refused(self, route: Route, kind: str, cause: str, ex: Exchange) -> None:
        ex.error = f"auth:{cause}" if kind == "jwt" else f"auth_{kind}:{cause}"
        self.metrics.access_refusals.labels(route.name, kind, cause).inc()

    def jwt_cached(self, auth: AuthSpec, request: RequestView) -> Grant | None:
        """The grant for a JWT route's request whose token was verified recently, without a
        coroutine (the hot path); None: call `authenticate`."""
        try:
            identity = self.jwt.cached(request.headers.get("Authorization"), auth.audience,
                                       auth.scopes)
        except AuthFailure:
            return None  # authenticate refuses it, and counts the refusal
        return None if identity is None else Grant(identity.subject, identity.scopes)

    def basic_cached(self, spec: BasicAuthSpec, request: RequestView) -> Grant | None:
        """The grant for a Basic route's request whose credentials verified recently, without
        a coroutine (the hot path); None: call `authenticate`."""
        user = self.basic.cached(spec, request.headers.get("Authorization"))
        return None if user is None else _basic_grant(spec, user)

    async def _jwt(self, route: Route, auth: AuthSpec, request: RequestView,
                   ex: Exchange) -> Grant | Refusal:
        verifier = self.jwt
        try:
            authorization = request.headers.get("Authorization")
            identity = verifier.cached(authorization, auth.audience, auth.scopes)
            if identity is None:
                identity = await verifier.verify(authorization, audience=auth.audience,
                                                 scopes=auth.scopes)
        except AuthFailure as exc:
            self._refused(route, "jwt", exc.cause, ex)
            self.metrics.auth_failures.labels(route.name, exc.cause).inc()
            challenge_value = exc.www_authenticate()
            return Refusal(exc.status, exc.error or "auth_unavailable", exc.description,
                           {"WWW-Authenticate": challenge_value} if challenge_value else None)
        return Grant(identity.subject, identity.scopes)

    async def _basic(self, route: Route, spec: BasicAuthSpec, request: RequestView,
                     ex: Exchange) -> Grant | Refusal:
        try:
            user = await self.basic.verify(spec, request.headers.get("Authorization"))
        except BasicFailure as exc:
            self._refused(route, "basic", exc.cause, ex)
            if exc.status == 401:
                return Refusal(401, "invalid_credentials", exc.description,
                               {"WWW-Authenticate": challenge(spec.realm or route.name)})
            if exc.cause == "busy":
                return Refusal(503, "auth_busy", exc.description, {"Retry-After": "1"})
            return Refusal(503, "auth_unavailable", exc.description)
        return _basic_grant(spec, user)

    async def _forward(self, route: Route, spec: ForwardAuthSpec, request: RequestView,
                       view: AccessContext, ex: Exchange) -> Grant | Refusal | LocalAnswer:
        headers = request.headers
        proto = host = None
        if view.trusted_peer:  # the proxy in front knows how the client reached it
            proto = headers.get("X-Forwarded-Proto")
            host = headers.get("X-Forwarded-Host")
        xff = view.peer or ""
        if view.trusted_peer:
            prior = ", ".join(headers.getall("X-Forwarded-For", ()))
            xff = f"{prior}, {xff}" if prior else xff
        original = Original(
            method=request.method,
            proto=(proto or ("https" if view.secure else "http")).split(",")[0].strip(),
            host=host or view.authority or headers.get("Host") or "",
            uri=view.target, forwarded_for=xff)
        timeout = spec.timeout or route.spec.read_timeout or self.read_timeout
        if self.fetch is None:  # a proxy built without an HTTP client (unit tests)
            self._refused(route, "forward", "no_session", ex)
            return Refusal(503, "auth_unavailable", "forward auth has no HTTP client here")
        try:
            answer = await forwardauth.ask(self.fetch, spec, headers, original, timeout)
        except ForwardAuthUnavailable as exc:
            self._refused(route, "forward", exc.cause, ex)
            return Refusal(503, "auth_unavailable",
                           f"the auth service of route {route.name!r} cannot answer: "
                           f"{exc.detail}")
        if isinstance(answer, forwardauth.Denied):
            self._refused(route, "forward", f"status_{answer.status}", ex)
            return LocalAnswer(answer.status, answer.headers, answer.body,
                               reason=answer.reason or None)
        # The client's copies of every named header go, whether or not the service sent one.
        drop = spec.drop
        add = tuple((n.encode(), v.encode("utf-8", "surrogateescape")) for n, v in answer.headers)
        return Grant(None, (), drop, add)


def _basic_grant(spec: BasicAuthSpec, user: str) -> Grant:
    """The user as the subject; Authorization dropped unless the route keeps it."""
    return Grant(user, (), frozenset() if spec.keep_authorization else _AUTHORIZATION)
