"""A gRPC replica for the benchmark: `test.Echo/Unary` echoes its request (no generated code).

    python bench/grpc_echo.py PORT
"""

from __future__ import annotations

import sys
from concurrent import futures

import grpc


def main() -> None:
    """Serve until killed."""
    port = int(sys.argv[1])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(
            lambda request, _context: request,
            request_deserializer=lambda b: b, response_serializer=lambda b: b)}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"grpc echo on {port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
