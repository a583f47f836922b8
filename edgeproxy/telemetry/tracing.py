"""OpenTelemetry traces of the request pipeline: a server span per request, a client span per
try against a replica, W3C trace context in and out, spans exported in batches over OTLP/HTTP.

Off unless OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set, and then
configured only by the standard OTEL_* variables. The SDK (the `otel` extra) is imported only
when tracing is on: with it off the pipeline pays one `is None` check per request.
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from time import time_ns
from typing import TYPE_CHECKING, Any

from edgeproxy import __version__
from edgeproxy.core.logs import get_logger
from edgeproxy.core.settings import SettingsError
from edgeproxy.telemetry import otlp
from edgeproxy.telemetry.otlp import SpanRecord

if TYPE_CHECKING:
    from multidict import CIMultiDict
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanLimits, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import Span, SpanContext, TraceState

    from edgeproxy.core.headers import RawHeaders
    from edgeproxy.proxy.exchange import Exchange, RequestView
    from edgeproxy.routes.model import Upstream

ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
PROTOCOL_VARS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
SAMPLERS = frozenset(("always_on", "always_off", "traceidratio", "parentbased_always_on",
                      "parentbased_always_off", "parentbased_traceidratio"))
# The batch span processor's variables and the SDK's defaults for them (OTel specification).
BSP_DEFAULTS = {"OTEL_BSP_SCHEDULE_DELAY": 5000, "OTEL_BSP_MAX_QUEUE_SIZE": 2048,
                "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": 512, "OTEL_BSP_EXPORT_TIMEOUT": 30000}
# The HTTP semantic conventions name these methods; any other is "_OTHER" (bounded).
_KNOWN_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS",
                            "TRACE", "PATCH"))
TRACE_HEADERS = frozenset((b"traceparent", b"tracestate"))
DROP_REASONS = ("queue_full", "export_failed")


def enabled(env: Mapping[str, str] = os.environ) -> bool:
    """Tracing is on: an OTLP endpoint is set, and neither OTEL_SDK_DISABLED nor
    OTEL_TRACES_EXPORTER=none turns it off."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return any(env.get(name, "").strip() for name in ENDPOINT_VARS)


def _first(env: Mapping[str, str], names: Sequence[str]) -> tuple[str, str] | None:
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return name, value
    return None


def check_env(env: Mapping[str, str] = os.environ) -> None:
    """Validate the OTEL_* variables tracing reads, at start: a SettingsError names the first
    one that cannot work (the CLI exits 2). Nothing to check while tracing is off."""
    if not enabled(env):
        return
    name, protocol = _first(env, PROTOCOL_VARS) or ("OTEL_EXPORTER_OTLP_PROTOCOL",
                                                    "http/protobuf")
    if protocol == "grpc":
        if importlib.util.find_spec("opentelemetry.exporter.otlp.proto.grpc") is None:
            raise SettingsError(name, protocol, "http/protobuf (the OTLP/gRPC exporter, "
                                "opentelemetry-exporter-otlp-proto-grpc, is not installed)")
    elif protocol != "http/protobuf":
        raise SettingsError(name, protocol, "http/protobuf (or grpc with "
                            "opentelemetry-exporter-otlp-proto-grpc installed)")
    endpoint = _first(env, ENDPOINT_VARS)
    if endpoint is not None and not endpoint[1].startswith(("http://", "https://")):
        raise SettingsError(endpoint[0], endpoint[1], "an http:// or https:// URL")
    needed = ["opentelemetry.sdk"]
    if protocol == "http/protobuf":
        needed.append("opentelemetry.exporter.otlp.proto.http")
    for module in needed:
        if importlib.util.find_spec(module.split(".")[0]) is None or \
                importlib.util.find_spec(module) is None:
            raise SettingsError(endpoint[0] if endpoint else ENDPOINT_VARS[1],
                                endpoint[1] if endpoint else "",
                                f"no endpoint, or the tracing packages installed ({module} is "
                                "missing: pip install 'edgeproxy[otel]')")
    sampler = env.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if sampler and sampler not in SAMPLERS:
        raise SettingsError("OTEL_TRACES_SAMPLER", sampler, "one of " + ", ".join(sorted(SAMPLERS)))
    if sampler.endswith("traceidratio") and env.get("OTEL_TRACES_SAMPLER_ARG", "").strip():
        arg = env["OTEL_TRACES_SAMPLER_ARG"]
        try:
            ratio = float(arg)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            raise SettingsError("OTEL_TRACES_SAMPLER_ARG", arg, "a ratio from 0 to 1")
    for var in BSP_DEFAULTS:
        _bsp(env, var)


