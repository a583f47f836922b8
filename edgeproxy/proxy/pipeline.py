"""The request pipeline, the same for every front: decide -> policies -> pick a replica ->
try it (and others, when safe) -> hand the replica's answer to the front's response writer.

It reads requests through `RequestView` and answers through a `Front`, so HTTP/1.1 (aiohttp)
and any other protocol front share every policy, transformation, log line and metric.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import aiohttp
import structlog
from multidict import CIMultiDict

from edgeproxy.clients.authfetch import PoolFetch
from edgeproxy.clients.upstream import (
    Endpoint,
    ResponseLimits,
    UpstreamError,
    UpstreamPool,
)
from edgeproxy.clients.upstream_h2 import H2_SCHEMES, H2Pool, H2Settings  # edgeproxy-h2
from edgeproxy.core import headers as h
from edgeproxy.core.logs import fast_access_logger, get_logger
from edgeproxy.core.settings import Settings
from edgeproxy.core.tls import CertStore, ChallengeAnswers, Edge
from edgeproxy.policies.auth import JwtConfig, JwtVerifier
from edgeproxy.policies.basic import BasicVerifier
from edgeproxy.policies.ratelimit import (
    InMemoryLimiter,
    Limiter,
    LocalLimiter,
    RateDecision,
    RateLimitSpec,
    client_key,
    ratelimit_headers,
)
from edgeproxy.proxy.access import Access, AccessContext, Grant
from edgeproxy.proxy.balancer import Balancer
from edgeproxy.proxy.decide import Plan, decide
from edgeproxy.proxy.exchange import Exchange, LocalAnswer, Refusal, ReplicaResponse, RequestView
from edgeproxy.proxy.requestcheck import check_credentials, check_forwarded_host
from edgeproxy.routes.model import Route, RouteSpec, Upstream
from edgeproxy.routes.table import RouteTable
from edgeproxy.telemetry import tracing as otel
from edgeproxy.telemetry.metrics import Metrics

# Failures that say the replica itself is in trouble (not the request): eject it for a while.
_EJECTING = frozenset(("upstream_unreachable", "upstream_timeout"))
# Failures of a try that are the client's doing: no replica's fault, and no other replica
# would fare better.
_CLIENT_FAULTS = frozenset(("body_too_large", "client_timeout", "bad_request"))
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
IDEMPOTENT = frozenset(("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"))

_ENDPOINTS_MAX = 4096

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


class Front(Protocol[R_co]):
    """A protocol front for one request: it reads the request (`view`) and writes answers.

    Each method writes (or returns, for aiohttp) the client's answer and sets `ex.status`;
    the front applies the route's response rules and `ex.extra_headers` exactly once."""

    @property
    def view(self) -> RequestView: ...

    def refuse(self, refusal: Refusal, ex: Exchange) -> R_co: ...

    def answer(self, answer: LocalAnswer, ex: Exchange) -> R_co: ...

    async def relay(self, resp: ReplicaResponse, spec: RouteSpec, ex: Exchange) -> R_co:
        """Write the replica's answer; raise UpstreamFailed only while no byte of it has
        reached the client (the pipeline may then try another replica)."""

    async def websocket(self, route: Route, upstream: Upstream, target: str,
                        headers: CIMultiDict[str], ex: Exchange) -> R_co: ...


class BodyTooLarge(Exception):
    """The streamed request body passed the size limit."""


class BodyMalformed(Exception):
    """The client's request body broke its own framing (a bad chunk size, say): the front
    raises it from `RequestView.body`."""


class CountedBody:
    """Streams the client's body upstream, counting bytes against the limit."""

    __slots__ = ("_source", "limit", "seen", "too_large")

    def __init__(self, source: AsyncIterator[bytes], limit: int) -> None:
        self._source = source
        self.limit = limit
        self.seen = 0
        self.too_large = False

    async def stream(self) -> AsyncIterator[bytes]:
        async for chunk in self._source:
            self.seen += len(chunk)
            if self.limit and self.seen > self.limit:
                self.too_large = True
                raise BodyTooLarge()
            yield chunk


