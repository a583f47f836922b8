"""A gRPC load generator for the benchmark: `concurrency` unary calls in flight for `seconds`
over one TLS channel (grpcio's asyncio API); prints one JSON line with calls/s and latencies.

    python bench/grpc_load.py HOST:PORT CA_PEM SERVER_NAME SECONDS CONCURRENCY
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time

import grpc


async def run(target: str, ca: bytes, name: str, seconds: float, concurrency: int) -> dict[str, float]:
    creds = grpc.ssl_channel_credentials(root_certificates=ca)
    async with grpc.aio.secure_channel(target, creds, options=[
            ("grpc.ssl_target_name_override", name)]) as channel:
        call = channel.unary_unary("/test.Echo/Unary", request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
        payload = b"0123456789abcdefghij"
        latencies: list[float] = []
        failed = 0
        deadline = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal failed
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                try:
                    await call(payload, timeout=10)
                except grpc.RpcError:
                    failed += 1
                    continue
                latencies.append((time.perf_counter() - t0) * 1000)

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
    latencies.sort()
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {"calls": len(latencies), "failed": failed, "rate": len(latencies) / elapsed,
            "p50_ms": q[49], "p99_ms": q[98]}


def main() -> None:
    """Run and print the result."""
    target, ca, name, seconds, concurrency = sys.argv[1:6]
    with open(ca, "rb") as f:
        pem = f.read()
    print(json.dumps(asyncio.run(run(target, pem, name, float(seconds), int(concurrency)))))


if __name__ == "__main__":
    main()