def _bsp(env: Mapping[str, str], var: str) -> int:
    raw = env.get(var, "").strip()
    if not raw:
        return BSP_DEFAULTS[var]
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise SettingsError(var, raw, "a positive whole number of "
                            + ("milliseconds" if var.endswith(("DELAY", "TIMEOUT")) else "spans"))
    return value


class _LastProblem(logging.Handler):
    """Keeps the OTel exporter's last warning instead of printing it: a dead collector would
    otherwise write lines per batch and retry to stderr. `trace_export_failed` carries it."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.message = ""

    def emit(self, record: logging.LogRecord) -> None:
        if not self.message or record.levelno == logging.WARNING:  # the cause, not "failed"
            self.message = record.getMessage()[:500]


def _last_problem() -> _LastProblem:
    """The one _LastProblem on the "opentelemetry" logger (added once per process)."""
    otel_log = logging.getLogger("opentelemetry")
    for handler in otel_log.handlers:
        if isinstance(handler, _LastProblem):
            return handler
    handler = _LastProblem()
    otel_log.addHandler(handler)
    otel_log.propagate = False
    return handler


class BoundedBatchProcessor:
    """Spans to the exporter in batches from a background thread, through a bounded queue that
    counts what it drops. `send` takes a batch out (from_env's: encode it and post it, see
    `_sender`); `exporter` is shut down with the processor.

    Why not the SDK's BatchSpanProcessor: it reports drops only through OTel's own metrics
    pipeline (a MeterProvider, behind an internal flag) and a warning log line per dropped span
    on the request path, and it does not count the spans of a batch the exporter failed to
    send. Here a full queue costs one length check and one counter increment, and every span
    that never reaches the collector is counted under a reason ("queue_full", "export_failed").
    """

    def __init__(self, exporter: SpanExporter, on_drop: Callable[[str, int], None],
                 max_queue: int = 2048, batch: int = 512, delay: float = 5.0,
                 timeout: float = 30.0, *,
                 send: Callable[[list[SpanRecord]], bool]) -> None:
        self._exporter = exporter
        self._send = send
        self._on_drop = on_drop
        self._max_queue = max_queue
        self._batch = batch
        self._delay = delay
        self._timeout = timeout
        # append/popleft on a deque are atomic under the GIL: no lock on the request path.
        self._queue: collections.deque[SpanRecord] = collections.deque()
        self._wake = threading.Event()
        self._stopping = False
        self._log = get_logger("tracing")
        self._last_failure_log = 0.0
        self._problem = _last_problem()
        self._thread = threading.Thread(target=self._run, name="edgeproxy-span-export",
                                        daemon=True)
        self._thread.start()

    # SpanProcessor's interface (the SDK calls these).
    def on_start(self, span: Span, parent_context: Any = None) -> None:
        """Nothing to do when a span starts."""

    def _on_ending(self, span: Span) -> None:
        """Nothing to do before a span ends."""

    def on_end(self, span: SpanRecord) -> None:
        """Queue a sampled span for export, or count it dropped when the queue is full."""
        queue = self._queue
        if len(queue) >= self._max_queue or self._stopping:
            self._on_drop("queue_full", 1)
            return
        queue.append(span)
        if len(queue) >= self._batch and not self._wake.is_set():
            self._wake.set()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Export what is queued now (used by tests and at shutdown)."""
        self._export_all(time.monotonic() + timeout_millis / 1000)
        return True

    def shutdown(self, timeout: float = 2.0) -> None:
        """Stop taking spans, send what is queued within `timeout`, stop the thread."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        left = len(self._queue)
        if left:
            self._queue.clear()
            self._on_drop("export_failed", left)
        self._exporter.shutdown()

    def _run(self) -> None:
        while not self._stopping:
            full = self._wake.wait(self._delay)
            self._wake.clear()
            # Woken by a full batch: send whole batches only. Each send holds the GIL while it
            # encodes, and sending a trickle of small batches back to back kept this thread
            # busy and the event loop waiting for the GIL (measured: 0.39x the plain route's
            # req/s at 100 % sampling). On the timer: whatever is there.
            self._export_all(time.monotonic() + self._timeout, partial=0 if full else 1)
        self._export_all(time.monotonic() + self._timeout)

    def _export_all(self, deadline: float, partial: int | None = None) -> None:
        """Send batches until the queue is empty, or `deadline`; with `partial`, send at most
        that many batches smaller than a whole one."""
        queue = self._queue
        size = self._batch
        while queue and time.monotonic() < deadline:
            if partial is not None and len(queue) < size:
                if partial <= 0:
                    return
                partial -= 1
            batch = [queue.popleft() for _ in range(min(self._batch, len(queue)))]
            try:
                ok = self._send(batch)
            except Exception as exc:  # noqa: BLE001 - an exporter bug must not stop the thread
                ok = False
                detail = f"{type(exc).__name__}: {exc}"
            else:
                detail = self._problem.message or "the exporter reported a failure"
            self._problem.message = ""
            if not ok:
                self._on_drop("export_failed", len(batch))
                now = time.monotonic()
                if now - self._last_failure_log > 60:  # one line a minute, not one per batch
                    self._last_failure_log = now
                    self._log.warning("trace_export_failed", spans=len(batch), detail=detail)


class ServerTrace:
    """The tracing state of one request, and the hooks the pipeline calls (`end`,
    `start_client`, `end_client`, `log_fields`, `inject`).

    While the request runs its server span is plain values: ids, start time, attributes. It
    reaches the export queue as plain values too, a SpanRecord, when it ends (see Tracing for
    why it is not an SDK `Span`)."""

    __slots__ = ("_tid", "attributes", "client_headers", "flags", "name", "parent",
                 "recording", "span_id", "start", "state_line", "trace_id", "trace_state",
                 "tracing")

    def __init__(self, tracing: Tracing, trace_id: int, span_id: int, flags: int,
                 trace_state: TraceState | None, parent: SpanContext | None, name: str,
                 attributes: dict[str, Any], recording: bool, client_headers: bool) -> None:
        self.tracing = tracing
        self.trace_id = trace_id
        self.span_id = span_id
        self.flags = flags  # W3C trace flags: sampled (0x01), random trace id (0x02)
        self.trace_state = trace_state
        self.parent = parent  # the client's span (from its traceparent), or None
        self.name = name  # the span's name before the route is known (the method)
        self.attributes = attributes
        self.recording = recording  # sampled: the spans are exported when they end
        self.client_headers = client_headers  # the client sent traceparent or tracestate
        self.start = time_ns()
        self._tid = b"%032x" % trace_id
        self.state_line = (b"tracestate: %s\r\n" % trace_state.to_header().encode(
            "ascii", "replace")) if trace_state else b""

    def header_lines(self, span_id: int) -> bytes:
        """traceparent (and tracestate) header lines naming `span_id` as the parent."""
        return b"traceparent: 00-%s-%016x-%02x\r\n%s" % (self._tid, span_id, self.flags & 0x01,
                                                          self.state_line)

    def end(self, ex: Exchange) -> None:
        """End the server span with what the request came to (route, status, client)."""
        if not self.recording:
            return
        end = time_ns()
        parent = self.parent
        status = ex.status
        attributes = self.attributes
        attributes["http.response.status_code"] = status
        name = self.name
        if ex.route:
            attributes["http.route"] = ex.route
            name = f"{name} {ex.route}"  # semconv: "{method} {route}"
        if ex.client:
            attributes["client.address"] = ex.client
        if ex.retries:
            attributes["edgeproxy.retries"] = ex.retries
        if ex.error:
            attributes["error.type"] = ex.error.split(":", 1)[0]
        self.tracing.finish(name, self.trace_id, self.span_id, self.flags, self.trace_state,
                            0 if parent is None else parent.span_id, parent is not None,
                            attributes, False, status >= 500, self.start, end)

    def start_client(self, method: str, upstream: Upstream, target: str,
                     attempt: int) -> tuple[ClientSpan, bytes]:
        """Start the client span of one try against a replica; its traceparent header lines
        for the request head (they replace the client's).

        A client span is its server span's child: the six samplers OTEL_TRACES_SAMPLER names
        decide it as they decided its parent (parent-based ones follow the local parent,
        always_on/off are constant, traceidratio sees the same trace id), so the server span's
        decision, flags and tracestate are reused rather than asked again."""
        span_id = self.tracing.new_span_id()
        if not self.recording:
            return ClientSpan(span_id, None), self.header_lines(span_id)
        attributes: dict[str, Any] = {
            "http.request.method": method if method in _KNOWN_METHODS else "_OTHER",
            "server.address": upstream.host,
            "server.port": upstream.port,
            "url.full": f"{upstream.scheme}://{upstream.address}{target.partition('?')[0]}",
            "edgeproxy.replica": upstream.name,
        }
        if attempt:
            attributes["http.request.resend_count"] = attempt
        return ClientSpan(span_id, attributes), self.header_lines(span_id)

    def end_client(self, span: ClientSpan, status: int | None, error: str | None) -> None:
        """End a try's span: the replica's status, or the failure that ended the try."""
        attributes = span.attributes
        if attributes is None:  # not sampled
            return
        end = time_ns()
        if status is not None:
            attributes["http.response.status_code"] = status
        if error is not None:
            attributes["error.type"] = error
        self.tracing.finish(attributes["http.request.method"], self.trace_id, span.span_id,
                            self.flags, self.trace_state, self.span_id, False, attributes, True,
                            error is not None or (status is not None and status >= 500),
                            span.start, end)

    def log_fields(self) -> dict[str, str]:
        """trace_id and span_id for the access log (W3C hex forms)."""
        return {"trace_id": self._tid.decode(), "span_id": f"{self.span_id:016x}"}

    def inject(self, headers: CIMultiDict[str]) -> None:
        """This request's own span as traceparent/tracestate (WebSockets, which get no client
        span); the client's were already left out."""
        for line in self.header_lines(self.span_id).decode("ascii").splitlines():
            name, _, value = line.partition(": ")
            headers[name] = value