class UpstreamFailed(Exception):
    """A try failed before any byte reached the client; maybe another replica can answer."""

    _STATUS: ClassVar[dict[str, int]] = {
        "upstream_unreachable": 502, "upstream_error": 502, "upstream_timeout": 504,
        "body_too_large": 413, "upstream_tls_error": 502, "client_timeout": 408,
        "bad_request": 400,
    }

    def __init__(self, code: str, before_send: bool, detail: str = "") -> None:
        super().__init__(code)
        self.code = code
        self.before_send = before_send
        self.detail = detail

    def refusal(self, route: Route, body: CountedBody | None, limit: int) -> Refusal:
        """The client's answer once no replica is left to try."""
        if self.code == "body_too_large" or (body is not None and body.too_large):
            return Refusal(413, "body_too_large",
                           f"request body exceeds the limit of {limit} bytes",
                           {"Connection": "close"})
        if self.code == "client_timeout":
            return Refusal(408, "client_timeout", "the request body stopped arriving",
                           {"Connection": "close"})
        if self.code == "bad_request":
            return Refusal(400, "bad_request", f"malformed request body: {self.detail}",
                           {"Connection": "close"})
        what = {"upstream_unreachable": "refused the connection or is unreachable",
                "upstream_timeout": "timed out", "upstream_error": "failed",
                "upstream_tls_error": "failed the TLS handshake"}[self.code]
        detail = f" ({self.detail})" if self.detail else ""
        return Refusal(self._STATUS[self.code], self.code,
                       f"replica of route {route.name!r} {what}{detail}")


