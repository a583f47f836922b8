"""The protocol-neutral request the pipeline reads, the state one request carries through it,
and the proxy's own answers (refusals and local replies) before a front turns them into bytes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from multidict import CIMultiDict

from edgeproxy.core.headers import Headers, RawHeaders, downstream_from_raw
from edgeproxy.routes.transform import HeaderRules, gzip_compressor, should_compress

if TYPE_CHECKING:
    from edgeproxy.telemetry.tracing import ServerTrace


class RequestView(Protocol):
    """What every front (HTTP/1.1 on aiohttp, HTTP/2 on h2) tells the pipeline about a request.

    `target` is the request target as the client sent it (origin or absolute form);
    `raw_headers` are the client's header bytes (an HTTP/2 front puts `:authority` as Host)."""

    @property
    def method(self) -> str: ...

    @property
    def target(self) -> str: ...

    @property
    def headers(self) -> Headers: ...

    @property
    def raw_headers(self) -> RawHeaders: ...

    @property
    def peer(self) -> str | None: ...

    @property
    def secure(self) -> bool: ...

    @property
    def protocol(self) -> str: ...

    @property
    def has_body(self) -> bool: ...

    @property
    def content_length(self) -> int | None: ...

    def body(self) -> AsyncIterator[bytes]: ...


class ReplicaResponse(Protocol):
    """A replica's answer as a front's `relay` reads it, whatever the protocol to the replica
    (HTTP/1.1 pool: `upstream.UpstreamResponse`; HTTP/2 pool: `upstream_h2.H2Response`)."""

    @property
    def status(self) -> int: ...

    @property
    def reason(self) -> str: ...

    @property
    def raw_headers(self) -> RawHeaders: ...

    @property
    def content_length(self) -> int | None: ...

    @property
    def trailers(self) -> RawHeaders | None:
        """Trailers, once the body was read to its end (None from HTTP/1.1 replicas)."""

    def failure(self) -> BaseException | None: ...

    def complete_body(self) -> bytes | None: ...

    def iter_body(self) -> AsyncIterator[bytes]: ...

    def release(self) -> None: ...


@dataclass(slots=True)
class Refusal:
    """The proxy's own error answer: the JSON error shape, with `code` from the README's table."""

    status: int
    code: str
    message: str
    headers: Mapping[str, str] | None = None
    route: str | None = None  # the route it was refused on, for the access log


@dataclass(slots=True)
class LocalAnswer:
    """An answer the proxy gives itself that is not an error: a redirect, a CORS preflight,
    an ACME challenge."""

    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    content_type: str | None = None
    route: str | None = None
    reason: str | None = None  # a reason phrase other than the status's standard one


@dataclass(slots=True)
class Exchange:
    """The state of one request as it goes through the pipeline, read by the access log and
    metrics at the end: one typed object instead of a dict."""

    rid: str
    status: int = 500  # set by the front as it answers
    route: str | None = None
    upstream: str | None = None
    client: str | None = None
    bytes: int = 0  # response body bytes sent to the client
    request_bytes: int = 0  # request body bytes read from the client
    error: str | None = None
    retries: int = 0
    # Headers of ours that every answer to this request carries (HSTS, CORS, RateLimit).
    extra_headers: dict[str, str] | None = None
    # The route's response-header rules, applied once to whatever answer the client gets.
    rules: HeaderRules | None = None
    # gRPC calls: the grpc-status the client got (the replica's, or the proxy's refusal's).
    grpc_status: int | None = None
    # The request's server span while tracing is on (edgeproxy.telemetry.tracing), else None.
    trace: ServerTrace | None = None

    def finish(self, headers: CIMultiDict[str]) -> None:
        """The route's response rules, then our own headers: once per answer, every front."""
        if self.rules is not None:
            self.rules.apply(headers)
        if self.extra_headers:
            merge_headers(headers, self.extra_headers)

    def add_headers(self, headers: Mapping[str, str]) -> None:
        """Add headers that every answer to this request will carry."""
        if self.extra_headers is None:
            self.extra_headers = dict(headers)
        else:
            self.extra_headers.update(headers)


def merge_headers(headers: CIMultiDict[str], extra: Mapping[str, str]) -> None:
    """Add our headers to an answer's; Vary is merged with the backend's, never replaced."""
    for name, value in extra.items():
        if name == "Vary":
            for token in value.split(","):
                add_vary(headers, token.strip())
        else:
            headers[name] = value


def add_vary(headers: CIMultiDict[str], name: str) -> None:
    """Add one token to Vary, keeping every token (and line) the backend sent."""
    tokens = [t.strip() for v in headers.getall("Vary", ()) for t in v.split(",")
              if t.strip()]
    if "*" in tokens or name.lower() in {t.lower() for t in tokens}:
        return
    headers["Vary"] = ", ".join([*tokens, name])


def answer_headers(raw: RawHeaders, ex: Exchange, compress: bool, method: str, status: int,
                   accept_encoding: str, length: int | None) -> tuple[CIMultiDict[str], bool]:
    """The client's headers for a replica's answer (filtered, X-Request-ID, rules and ours
    applied once) and whether its body is gzipped on the way: the same for every front."""
    headers = downstream_from_raw(raw)
    headers["X-Request-ID"] = ex.rid
    ex.finish(headers)
    gzip = compress and should_compress(method, status, headers, accept_encoding, length)
    if gzip:
        headers["Content-Encoding"] = "gzip"
        add_vary(headers, "Accept-Encoding")
        # Another representation: its validators must not match the identity bytes.
        etag = headers.get("ETag")
        if etag is not None and not etag.startswith("W/"):
            headers["ETag"] = "W/" + etag
        headers.popall("Accept-Ranges", None)
    elif compress:
        add_vary(headers, "Accept-Encoding")
    return headers, gzip


async def encoded_body(chunks: AsyncIterator[bytes], gzip: bool) -> AsyncIterator[bytes]:
    """The replica's body as the client gets it: as is, or gzipped piece by piece."""
    if not gzip:
        async for chunk in chunks:
            yield chunk
        return
    compressor = gzip_compressor()
    async for chunk in chunks:
        out = compressor.compress(chunk)
        if out:
            yield out
    yield compressor.flush()