class ClientSpan:
    """One try's client span while the try runs: its id, start time and attributes (None when
    the request is not sampled)."""

    __slots__ = ("attributes", "span_id", "start")

    def __init__(self, span_id: int, attributes: dict[str, Any] | None) -> None:
        self.span_id = span_id
        self.attributes = attributes
        self.start = time_ns()


class Tracing:
    """The process's span pipeline: the SDK's sampler, id generator, resource and W3C
    propagator, our bounded batch processor in front of the SDK's OTLP exporter, and
    `start_server`, which the pipeline calls per request.

    Why spans are queued as plain values (a SpanRecord) when they end instead of started
    through `Tracer.start_span`: an SDK `Span` is made for code that learns its attributes bit
    by bit and may be touched from several threads. Each one allocates four locks, validates
    every attribute into a `BoundedAttributes`, makes two `BoundedList`s for events and links
    that a proxy never adds, and copies itself into a `ReadableSpan` at `end()`. A request
    knows all of a span's attributes when the span ends, on one thread: measured in-process,
    the two spans of a request cost about 45 us through `Tracer.start_span` and under 10 us
    this way. Everything that decides what goes on the wire stays the SDK's: the sampler from
    OTEL_TRACES_SAMPLER/_ARG decides each server span, the `RandomIdGenerator` makes the ids,
    `TraceContextTextMapPropagator` reads the client's traceparent, the span limits from the
    OTEL_*_LIMIT variables apply through the SDK's `BoundedAttributes` when they could bite;
    the export thread encodes the records with opentelemetry-proto (otlp.SpanEncoder, which
    says why not the SDK's encoder) and the OTLP exporter's client posts them
    (bench/README.md, "Tracing").
    """

    def __init__(self, provider: TracerProvider, processor: BoundedBatchProcessor,
                 limits: SpanLimits) -> None:
        from opentelemetry.attributes import BoundedAttributes
        from opentelemetry.context import Context
        from opentelemetry.sdk.trace.sampling import Decision
        from opentelemetry.trace import SpanKind, get_current_span
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.processor = processor
        self._propagator = TraceContextTextMapPropagator()
        self._current_span = get_current_span
        # A request's only parent is what its client sent: no ambient context is looked up.
        self._no_parent = Context()
        self._sampled = Decision.RECORD_AND_SAMPLE
        self._dropped = Decision.DROP
        self._sampler = provider.sampler
        self._ids = provider.id_generator
        self.new_span_id = provider.id_generator.generate_span_id
        self._random_ids = provider.id_generator.is_trace_id_random()
        self._server_kind = SpanKind.SERVER
        self._on_end = processor.on_end
        # A server span has at most 11 attributes, a client span 7: the SDK's limits (128
        # attributes, no length limit, by default) only matter when they are set lower.
        self._bound: Callable[[dict[str, Any]], Any] | None = None
        if limits.max_span_attribute_length is not None or \
                (limits.max_span_attributes is not None and limits.max_span_attributes < 12):
            self._bound = functools.partial(BoundedAttributes, limits.max_span_attributes,
                                            max_value_len=limits.max_span_attribute_length)

    def start_server(self, view: RequestView) -> ServerTrace:
        """Start the request's server span, a child of the client's traceparent if it sent one.
        The sampler decides here; an unsampled request still gets ids (its traceparent)."""
        headers = view.headers
        method = view.method
        target = view.target
        if not target.startswith("/"):  # absolute form: http://host/path?q
            slash = target.find("/", target.find("//") + 2) if "//" in target else -1
            target = target[slash:] if slash >= 0 else "/"
        known = method in _KNOWN_METHODS
        name = method if known else "_OTHER"
        attributes: dict[str, Any] = {
            "http.request.method": name,
            "url.path": target.partition("?")[0],
            "url.scheme": "https" if view.secure else "http",
            "network.protocol.version": view.protocol.removeprefix("HTTP/"),
        }
        if not known:
            attributes["http.request.method_original"] = method
        host = headers.get("Host")
        if host:
            address = _split_host(host)
            attributes["server.address"] = address[0]
            if address[1] is not None:
                attributes["server.port"] = address[1]
        # What Tracer.start_span does, in its order (opentelemetry.sdk.trace.Tracer).
        parent_context = self._no_parent
        parent: SpanContext | None = None
        client_headers = "traceparent" in headers
        if client_headers:
            parent_context = self._propagator.extract(headers)
            found = self._current_span(parent_context).get_span_context()
            parent = found if found.is_valid else None
        elif "tracestate" in headers:
            client_headers = True
        trace_id = parent.trace_id if parent is not None else self._ids.generate_trace_id()
        result = self._sampler.should_sample(parent_context, trace_id, name, self._server_kind,
                                             attributes)
        decision = result.decision
        flags = 0x01 if decision is self._sampled else 0x00
        if parent.trace_flags.random_trace_id if parent is not None else self._random_ids:
            flags |= 0x02  # W3C level 2's "random" flag, as the SDK sets it
        return ServerTrace(self, trace_id, self.new_span_id(), flags, result.trace_state,
                           parent, name, attributes, decision is not self._dropped,
                           client_headers)

    def finish(self, name: str, trace_id: int, span_id: int, flags: int,
               trace_state: TraceState | None, parent_id: int, parent_remote: bool,
               attributes: dict[str, Any], client: bool, failed: bool, start: int,
               end: int) -> None:
        """Hand one ended span to the export queue, as plain values (a SpanRecord)."""
        self._on_end(SpanRecord(name, trace_id, span_id, flags, trace_state, parent_id,
                                parent_remote, client, failed, start, end,
                                attributes if self._bound is None else self._bound(attributes)))

    def shutdown(self, timeout: float = 2.0) -> None:
        """Send what is queued (bounded by `timeout`) and stop the export thread."""
        self.processor.shutdown(timeout)