class Proxy(Generic[R]):
    """Answers every request on the traffic listeners from the current route table."""

    def __init__(
        self,
        settings: Settings,
        table: Any,
        balancer: Balancer | None = None,
        metrics: Metrics | None = None,
        verifier: JwtVerifier | None = None,
        limiter: Limiter | None = None,
        session: aiohttp.ClientSession | None = None,
        basic: BasicVerifier | None = None,
    ) -> None:
        self.settings = settings
        self._table = table
        self.balancer = balancer or Balancer(settings.eject_time)
        self.metrics = metrics or Metrics(table)
        if not self.metrics.count_in_flight:
            self.metrics.in_flight.set_function(lambda: self.in_flight)
        self.verifier = verifier or JwtVerifier(JwtConfig())
        self._pool = UpstreamPool(
            settings.connect_timeout, settings.read_timeout,
            limits=ResponseLimits(settings.max_response_header_size,
                                  settings.max_response_headers))
        # Forward auth asks its service over the replicas' pool (same limits, reused
        # connections); a proxy built without a front's session (unit tests) has none.
        self.access = Access(self.verifier,
                             basic or BasicVerifier(on_hash=self.metrics.bcrypt_checks.inc),
                             PoolFetch(self._pool) if session is not None else None,
                             self.metrics, settings.read_timeout)
        self.limiter: Limiter = limiter or LocalLimiter()
        self.edge = Edge(redirect_port=settings.tls_redirect_port)
        self._ssl_contexts: dict[tuple[bool, str | None], ssl.SSLContext] = {}
        self._plain_endpoints: dict[str, Endpoint] = {}  # http replicas' by address
        # edgeproxy-h2: replicas with gateway.scheme=h2c/h2 get multiplexed HTTP/2 connections.
        self._h2 = H2Pool(H2Settings(settings.h2_upstream_streams, settings.connect_timeout,
                                     settings.read_timeout))
        self._certs: CertStore | None = None
        self._acme: ChallengeAnswers | None = None
        self._events = get_logger("proxy")
        self._trusted = settings.trusted_proxies
        self._log = fast_access_logger(settings.log_format,
                                       **structlog.contextvars.get_contextvars())
        self._access = settings.access_log
        self.in_flight = 0
        # OpenTelemetry: None unless OTEL_EXPORTER_OTLP_ENDPOINT is set (see edgeproxy.telemetry.tracing).
        self.tracing = otel.from_env(self.metrics.trace_spans_dropped)

    def set_table_source(self, source: Callable[[], RouteTable]) -> None:
        """Where the live table comes from, once the server knows (called per request)."""
        self._table = source

    def tls(self, store: CertStore, acme: ChallengeAnswers) -> None:
        """Enable TLS at the edge: ACME challenges, https redirects and HSTS."""
        self._certs = store
        self._acme = acme
        self.metrics.table_collector.certificates = store.certificates
        self.edge = Edge(store.covers, self.settings.tls_redirect_port, acme.challenge_response)

    def tls_status(self) -> dict[str, Any] | None:
        """Certificates served and ACME orders, for /healthz."""
        if self._certs is None:
            return None
        return {"certificates": [c.as_dict() for c in self._certs.certificates()],
                "acme": self._acme.status() if self._acme is not None else []}

    def close(self) -> None:
        """Close pooled connections to replicas, stop the bcrypt threads and send the spans
        still queued."""
        self._pool.close()
        self._h2.close()  # edgeproxy-h2
        self.access.basic.close()
        if self.tracing is not None:
            self.tracing.shutdown()

    # --- the pipeline ------------------------------------------------------------------------

    async def run(self, front: Front[R], early: Refusal | None = None) -> R:
        """Answer one request through its front; log and count it. `early` is the front's
        own refusal of the request (e.g. a framing the protocol does not allow)."""
        start = time.perf_counter()
        view = front.view
        ex = Exchange(h.request_id(view.headers))
        tracing = self.tracing
        if tracing is not None:  # --- tracing hook: the server span (off: this check only)
            ex.trace = tracing.start_server(view)
        self.in_flight += 1
        metrics = self.metrics
        if metrics.count_in_flight:
            metrics.in_flight.inc()
        try:
            if early is not None:
                ex.error = early.code
                return front.refuse(early, ex)
            return await self._serve(front, view, ex)
        except asyncio.CancelledError:
            ex.status = 499  # the client went away first (nginx's convention in the log)
            if ex.error is None:
                ex.error = "client_closed"
            raise
        except Exception as exc:  # noqa: BLE001 - a bug must cost one request, not the handler
            self._events.exception("proxy_error", route=ex.route, request_id=ex.rid)
            ex.error = "internal_error: " + type(exc).__name__
            ex.rules = None
            ex.extra_headers = None
            return front.refuse(Refusal(500, "internal_error", "the proxy failed to handle "
                                        "this request; see its log"), ex)
        finally:
            self.in_flight -= 1
            if metrics.count_in_flight:
                metrics.in_flight.dec()
            elapsed = time.perf_counter() - start
            metrics.observe_request(ex.route, view.method, ex.status, elapsed, ex.request_bytes,
                                    ex.bytes, view.protocol, ex.grpc_status)
            if ex.retries:
                metrics.retries.labels(ex.route or "").inc()
            trace = ex.trace
            if trace is not None:  # --- tracing hook: end the server span
                trace.end(ex)
            if self._access:
                log = self._log
                # One literal in the line's order (see FastAccessLog): no keyword arguments
                # merged into a second dict, which cost a third of the line.
                record = {
                    "logger": "access", "worker": log.worker,
                    "method": view.method, "path": view.target, "status": ex.status,
                    "route": ex.route, "upstream": ex.upstream, "bytes": ex.bytes,
                    # round(elapsed * 1000, 3), without round()'s exact decimal conversion
                    "duration_ms": int(elapsed * 1_000_000 + 0.5) / 1000, "request_id": ex.rid,
                    # Refused before routing (404, 400): the client is still worth a line.
                    "client": ex.client or h.client_address(view.peer, view.headers,
                                                            self._trusted),
                    "error": ex.error, "retries": ex.retries,
                    "protocol": view.protocol if view.protocol != "HTTP/1.1" else None,
                    "grpc_status": ex.grpc_status,  # edgeproxy-h2
                    "event": "access", "level": "info",
                }
                if trace is not None:
                    record.update(trace.log_fields())
                log.emit(record)

    async def _serve(self, front: Front[R], view: RequestView, ex: Exchange) -> R:
        decision = decide(self._table(), view.method, view.target, view.headers, view.secure,
                          self.edge)
        if type(decision) is not Plan:  # one check on the common path
            if isinstance(decision, Refusal):
                ex.route = decision.route
                return front.refuse(decision, ex)
            if isinstance(decision, LocalAnswer):
                ex.route = decision.route
                return front.answer(decision, ex)
        plan = decision
        route = plan.route
        spec = route.spec
        ex.route = route.name
        if spec.response_headers:
            ex.rules = spec.response_headers
        ex.extra_headers = plan.extra_headers
        peer = view.peer
        trusted_peer = bool(self._trusted) and h.is_trusted(peer, self._trusted)
        client = h.client_address(peer, view.headers, self._trusted)
        ex.client = client
        # Credentials this route's policies read: sent twice, we would check one and the
        # replica might read the other (Authorization is checked on every route, in decide).
        rate = spec.ratelimit
        refusal = (check_credentials(view.headers, (rate.key[7:],))
                   if rate is not None and rate.key.startswith("header:") else None) or (
            check_forwarded_host(view.headers) if trusted_peer else None)
        if refusal is not None:
            ex.error = refusal.code
            return front.refuse(refusal, ex)
        # Access checks in the documented order: IP lists, then auth, then the rate limit.
        if spec.ip is not None and not spec.ip.allows(client):
            return front.refuse(self.access.ip_refused(route, client, ex), ex)
        grant: Grant | None = None
        auth_spec = spec.auth
        if auth_spec is not None:
            # Recently verified credentials answer without a coroutine (the hot path).
            if auth_spec.kind == "jwt":
                grant = self.access.jwt_cached(auth_spec, view)
            elif auth_spec.kind == "basic" and auth_spec.basic is not None:
                grant = self.access.basic_cached(auth_spec.basic, view)
            if grant is None:
                checked = await self.access.authenticate(
                    route, auth_spec, view,
                    AccessContext(client, peer, trusted_peer, view.secure, plan.origin_target,
                                  plan.authority), ex)
                if isinstance(checked, Refusal):
                    return front.refuse(checked, ex)
                if isinstance(checked, LocalAnswer):
                    return front.answer(checked, ex)
                grant = checked
        if rate is not None:
            key = client_key(rate, ip=client, subject=grant.subject if grant else None,
                             headers=view.headers)
            limiter = self.limiter
            if isinstance(limiter, InMemoryLimiter):  # in-memory buckets: no coroutine
                token = limiter.take(route.name, rate, key, time.monotonic())
            else:
                token = await limiter.hit(route.name, rate, key)
            refused = self._rate_limited(route, rate, token, ex)
            if refused is not None:
                return front.refuse(refused, ex)
        upstream = self.balancer.pick(route)
        if upstream is None:
            return front.refuse(Refusal(
                503, "no_replica", f"route {route.name!r} has no healthy replica right now",
                {"Retry-After": str(self.settings.retry_after)}), ex)
        limit = self.settings.max_body_size if spec.max_body is None else spec.max_body
        length = view.content_length
        if limit and length is not None and length > limit:
            return front.refuse(Refusal(
                413, "body_too_large",
                f"request body of {length} bytes exceeds the limit of {limit}",
                {"Connection": "close"}), ex)
        auth: tuple[str, str] | None = None
        if grant is not None and grant.subject is not None:
            auth = (grant.subject, " ".join(grant.scopes))
            if _CONTROL.search(auth[0]) or _CONTROL.search(auth[1]):
                # A signed token can still carry CR/LF in sub or scope: never a header.
                return front.refuse(Refusal(
                    401, "invalid_token", "the token's sub or scope holds control characters",
                    {"WWW-Authenticate": 'Bearer error="invalid_token"'}), ex)
        hop = h.HopInfo(peer, client, "https" if view.secure else "http", ex.rid, trusted_peer)
        raw_headers = view.raw_headers if grant is None else grant.edit(view.raw_headers)
        # --- tracing hook: the replica gets our traceparent instead of the client's (or the
        # auth server's: a grant may add headers)
        if ex.trace is not None and (ex.trace.client_headers or grant is not None):
            raw_headers = otel.without_trace_headers(raw_headers)
        if plan.authority is not None:  # the replica gets the target's authority as its Host
            raw_headers = (*(p for p in raw_headers if p[0].lower() != b"host"),
                           (b"Host", plan.authority.encode()))
        websocket = h.UPGRADE in view.headers and is_websocket(view.headers)
        if spec.request_headers or websocket:
            hdrs = h.upstream_request_headers(raw_headers, hop)
            if spec.request_headers:
                spec.request_headers.apply(hdrs)
            if auth is not None:
                hdrs["X-Auth-Subject"], hdrs["X-Auth-Scopes"] = auth
            if websocket:
                if ex.trace is not None:  # --- tracing hook: no client span, the server's
                    ex.trace.inject(hdrs)
                ex.upstream = upstream.address
                return await front.websocket(route, upstream, plan.target, hdrs, ex)
            head = h.UpstreamHead.of(hdrs)
        else:  # no rules: straight from the client's header bytes to the replica's
            head = h.upstream_head(raw_headers, hop, auth)
        if not view.has_body:
            return await self._forward(front, view.method, route, upstream, plan.target, head,
                                       None, ex)
        body = CountedBody(view.body(), limit)
        try:
            return await self._forward(front, view.method, route, upstream, plan.target, head,
                                       body, ex)
        finally:
            ex.request_bytes = body.seen

    async def _forward(self, front: Front[R], method: str, route: Route, upstream: Upstream,
                       target: str, head: h.UpstreamHead, body: CountedBody | None,
                       ex: Exchange) -> R:
        """Try replicas until one answers or retrying is no longer safe; relay the answer."""
        tried: list[Upstream] = []
        balancer = self.balancer
        limit = body.limit if body is not None else 0
        trace = ex.trace
        while True:
            tried.append(upstream)
            ex.upstream = upstream.address
            current = upstream
            balancer.acquire(current)
            span = None
            trace_lines = b""
            if trace is not None:  # --- tracing hook: a client span per try
                span, trace_lines = trace.start_client(method, current, target, len(tried) - 1)
            replied: int | None = None
            try:
                try:
                    try:
                        resp = await self._attempt(route, current, method, target, head, body,
                                                   trace_lines)
                    except (BodyTooLarge, BodyMalformed, UpstreamError) as exc:
                        raise _failed(exc) from None
                    replied = resp.status
                    try:
                        out = await front.relay(resp, route.spec, ex)
                    finally:
                        resp.release()
                except UpstreamFailed as failure:
                    ex.error = failure.code
                    if span is not None and trace is not None:  # --- tracing hook: try failed
                        trace.end_client(span, replied, failure.code)
                        span = None
                    if failure.code not in _CLIENT_FAULTS:
                        self.metrics.upstream_errors.labels(route.name, failure.code).inc()
                    if failure.code in _EJECTING:
                        self._eject(route, current, failure)
                    nxt = self._next_upstream(route, tried, method, body, failure)
                    if nxt is None:
                        return front.refuse(failure.refusal(route, body, limit), ex)
                    ex.retries += 1
                    upstream = nxt
                    continue
                balancer.succeeded(current)
                return out
            finally:
                balancer.release(current)
                if span is not None and trace is not None:  # --- tracing hook: try answered
                    trace.end_client(span, replied, None)

    def _attempt(self, route: Route, upstream: Upstream, method: str, target: str,
                 head: h.UpstreamHead, body: CountedBody | None,
                 trace_lines: bytes = b"") -> Awaitable[ReplicaResponse]:
        """One try against one replica: the awaitable of its answer's head (not a coroutine of
        its own: one frame less on every request). It fails with the client's exceptions,
        which `_forward` turns into UpstreamFailed. `trace_lines` are this try's
        traceparent/tracestate header lines (tracing on)."""
        spec = route.spec
        chunked = body is not None and not head.has_length
        if upstream.scheme in H2_SCHEMES:  # edgeproxy-h2: HTTP/2 to the replica
            tls = (self._h2.tls_context(spec.tls_verify, spec.tls_ca)
                   if upstream.scheme == "h2" else None)
            return self._h2.request(
                Endpoint(upstream.host, upstream.port, tls, spec.tls_server_name),
                method, target, upstream.address, head,
                body.stream() if body is not None else None,
                connect_timeout=spec.connect_timeout, read_timeout=spec.read_timeout,
                extra=trace_lines)
        return self._pool.request(
            self._endpoint(upstream, spec),
            head.parts(method, target, upstream.address, chunked, trace_lines),
            method, body.stream() if body is not None else None, chunked,
            connect_timeout=spec.connect_timeout, read_timeout=spec.read_timeout,
            idempotent=method in IDEMPOTENT)

    # --- policies ----------------------------------------------------------------------------

    def _rate_limited(self, route: Route, spec: RateLimitSpec, decision: RateDecision,
                      ex: Exchange) -> Refusal | None:
        """The limiter's decision on a token: the refusal to answer with, or None to go on."""
        ex.add_headers(ratelimit_headers(spec, decision))
        if decision.allowed:
            return None
        if decision.error is not None:
            ex.error = "ratelimit_unavailable"
            return Refusal(503, "ratelimit_unavailable",
                           f"rate limit of route {route.name!r} cannot be checked: "
                           f"{decision.error}")
        ex.error = "rate_limited"
        self.metrics.ratelimited.labels(route.name).inc()
        return Refusal(429, "rate_limited",
                       f"rate limit of route {route.name!r} exceeded "
                       f"({spec.limit} per {spec.period:g}s); retry later")

    # --- replicas ----------------------------------------------------------------------------

    def _eject(self, route: Route, upstream: Upstream, failure: UpstreamFailed) -> None:
        seconds = self.balancer.failed(upstream)
        self.metrics.ejections.labels(route.name).inc()
        self._events.warning("replica_ejected", route=route.name, replica=upstream.name,
                             address=upstream.address, reason=failure.code,
                             detail=failure.detail or None, for_s=seconds)

    def _next_upstream(self, route: Route, tried: list[Upstream], method: str,
                       body: CountedBody | None, failure: UpstreamFailed) -> Upstream | None:
        """Another replica to try, when retrying is safe and tries are left."""
        retries = route.spec.retries
        if failure.code in _CLIENT_FAULTS:
            return None
        if len(tried) > (self.settings.retries if retries is None else retries):
            return None
        # After sending, the replica may have acted on the request: only idempotent requests
        # whose body we have not consumed can go again.
        if not failure.before_send and (
            method not in IDEMPOTENT or (body is not None and body.seen)
        ):
            return None
        return self.balancer.pick(route, exclude=tried)

    def _tls_context(self, spec: RouteSpec) -> ssl.SSLContext:
        """TLS settings for https replicas, built once per (verify, CA) pair."""
        key = (spec.tls_verify, spec.tls_ca)
        ctx = self._ssl_contexts.get(key)
        if ctx is None:
            try:
                ctx = ssl.create_default_context(cafile=spec.tls_ca)
            except (OSError, ssl.SSLError) as exc:
                raise UpstreamFailed("upstream_tls_error", True,
                                     f"cannot load gateway.tls.ca={spec.tls_ca!r}: {exc}") from None
            ctx.set_alpn_protocols(["http/1.1"])
            if not spec.tls_verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self._ssl_contexts[key] = ctx
        return ctx

    def _endpoint(self, upstream: Upstream, spec: RouteSpec) -> Endpoint:
        if upstream.scheme != "https":
            # The same for every request to the replica: made once (a NamedTuple's __new__ is
            # a Python call), kept by address; replicas come and go, so the dict is bounded.
            endpoint = self._plain_endpoints.get(upstream.address)
            if endpoint is None:
                if len(self._plain_endpoints) >= _ENDPOINTS_MAX:
                    self._plain_endpoints.clear()
                endpoint = self._plain_endpoints[upstream.address] = Endpoint(upstream.host,
                                                                              upstream.port)
            return endpoint
        return Endpoint(upstream.host, upstream.port, self._tls_context(spec),
                        spec.tls_server_name)


def _failed(exc: BodyTooLarge | BodyMalformed | UpstreamError) -> UpstreamFailed:
    """A failed try as the pipeline's UpstreamFailed."""
    if isinstance(exc, BodyTooLarge):
        return UpstreamFailed("body_too_large", False)
    if isinstance(exc, BodyMalformed):
        return UpstreamFailed("bad_request", False, str(exc))
    return UpstreamFailed(exc.code, exc.before_send, exc.detail)


def is_websocket(headers: h.Headers) -> bool:
    """A WebSocket upgrade request (HTTP/1.1 only: other protocols forbid Connection)."""
    upgrade = headers.get(h.UPGRADE)
    if upgrade is None or upgrade.lower() != "websocket":
        return False
    return "upgrade" in h.connection_tokens(headers)
