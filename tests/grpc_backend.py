"""A gRPC replica for tests, with no generated code: generic handlers over raw bytes.

`Echo/Unary` echoes the request (and the `x-echo` metadata as trailing metadata),
`Echo/Split` streams each byte back as its own message (server streaming), `Echo/Join` joins
a stream of requests into one answer (client streaming), `Echo/Chat` answers every message
(bidirectional), `Echo/Sleep` waits the seconds in its request (deadlines, cancellation),
`Echo/Fail` ends with the status named in its request."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager

import grpc

SERVICE = "test.Echo"


def _ident(b: bytes) -> bytes:
    return b


class _State:
    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.sleeping = threading.Event()
        self.calls = 0
        self.metadata: list[dict[str, str]] = []  # each Unary call's metadata, in order
        self.lock = threading.Lock()


def _handlers(state: _State) -> grpc.GenericRpcHandler:
    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        md = dict(context.invocation_metadata())
        with state.lock:
            state.calls += 1
            state.metadata.append({k: str(v) for k, v in md.items()})
        context.set_trailing_metadata((("x-echo", str(md.get("x-echo", ""))),
                                       ("x-authority", str(md.get(":authority", "")))))
        return request

    def split(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for i in range(len(request)):
            yield request[i:i + 1]

    def join(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return b"".join(requests)

    def chat(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for r in requests:
            yield b"re:" + r

    def sleep(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.add_callback(state.cancelled.set)
        state.sleeping.set()
        deadline = time.monotonic() + float(request.decode() or "0")
        while time.monotonic() < deadline and context.is_active():
            time.sleep(0.01)
        return b"slept"

    def fail(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode[request.decode()], "failed as asked")
        return b""  # pragma: no cover - abort raises

    kw = {"request_deserializer": _ident, "response_serializer": _ident}
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, **kw),  # type: ignore[arg-type]
        "Split": grpc.unary_stream_rpc_method_handler(split, **kw),  # type: ignore[arg-type]
        "Join": grpc.stream_unary_rpc_method_handler(join, **kw),  # type: ignore[arg-type]
        "Chat": grpc.stream_stream_rpc_method_handler(chat, **kw),  # type: ignore[arg-type]
        "Sleep": grpc.unary_unary_rpc_method_handler(sleep, **kw),  # type: ignore[arg-type]
        "Fail": grpc.unary_unary_rpc_method_handler(fail, **kw),  # type: ignore[arg-type]
    })


class GrpcBackend:
    """A running gRPC server on 127.0.0.1: `port`, and `state` for what it saw."""

    def __init__(self, port: int, state: _State, server: grpc.Server) -> None:
        self.port = port
        self.state = state
        self.server = server


@contextmanager
def grpc_backend(credentials: grpc.ServerCredentials | None = None,
                 max_message: int = 64 * 1024 * 1024, port: int = 0) -> Iterator[GrpcBackend]:
    """Serve the Echo service in this process (threads) until the block ends."""
    state = _State()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=[
        ("grpc.max_receive_message_length", max_message),
        ("grpc.max_send_message_length", max_message)])
    server.add_generic_rpc_handlers((_handlers(state),))
    if credentials is None:
        port = server.add_insecure_port(f"127.0.0.1:{port}")
    else:
        port = server.add_secure_port(f"127.0.0.1:{port}", credentials)
    server.start()
    try:
        yield GrpcBackend(port, state, server)
    finally:
        server.stop(0).wait()


def method(channel: grpc.Channel, kind: str, name: str) -> grpc.UnaryUnaryMultiCallable:
    """A callable for `Echo/name` of `kind` (unary_unary, unary_stream, ...), bytes in and out."""
    factory = getattr(channel, kind)
    return factory(f"/{SERVICE}/{name}", request_serializer=_ident,  # type: ignore[no-any-return]
                   response_deserializer=_ident)
