"""The request handler: match, pick a replica, stream the request and response through."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable
from http import HTTPStatus
from typing import Any, ClassVar

import aiohttp
import structlog
from aiohttp import WSMsgType, web
from multidict import CIMultiDict
from yarl import URL

from edgeproxy import headers as h
from edgeproxy.acme import CHALLENGE_PREFIX, AcmeManager, challenge_token
from edgeproxy.balancer import Balancer
from edgeproxy.errors import error_response
from edgeproxy.logs import fast_access_logger, get_logger
from edgeproxy.metrics import Metrics
from edgeproxy.model import Route, RouteSpec, Upstream
from edgeproxy.paths import (
    PathError,
    normalize_path,
    split_absolute,
    split_target,
    strip_prefix,
)
from edgeproxy.policies.auth import AuthFailure, Identity, JwtConfig, JwtVerifier
from edgeproxy.policies.ratelimit import (
    InMemoryLimiter,
    Limiter,
    LocalLimiter,
    RateLimitSpec,
    client_key,
    ratelimit_headers,
)
from edgeproxy.requestcheck import (
    Refusal,
    check_credentials,
    check_forwarded_host,
    check_head,
    host_problem,
)
from edgeproxy.settings import Settings
from edgeproxy.table import RouteTable
from edgeproxy.tls import CertStore, hsts_value, https_redirect_url
from edgeproxy.transform import gzip_compressor, should_compress
from edgeproxy.upstream import Endpoint, UpstreamError, UpstreamPool

# Failures that say the replica itself is in trouble (not the request): eject it for a while.
_EJECTING = frozenset(("upstream_unreachable", "upstream_timeout"))
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_IDEMPOTENT = frozenset(("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"))
_SKIP_AUTO = frozenset(("User-Agent", "Accept", "Accept-Encoding", "Content-Type"))
_WRITE_WAIT = 64 * 1024  # unsent bytes past which a small answer waits for the client
_EMPTY_BODY = frozenset((204, 304))


class BodyTooLarge(Exception):
    """The streamed request body passed the size limit."""


class _UpstreamFailed(Exception):
    """A try failed before any byte reached the client; maybe another replica can answer."""

    _STATUS: ClassVar[dict[str, int]] = {
        "upstream_unreachable": 502, "upstream_error": 502, "upstream_timeout": 504,
        "body_too_large": 413, "upstream_tls_error": 502, "client_timeout": 408,
    }

    def __init__(self, code: str, before_send: bool, detail: str = "") -> None:
        super().__init__(code)
        self.code = code
        self.before_send = before_send
        self.detail = detail

    def response(self, route: Route, body: _CountedBody | None, rid: str,
                 limit: int) -> web.Response:
        if self.code == "body_too_large" or (body is not None and body.too_large):
            return error_response(413, "body_too_large",
                                  f"request body exceeds the limit of {limit} bytes", rid,
                                  {"Connection": "close"})
        if self.code == "client_timeout":
            return error_response(408, "client_timeout", "the request body stopped arriving",
                                  rid, {"Connection": "close"})
        what = {"upstream_unreachable": "refused the connection or is unreachable",
                "upstream_timeout": "timed out", "upstream_error": "failed",
                "upstream_tls_error": "failed the TLS handshake"}[self.code]
        detail = f" ({self.detail})" if self.detail else ""
        return error_response(self._STATUS[self.code], self.code,
                              f"replica of route {route.name!r} {what}{detail}", rid)


class _CountedBody:
    """Streams the client's body upstream, counting bytes against the limit."""

    __slots__ = ("_content", "limit", "seen", "too_large")

    def __init__(self, content: aiohttp.StreamReader, limit: int) -> None:
        self._content = content
        self.limit = limit
        self.seen = 0
        self.too_large = False

    async def stream(self) -> AsyncIterator[bytes]:
        async for chunk in self._content.iter_any():  # what arrived, no re-slicing
            self.seen += len(chunk)
            if self.limit and self.seen > self.limit:
                self.too_large = True
                raise BodyTooLarge()
            yield chunk