def _sender(exporter: SpanExporter, resource: Resource,
            scope: InstrumentationScope) -> Callable[[list[SpanRecord]], bool]:
    """How the export thread sends a batch: encoded by otlp.SpanEncoder and posted by the
    exporter's own client when it has one (OTLP/HTTP); else as the SDK's ReadableSpans through
    `exporter.export` (its encoder, about 7 x the CPU a span)."""
    post = otlp.bytes_sender(exporter)
    if post is not None:
        encode = otlp.SpanEncoder(resource, scope).encode
        return lambda batch: post(encode(batch))
    return lambda batch: exporter.export(
        [record.readable(resource, scope) for record in batch]).name == "SUCCESS"


def _hashed_once(resource: Resource) -> Resource:
    """The same resource, with its hash computed once instead of on every call.

    The SDK's Resource hashes a JSON dump of its attributes each time (6 us here) and the OTLP
    encoder groups the spans of a batch by resource: one hash per span, a sixth of the
    encoding. A Resource never changes after it is made, so the hash cannot go stale."""
    from opentelemetry.sdk.resources import Resource

    value = hash(resource)

    class HashedOnce(Resource):
        def __hash__(self) -> int:
            return value

    return HashedOnce(resource.attributes, resource.schema_url)


_HOSTS: dict[str, tuple[str, int | None]] = {}  # Host header -> (server.address, port)
_HOSTS_MAX = 256  # a client picks the Host: the cache is bounded, emptied when full


def _split_host(host: str) -> tuple[str, int | None]:
    """server.address and server.port from a Host header, remembered: a proxy sees few."""
    found = _HOSTS.get(host)
    if found is None:
        if len(_HOSTS) >= _HOSTS_MAX:
            _HOSTS.clear()
        found = _HOSTS[host] = _parse_host(host)
    return found


def _parse_host(host: str) -> tuple[str, int | None]:
    name, port = host.strip(), None
    if name.startswith("["):
        end = name.find("]")
        rest = name[end + 1:] if end > 0 else ""
        name = name[1:end] if end > 0 else name
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    elif name.count(":") == 1:
        name, _, p = name.partition(":")
        port = int(p) if p.isdigit() else None
    return name.lower(), port


def without_trace_headers(raw: RawHeaders) -> RawHeaders:
    """The client's header bytes less traceparent and tracestate (the replica gets ours)."""
    return tuple(p for p in raw if p[0].lower() not in TRACE_HEADERS)


def from_env(on_drop: Callable[[str, int], None],
             env: Mapping[str, str] = os.environ) -> Tracing | None:
    """The process's Tracing from the OTEL_* variables, or None while tracing is off.

    Call it in each worker process (after fork): the export thread does not survive a fork."""
    if not enabled(env):
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanLimits, TracerProvider
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    resource = Resource.create({"service.version": __version__})
    if not any(env.get(v) for v in ("OTEL_SERVICE_NAME",)) and \
            "service.name=" not in env.get("OTEL_RESOURCE_ATTRIBUTES", ""):
        resource = resource.merge(Resource({"service.name": "edgeproxy"}))
    resource = _hashed_once(resource)
    scope = InstrumentationScope("edgeproxy", __version__)
    _, protocol = _first(env, PROTOCOL_VARS) or ("", "http/protobuf")
    exporter: SpanExporter
    if protocol == "grpc":  # pragma: no cover - needs the optional gRPC exporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found,unused-ignore]
            OTLPSpanExporter as GrpcExporter,
        )
        exporter = GrpcExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    send = _sender(exporter, resource, scope)
    processor = BoundedBatchProcessor(
        exporter, on_drop, max_queue=_bsp(env, "OTEL_BSP_MAX_QUEUE_SIZE"),
        batch=_bsp(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE"),
        delay=_bsp(env, "OTEL_BSP_SCHEDULE_DELAY") / 1000,
        timeout=_bsp(env, "OTEL_BSP_EXPORT_TIMEOUT") / 1000, send=send)
    # The sampler comes from OTEL_TRACES_SAMPLER/_ARG (the SDK reads them; parent-based), the
    # span limits from OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT and the like.
    limits = SpanLimits()
    provider = TracerProvider(resource=resource, shutdown_on_exit=False, span_limits=limits,
                              active_span_processor=processor)  # type: ignore[arg-type]
    get_logger("tracing").info(
        "tracing_enabled", endpoint=(_first(env, ENDPOINT_VARS) or ("", ""))[1],
        protocol=protocol, sampler=env.get("OTEL_TRACES_SAMPLER") or "parentbased_always_on",
        sampler_arg=env.get("OTEL_TRACES_SAMPLER_ARG") or None)
    return Tracing(provider, processor, limits)