def make_session(settings: Settings) -> aiohttp.ClientSession:
    """One ClientSession for the process: no decompression, no invented headers, no cookies."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30,
                                     enable_cleanup_closed=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout,
                                    sock_read=settings.read_timeout)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=_SKIP_AUTO,
        trust_env=False,
        requote_redirect_url=False,
    )


class Proxy:
    """Answers every request on the traffic listener from the current route table."""

    def __init__(
        self,
        settings: Settings,
        table: Callable[[], RouteTable],
        session: aiohttp.ClientSession,
        balancer: Balancer | None = None,
        metrics: Metrics | None = None,
        verifier: JwtVerifier | None = None,
        limiter: Limiter | None = None,
    ) -> None:
        self.settings = settings
        self._table = table
        self._session = session
        self.balancer = balancer or Balancer(settings.eject_time)
        self.metrics = metrics or Metrics(table)
        if not self.metrics.count_in_flight:
            self.metrics.in_flight.set_function(lambda: self.in_flight)
        self.verifier = verifier or JwtVerifier(JwtConfig())
        self.limiter: Limiter = limiter or LocalLimiter()
        self._ssl_contexts: dict[tuple[bool, str | None], ssl.SSLContext] = {}
        self._pool = UpstreamPool(settings.connect_timeout, settings.read_timeout)
        self._certs: CertStore | None = None
        self._acme: AcmeManager | None = None
        self._events = get_logger("proxy")
        self._trusted = settings.trusted_proxies
        self._log = fast_access_logger(settings.log_format,
                                       **structlog.contextvars.get_contextvars())
        self._access = settings.access_log
        self.in_flight = 0

    def tls(self, store: CertStore, acme: AcmeManager) -> None:
        """Enable TLS at the edge: ACME challenges, https redirects and HSTS."""
        self._certs = store
        self._acme = acme

    def tls_status(self) -> dict[str, Any] | None:
        """Certificates served and ACME orders, for /healthz."""
        if self._certs is None:
            return None
        return {"certificates": [c.as_dict() for c in self._certs.certificates()],
                "acme": self._acme.status() if self._acme is not None else []}

    def close(self) -> None:
        """Close pooled connections to replicas."""
        self._pool.close()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Entry point for aiohttp's low-level server."""
        start = time.perf_counter()
        rid = h.request_id(request.headers)
        self.in_flight += 1
        metrics = self.metrics
        if metrics.count_in_flight:
            metrics.in_flight.inc()
        info: dict[str, Any] = {"route": None, "upstream": None, "bytes": 0}
        status = 500
        try:
            response = await self._dispatch(request, rid, info)
            if not response.prepared:
                rules = info.get("response_rules")
                if rules is not None:
                    rules.apply(response.headers)
                extra = info.get("extra_headers")
                if extra:
                    _merge_headers(response.headers, extra)
            status = response.status
            return response
        except asyncio.CancelledError:
            status = 499  # the client went away first (nginx's convention in the access log)
            info.setdefault("error", "client_closed")
            raise
        except Exception as exc:  # noqa: BLE001 - a bug must cost one request, not the handler
            self._events.exception("proxy_error", route=info["route"], request_id=rid)
            info["error"] = "internal_error: " + type(exc).__name__
            status = 500
            return error_response(500, "internal_error",
                                  "the proxy failed to handle this request; see its log", rid)
        finally:
            self.in_flight -= 1
            if metrics.count_in_flight:
                metrics.in_flight.dec()
            elapsed = time.perf_counter() - start
            metrics.observe_request(info["route"], request.method, status, elapsed)
            if "retries" in info:
                metrics.retries.labels(info["route"] or "").inc()
            if self._access:
                self._log.info(
                    "access", method=request.method, path=request.raw_path, status=status,
                    route=info["route"], upstream=info["upstream"], bytes=info["bytes"],
                    duration_ms=round(elapsed * 1000, 3), request_id=rid,
                    client=info.get("client"), error=info.get("error"),
                    retries=info.get("retries", 0),
                )

    async def _dispatch(
        self, request: web.BaseRequest, rid: str, info: dict[str, Any]
    ) -> web.StreamResponse:
        refusal = check_head(request.version, request.headers)
        if refusal is not None:
            return _refuse(request, refusal, rid, info)
        asked = request.raw_path  # the client's request target, in origin form below
        authority: str | None = None
        if not asked.startswith("/"):
            try:
                absolute = split_absolute(asked)
            except PathError as exc:
                return error_response(400, "bad_target", str(exc), rid)
            if absolute is not None:  # http://host/path: its host replaces the Host header
                authority, asked = absolute
                problem = host_problem(authority)
                if problem is not None:
                    return error_response(400, "bad_target", "request target: " + problem, rid)
        raw_path, query = split_target(asked)
        challenge = self._acme is not None and raw_path.startswith(CHALLENGE_PREFIX)
        if challenge and self._acme is not None:
            token = challenge_token(raw_path)
            answer = self._acme.challenge_response(token) if token else None
            if answer is not None:
                info["route"] = "acme-challenge"
                return web.Response(text=answer, content_type="text/plain")
        try:
            path = normalize_path(raw_path)
        except PathError as exc:
            return error_response(400, "bad_path", str(exc), rid)
        # Exempt from https redirects only what really is a challenge path once normalised
        # (/.well-known/acme-challenge/../../admin is not).
        challenge = challenge and path.startswith(CHALLENGE_PREFIX)
        host = h.request_host(request.headers) if authority is None else h.host_name(authority)
        table = self._table()
        found = table.match(host, path)
        if ";" in path and _semicolon_confusion(table, host, path, found):
            # Java backends drop ';params' from segments: /api;x/admin is /api/admin to them.
            return error_response(400, "bad_path", "';' in this path would reach another or a "
                                  "protected route on some backends", rid)
        if found is None:
            return error_response(404, "no_route",
                                  f"no route matches host {host!r} and path {path!r}", rid)
        route, prefix = found
        info["route"] = route.name
        spec = route.spec
        secure = request.secure
        if spec.tls is not None:
            if not secure and spec.tls_redirect and not challenge and (
                    self._certs is not None and self._certs.covers(host)):
                location = https_redirect_url(
                    request.headers.get("Host", "") if authority is None else authority,
                    asked, self.settings.tls_redirect_port)
                if location is None:
                    return error_response(400, "bad_host", "the Host header cannot be "
                                          "redirected to https", rid)
                return web.Response(status=308, headers={"Location": location,
                                                         "X-Request-ID": rid})
            if secure and spec.hsts is not None:
                info.setdefault("extra_headers", {})["Strict-Transport-Security"] = hsts_value(
                    spec.hsts, spec.hsts_subdomains)
        if spec.response_headers:
            info["response_rules"] = spec.response_headers
        if spec.cors is not None:
            origin = request.headers.get("Origin")
            if origin is not None:
                if request.method == "OPTIONS" and "Access-Control-Request-Method" in \
                        request.headers:
                    # Preflights are answered here, before auth: browsers send no credentials.
                    return web.Response(status=204, headers={
                        **spec.cors.preflight_headers(
                            origin, request.headers.get("Access-Control-Request-Headers")),
                        "X-Request-ID": rid})
                cors = spec.cors.response_headers(origin)
                if cors:
                    info.setdefault("extra_headers", {}).update(cors)
        peer = request.remote
        trusted_peer = bool(self._trusted) and h.is_trusted(peer, self._trusted)
        client = h.client_address(peer, request.headers, self._trusted)
        info["client"] = client
        # Credentials this route's policies read: sent twice, we would check one and the
        # replica might read the other (Authorization is checked on every route, in check_head).
        rl_key = spec.ratelimit.key if spec.ratelimit is not None else ""
        refusal = (check_credentials(request.headers, (rl_key[7:],))
                   if rl_key.startswith("header:") else None) or (
            check_forwarded_host(request.headers) if trusted_peer else None)
        if refusal is not None:
            return _refuse(request, refusal, rid, info)
        identity: Identity | None = None
        if spec.auth is not None:
            try:
                authorization = request.headers.get("Authorization")
                identity = self.verifier.cached(authorization, spec.auth.audience,
                                                spec.auth.scopes)
                if identity is None:
                    identity = await self.verifier.verify(
                        authorization, audience=spec.auth.audience, scopes=spec.auth.scopes)
            except AuthFailure as exc:
                info["error"] = "auth:" + exc.cause
                self.metrics.auth_failures.labels(route.name, exc.cause).inc()
                return _auth_error(exc, rid)
        if spec.ratelimit is not None:
            refused = await self._rate_limit(route, spec.ratelimit, client, identity, request,
                                             rid, info)
            if refused is not None:
                return refused
        upstream = self.balancer.pick(route)
        if upstream is None:
            return error_response(
                503, "no_replica", f"route {route.name!r} has no healthy replica right now", rid,
                {"Retry-After": str(self.settings.retry_after)})
        limit = self.settings.max_body_size if spec.max_body is None else spec.max_body
        length = request.content_length
        if limit and length is not None and length > limit:
            return error_response(413, "body_too_large",
                                  f"request body of {length} bytes exceeds the limit of {limit}",
                                  rid, {"Connection": "close"})
        fwd_path = strip_prefix(path, prefix) if spec.strip_prefix else path
        if spec.rewrite is not None:
            try:
                fwd_path = spec.rewrite.apply(fwd_path)
            except PathError as exc:
                return error_response(400, "bad_rewrite", str(exc), rid)
        if spec.add_prefix:
            fwd_path = spec.add_prefix + fwd_path
        auth: tuple[str, str] | None = None
        if identity is not None:
            auth = (identity.subject, " ".join(identity.scopes))
            if _CONTROL.search(auth[0]) or _CONTROL.search(auth[1]):
                # A signed token can still carry CR/LF in sub or scope: never a header.
                return error_response(401, "invalid_token", "the token's sub or scope holds "
                                      "control characters", rid,
                                      {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        hop = h.HopInfo(peer, client, "https" if secure else "http", rid, trusted_peer)
        raw_headers = request.raw_headers
        if authority is not None:  # the replica gets the target's authority as its Host
            raw_headers = (*(p for p in raw_headers if p[0].lower() != b"host"),
                           (b"Host", authority.encode()))
        websocket = _is_websocket(request)
        if spec.request_headers or websocket:
            hdrs = h.upstream_request_headers(raw_headers, hop)
            if spec.request_headers:
                spec.request_headers.apply(hdrs)
            if auth is not None:
                hdrs["X-Auth-Subject"], hdrs["X-Auth-Scopes"] = auth
            if websocket:
                return await self._websocket(request, route, upstream, fwd_path, query, hdrs,
                                             rid, info)
            head = h.UpstreamHead.of(hdrs)
        else:  # no rules: straight from the client's header bytes to the replica's
            head = h.upstream_head(raw_headers, hop, auth)
        body: _CountedBody | None = None
        if request.body_exists:
            if request.headers.get("Expect", "").lower() == "100-continue":
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = _CountedBody(request.content, limit)
        tried: list[Upstream] = []
        target = fwd_path + "?" + query if query else fwd_path
        balancer = self.balancer
        while True:
            tried.append(upstream)
            info["upstream"] = upstream.address
            current = upstream
            balancer.acquire(current)
            try:
                response = await self._attempt(request, route, current, target, head, body,
                                               rid, info)
            except _UpstreamFailed as failure:
                info["error"] = failure.code
                if failure.code not in ("body_too_large", "client_timeout"):
                    self.metrics.upstream_errors.labels(route.name, failure.code).inc()
                if failure.code in _EJECTING:
                    self._eject(route, current, failure)
                nxt = self._next_upstream(route, tried, request.method, body, failure)
                if nxt is None:
                    return failure.response(route, body, rid, limit)
                info["retries"] = info.get("retries", 0) + 1
                upstream = nxt
            else:
                balancer.succeeded(current)
                return response
            finally:
                balancer.release(current)

    async def _rate_limit(self, route: Route, spec: RateLimitSpec, client: str,
                          identity: Identity | None, request: web.BaseRequest, rid: str,
                          info: dict[str, Any]) -> web.Response | None:
        """Take a token; the refusal to answer with, or None to go on."""
        key = client_key(spec, ip=client, subject=identity.subject if identity else None,
                         headers=request.headers)
        limiter = self.limiter
        if isinstance(limiter, InMemoryLimiter):  # in-memory buckets: no coroutine per request
            decision = limiter.take(route.name, spec, key, time.monotonic())
        else:
            decision = await limiter.hit(route.name, spec, key)
        info.setdefault("extra_headers", {}).update(ratelimit_headers(spec, decision))
        if decision.allowed:
            return None
        if decision.error is not None:
            info["error"] = "ratelimit_unavailable"
            return error_response(503, "ratelimit_unavailable",
                                  f"rate limit of route {route.name!r} cannot be checked: "
                                  f"{decision.error}", rid)
        info["error"] = "rate_limited"
        self.metrics.ratelimited.labels(route.name).inc()
        return error_response(429, "rate_limited",
                              f"rate limit of route {route.name!r} exceeded "
                              f"({spec.limit} per {spec.period:g}s); retry later", rid)

    def _eject(self, route: Route, upstream: Upstream, failure: _UpstreamFailed) -> None:
        seconds = self.balancer.failed(upstream)
        self.metrics.ejections.labels(route.name).inc()
        self._events.warning("replica_ejected", route=route.name, replica=upstream.name,
                             address=upstream.address, reason=failure.code,
                             detail=failure.detail or None, for_s=seconds)

    def _next_upstream(self, route: Route, tried: list[Upstream], method: str,
                       body: _CountedBody | None, failure: _UpstreamFailed) -> Upstream | None:
        """Another replica to try, when retrying is safe and tries are left."""
        retries = route.spec.retries
        if len(tried) > (self.settings.retries if retries is None else retries):
            return None
        # After sending, the replica may have acted on the request: only idempotent requests
        # whose body we have not consumed can go again.
        if not failure.before_send and (
            method not in _IDEMPOTENT or (body is not None and body.seen)
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
                raise _UpstreamFailed("upstream_tls_error", True,
                                      f"cannot load gateway.tls.ca={spec.tls_ca!r}: {exc}") from None
            ctx.set_alpn_protocols(["http/1.1"])
            if not spec.tls_verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self._ssl_contexts[key] = ctx
        return ctx

    def _endpoint(self, upstream: Upstream, spec: RouteSpec) -> Endpoint:
        if upstream.scheme != "https":
            return Endpoint(upstream.host, upstream.port)
        return Endpoint(upstream.host, upstream.port, self._tls_context(spec),
                        spec.tls_server_name)

    async def _attempt(
        self,
        request: web.BaseRequest,
        route: Route,
        upstream: Upstream,
        target: str,
        head: h.UpstreamHead,
        body: _CountedBody | None,
        rid: str,
        info: dict[str, Any],
    ) -> web.StreamResponse:
        """One try against one replica; raises _UpstreamFailed while nothing reached the client."""
        spec = route.spec
        method = request.method
        chunked = body is not None and not head.has_length
        try:
            endpoint = self._endpoint(upstream, spec)
            resp = await self._pool.request(
                endpoint, head.serialize(method, target, upstream.address, chunked), method,
                body.stream() if body is not None else None, chunked,
                connect_timeout=spec.connect_timeout, read_timeout=spec.read_timeout,
                idempotent=method in _IDEMPOTENT)
        except BodyTooLarge:
            raise _UpstreamFailed("body_too_large", False) from None
        except UpstreamError as exc:
            raise _UpstreamFailed(exc.code, exc.before_send, exc.detail) from None
        try:
            status = resp.status
            whole = None if spec.compress else resp.complete_body()
            extra = info.get("extra_headers")
            if (whole is not None and not spec.response_headers and method != "HEAD"
                    and status not in _EMPTY_BODY and not (extra and "Vary" in extra)
                    and resp.content_length in (None, len(whole))):
                # The common case: a small answer is all here and nothing rewrites its headers.
                # Serialise head and body straight from the replica's bytes in one write.
                return await _write_whole(request, status, h.response_head(
                    request.version, status, resp.reason, resp.raw_headers, rid, extra,
                    len(whole), request.keep_alive), whole, info)
            headers = h.downstream_from_raw(resp.raw_headers)
            headers["X-Request-ID"] = rid
            if spec.response_headers:
                spec.response_headers.apply(headers)
            if extra:
                _merge_headers(headers, extra)
            gzip = spec.compress and should_compress(
                method, resp.status, headers, request.headers.get("Accept-Encoding", ""),
                resp.content_length)
            if gzip:
                headers["Content-Encoding"] = "gzip"
                _add_vary(headers, "Accept-Encoding")
                # Another representation: its validators must not match the identity bytes.
                etag = headers.get("ETag")
                if etag is not None and not etag.startswith("W/"):
                    headers["ETag"] = "W/" + etag
                headers.popall("Accept-Ranges", None)
            elif spec.compress:
                _add_vary(headers, "Accept-Encoding")
            if whole is None and spec.compress and not gzip:
                whole = resp.complete_body()
            if whole is not None and method != "HEAD" and (
                    resp.content_length is None or resp.content_length == len(whole)):
                # Small response already here, headers rewritten: one write for head and body.
                info["bytes"] = len(whole)
                return web.Response(status=resp.status, reason=resp.reason, body=whole,
                                    headers=headers)
            out = web.StreamResponse(status=resp.status, reason=resp.reason, headers=headers)
            if whole is not None and method == "HEAD":
                if resp.content_length is not None:
                    out.content_length = resp.content_length
                return await _send_head(out, request, info)
            if not gzip and resp.content_length is not None:
                out.content_length = resp.content_length
            try:
                await out.prepare(request)
            except ConnectionError:
                info["error"] = "client_aborted"
                return out
            sent = 0
            compressor = gzip_compressor() if gzip else None
            try:
                async for chunk in resp.iter_body():
                    if compressor is not None:
                        chunk = compressor.compress(chunk)
                        if not chunk:
                            continue
                    await out.write(chunk)
                    sent += len(chunk)
                if compressor is not None:
                    tail = compressor.flush()
                    await out.write(tail)
                    sent += len(tail)
            except UpstreamError as exc:
                # Headers are out: the only honest signal left is to cut the connection
                # so the client does not take a truncated body for a whole one.
                info["bytes"] = sent
                info["error"] = "upstream_aborted: " + exc.code
                if request.transport is not None:
                    request.transport.abort()
                return out
            except ConnectionError:
                info["bytes"] = sent
                info["error"] = "client_aborted"
                return out
            info["bytes"] = sent
            await out.write_eof()
            return out
        finally:
            resp.release()

    async def _websocket(
        self,
        request: web.BaseRequest,
        route: Route,
        upstream: Upstream,
        path: str,
        query: str,
        hdrs: CIMultiDict[str],
        rid: str,
        info: dict[str, Any],
    ) -> web.StreamResponse:
        protocols = [p.strip() for v in request.headers.getall("Sec-WebSocket-Protocol", ())
                     for p in v.split(",") if p.strip()]
        limit = self.settings.ws_max_message
        # No permessage-deflate towards the client: a tiny compressed frame could inflate to
        # gigabytes before the size limit saw it.
        ws = web.WebSocketResponse(autoclose=False, autoping=False, max_msg_size=limit,
                                   compress=False)
        if not ws.can_prepare(request).ok:  # a malformed handshake: refuse before upstream
            return error_response(400, "bad_websocket_handshake",
                                  "the WebSocket upgrade request is malformed", rid)
        for name in list(hdrs):
            if name.lower().startswith("sec-websocket-"):
                del hdrs[name]
        scheme = "wss" if upstream.scheme == "https" else "ws"
        url = URL.build(scheme=scheme, host=upstream.host, port=upstream.port, path=path,
                        query_string=query, encoded=True)
        try:
            up = await self._session.ws_connect(url, headers=hdrs, protocols=protocols,
                                                autoclose=False, autoping=False,
                                                max_msg_size=limit, compress=0)
        except aiohttp.WSServerHandshakeError as exc:
            return error_response(502, "upstream_websocket_refused",
                                  f"replica of route {route.name!r} refused the WebSocket "
                                  f"upgrade with {exc.status}", rid)
        except aiohttp.ClientError as exc:
            return error_response(502, "upstream_unreachable",
                                  f"replica of route {route.name!r} unreachable: "
                                  f"{type(exc).__name__}", rid)
        except TimeoutError:
            return error_response(504, "upstream_timeout",
                                  f"replica of route {route.name!r} timed out", rid)
        ws = web.WebSocketResponse(protocols=[up.protocol] if up.protocol else (),
                                   autoclose=False, autoping=False, max_msg_size=limit,
                                   compress=False)
        ws.headers["X-Request-ID"] = rid
        extra = info.get("extra_headers")
        if extra:
            ws.headers.update(extra)
        try:
            await ws.prepare(request)
            await _pump_both(ws, up)
        finally:
            await up.close()
            if not ws.closed:
                await ws.close()
        return ws


class _Written(web.StreamResponse):
    """A response whose head and body are already on the wire (see `_write_whole`).

    aiohttp's request loop still calls prepare() and write_eof() and then reads keep_alive;
    there is nothing left for them to do."""

    def __init__(self, status: int, keep_alive: bool) -> None:
        super().__init__(status=status)
        self._written_keep_alive = keep_alive

    @property
    def prepared(self) -> bool:
        return True

    @property
    def keep_alive(self) -> bool:
        return self._written_keep_alive

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


async def _write_whole(request: web.BaseRequest, status: int, head: bytes, body: bytes,
                       info: dict[str, Any]) -> web.StreamResponse:
    """Write a complete small response in one send; wait only if the client is not reading."""
    keep_alive = request.keep_alive
    transport = request.transport
    if transport is None or transport.is_closing():
        info["error"] = "client_aborted"
        return _Written(status, False)
    transport.write(head + body)
    if transport.get_write_buffer_size() > _WRITE_WAIT:
        try:
            await request.writer.drain()
        except ConnectionError:
            info["error"] = "client_aborted"
            return _Written(status, False)
    info["bytes"] = len(body)
    return _Written(status, keep_alive)


def _refuse(request: web.BaseRequest, refused: Refusal, rid: str,
            info: dict[str, Any]) -> web.StreamResponse:
    """The proxy's own answer to a request `requestcheck` refused."""
    info["error"] = refused.code
    if request.version[:1] != (1,):
        # aiohttp would answer in the request's version ("HTTP/2.0 505"): write HTTP/1.1
        # ourselves and close.
        body = json.dumps({"error": {"status": refused.status, "code": refused.code,
                                     "message": refused.message, "request_id": rid}}).encode()
        head = (f"HTTP/1.1 {refused.status} {HTTPStatus(refused.status).phrase}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                f"X-Request-ID: {rid}\r\nCache-Control: no-store\r\nConnection: close\r\n"
                "\r\n").encode()
        transport = request.transport
        if transport is not None and not transport.is_closing():
            transport.write(head + body)
        return _Written(refused.status, False)
    resp = error_response(refused.status, refused.code, refused.message, rid,
                          {"Connection": "close"} if refused.close else None)
    if refused.close:
        resp.force_close()
    return resp


async def _send_head(out: web.StreamResponse, request: web.BaseRequest,
                     info: dict[str, Any]) -> web.StreamResponse:
    try:
        await out.prepare(request)
        await out.write_eof()
    except ConnectionError:
        info["error"] = "client_aborted"
    return out


def _merge_headers(headers: CIMultiDict[str], extra: dict[str, str]) -> None:
    """Add our headers; Vary is merged with the backend's, never replaced."""
    for name, value in extra.items():
        if name == "Vary":
            for token in value.split(","):
                _add_vary(headers, token.strip())
        else:
            headers[name] = value


def _semicolon_confusion(table: RouteTable, host: str, path: str,
                         found: tuple[Route, str] | None) -> bool:
    """True when ';' path parameters could make us route one path and a backend serve another
    (a different route once the parameters are stripped, or any protected route)."""
    stripped = "/".join(seg.split(";", 1)[0] for seg in path.split("/"))
    other = table.match(host, stripped)
    if found is not None and found[0].spec.auth is not None:
        return True
    if other is not None and other[0].spec.auth is not None:
        return True
    return (other[0] if other else None) is not (found[0] if found else None)


def _add_vary(headers: CIMultiDict[str], name: str) -> None:
    """Add one token to Vary, keeping every token (and line) the backend sent."""
    tokens = [t.strip() for v in headers.getall("Vary", ()) for t in v.split(",")
              if t.strip()]
    if "*" in tokens or name.lower() in {t.lower() for t in tokens}:
        return
    headers["Vary"] = ", ".join([*tokens, name])


def _auth_error(exc: AuthFailure, rid: str) -> web.Response:
    challenge = exc.www_authenticate()
    code = exc.error or "auth_unavailable"
    return error_response(exc.status, code, exc.description, rid,
                          {"WWW-Authenticate": challenge} if challenge else None)


def _is_websocket(request: web.BaseRequest) -> bool:
    if request.headers.get("Upgrade", "").lower() != "websocket":
        return False
    return "upgrade" in h.connection_tokens(request.headers)


WS = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


async def _pump(src: WS, dst: WS) -> None:
    # receive(), not `async for`: iteration ends before yielding CLOSE, losing its code/reason.
    while True:
        msg = await src.receive()
        if msg.type == WSMsgType.TEXT:
            await dst.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await dst.send_bytes(msg.data)
        elif msg.type == WSMsgType.PING:
            await dst.ping(msg.data)
        elif msg.type == WSMsgType.PONG:
            await dst.pong(msg.data)
        elif msg.type == WSMsgType.CLOSE:
            await dst.close(code=msg.data or 1000, message=(msg.extra or "").encode())
            return
        else:  # CLOSING, CLOSED, ERROR: the other side is gone without a close frame
            if not dst.closed:
                await dst.close()
            return


async def _pump_both(client: web.WebSocketResponse, up: aiohttp.ClientWebSocketResponse) -> None:
    tasks = [asyncio.ensure_future(_pump(client, up)), asyncio.ensure_future(_pump(up, client))]
    try:
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        # Give the other direction a moment to deliver the close handshake.
        if pending:
            await asyncio.wait(pending, timeout=2)
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
