"""Micro-benchmarks of edgeproxy's pure parts: ops/s for reading, never a pass/fail gate.

    .venv/bin/python bench/micro.py [--routes 1000] [--only match,labels] [--json FILE]

Measures route matching against a table of N routes, label parsing, building a table from N
containers, parsing a routes file of N routes, path normalisation and upstream header
building. Each case runs in batches (timeit's autorange) five times; the best batch counts,
as the least disturbed by other work on the machine. A case whose API has changed under it
is reported as failed and the others still run. Not collected by pytest (testpaths = tests).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Run as a script from anywhere: the project root goes first on the path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgeproxy.core.paths import normalize_path
from edgeproxy.routes.labels import LabelsInvalid, parse_labels
from edgeproxy.routes.model import Container, RouteSpec, Upstream
from edgeproxy.routes.table import FileRoute, RouteTable, build_table

Case = tuple[str, Callable[[], object]]


def file_routes(n: int) -> list[FileRoute]:
    """n file routes, one path each; every tenth also bound to a host, as a mix would be."""
    routes = []
    for i in range(n):
        hosts = (f"svc{i}.example.com",) if i % 10 == 0 else ()
        spec = RouteSpec(hosts=hosts, paths=(f"/svc{i:04d}",))
        routes.append(FileRoute(f"svc{i:04d}", spec,
                                (Upstream("http", "127.0.0.1", 9000 + i % 100, f"u{i}"),)))
    return routes


def containers(n: int) -> list[Container]:
    """n running containers as Docker lists them, each with its own path; a few bad labels."""
    out = []
    for i in range(n):
        labels = {
            "com.docker.compose.project": "shop",
            "com.docker.compose.service": f"svc{i:04d}",
            "gateway.path": f"/svc{i:04d},/v1/svc{i:04d}",
            "gateway.strip_prefix": "true",
            "gateway.port": "8080",
        }
        if i % 50 == 0:
            labels["gateway.prot"] = "8080"  # a typo: the container is skipped with an error
        out.append(Container(
            id=f"{i:064x}", name=f"shop-svc{i:04d}-1", labels=labels, state="running",
            health=None, networks=(("shop_default", f"10.1.{i // 250}.{i % 250 + 2}"),),
            exposed_ports=(8080,), created=1_700_000_000.0 + i))
    return out


def routes_file_doc(n: int) -> dict[str, Any]:
    """A parsed routes file of n routes (what tomllib hands to parse_routes)."""
    return {"routes": {f"svc{i:04d}": {"path": f"/svc{i:04d}", "strip_prefix": True,
                                       "upstreams": [f"http://127.0.0.1:{9000 + i % 100}"]}
                       for i in range(n)}}


def cases(n: int) -> dict[str, list[Case]]:
    """Benchmark cases by group; each callable is one operation."""
    table: RouteTable = build_table([], file_routes(n))
    mid = f"/svc{n // 2:04d}/orders/7"
    typo, labels = (c.labels for c in containers(2))  # container 0 has a typo in its labels
    boxes = containers(n)
    groups: dict[str, list[Case]] = {
        "match": [
            (f"match hit, any host ({n} routes)", lambda: table.match("api.example.com", mid)),
            (f"match hit, exact host ({n} routes)",
             lambda: table.match("svc0.example.com", "/svc0000/a/b/c")),
            (f"match miss ({n} routes)", lambda: table.match("api.example.com", "/nope/a/b")),
            (f"match deep path ({n} routes)",
             lambda: table.match("", "/svc0001/" + "/".join("abcdefghij"))),
        ],
        "labels": [
            ("parse_labels (5 labels)", lambda: parse_labels(labels)),
            ("parse_labels with a typo (error path)", lambda: _refused(parse_labels, typo)),
        ],
        "table": [
            (f"build_table ({n} containers)", lambda: build_table(boxes)),
            (f"build_table ({n} file routes)", lambda: build_table([], file_routes(n))),
        ],
        "paths": [
            ("normalize_path /api/orders/7", lambda: normalize_path("/api/orders/7")),
            ("normalize_path with escapes and dots",
             lambda: normalize_path("/api/./v1/%7Euser/../orders//7%2D")),
        ],
    }
    try:
        from edgeproxy.control.providers.files import parse_routes
    except ImportError as exc:
        groups["table"].append((f"parse_routes ({n} routes)", _failed(exc)))
    else:
        doc = routes_file_doc(n)
        groups["table"].append((f"parse_routes ({n} routes)", lambda: parse_routes(doc)))
    groups["headers"] = header_cases()
    return groups


_BROWSER_HEADERS = {
    "Host": "api.example.com", "User-Agent": "Mozilla/5.0", "Accept": "*/*",
    "Accept-Encoding": "gzip, br", "Accept-Language": "en", "Connection": "keep-alive",
    "Cookie": "a=1; b=2", "Referer": "https://example.com/", "X-Forwarded-For": "10.0.0.1",
    "Authorization": "Bearer x.y.z", "Cache-Control": "no-cache", "Keep-Alive": "timeout=5",
}
_REPLICA_HEADERS = [(b"Server", b"nginx/1.22.1"), (b"Date", b"Thu, 26 Nov 2026 04:40:26 GMT"),
                    (b"Content-Type", b"text/plain"), (b"Content-Length", b"20"),
                    (b"Connection", b"keep-alive")]


def header_cases() -> list[Case]:
    """The per-request header work: the replica's request head for a typical browser request
    (from raw bytes: every request; via a multidict: routes with header rules) and the
    client's response head for a small answer."""
    names = ["upstream_head + serialize (12 headers, raw bytes)",
             "upstream_request_headers (12 headers, multidict, for header rules)",
             "response_head (5 replica headers)"]
    try:
        from edgeproxy.core.headers import (
            HopInfo,
            response_head,
            upstream_head,
            upstream_request_headers,
        )
    except ImportError as exc:
        return [(name, _failed(exc)) for name in names]
    raw = [(k.encode(), v.encode()) for k, v in _BROWSER_HEADERS.items()]
    hop = HopInfo("127.0.0.1", "127.0.0.1", "http", "0123456789abcdef", False)

    def raw_head() -> object:
        return upstream_head(raw, hop).serialize("GET", "/api/hello", "127.0.0.1:8080", False)

    def multidict() -> object:
        return upstream_request_headers(raw, hop)

    def answer() -> object:
        return response_head((1, 1), 200, "OK", _REPLICA_HEADERS, "0123456789abcdef", None, 20,
                             True)

    return list(zip(names, (raw_head, multidict, answer), strict=True))


def _refused(fn: Callable[[Any], object], arg: Any) -> object:
    try:
        return fn(arg)
    except LabelsInvalid as exc:
        return exc


def _failed(exc: BaseException) -> Callable[[], object]:
    def raise_it() -> object:
        raise exc

    return raise_it


def measure(fn: Callable[[], object], repeat: int = 5) -> float:
    """Best-of-`repeat` operations per second."""
    timer = timeit.Timer(fn)
    number, _ = timer.autorange()
    best = min(timer.repeat(repeat=repeat, number=number))
    return number / best


def main(argv: list[str] | None = None) -> int:
    """Run the chosen groups and print ops/s and microseconds per operation."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--routes", type=int, default=1000, help="routes/containers in the tables")
    p.add_argument("--only", default="", help="comma-separated groups: match, labels, table, "
                   "paths, headers (default: all)")
    p.add_argument("--json", type=Path, help="also write the results to this file")
    args = p.parse_args(argv)
    groups = cases(args.routes)
    wanted = [g.strip() for g in args.only.split(",") if g.strip()] or list(groups)
    unknown = [g for g in wanted if g not in groups]
    if unknown:
        p.error(f"unknown group {', '.join(unknown)}; choose from {', '.join(groups)}")
    print(f"python {platform.python_version()}, {args.routes} routes; best of 5 batches")
    results = []
    width = max(len(name) for g in wanted for name, _ in groups[g])
    for group in wanted:
        for name, fn in groups[group]:
            try:
                ops = measure(fn)
            except (TypeError, ValueError, AttributeError, ImportError, KeyError) as exc:
                print(f"{name:<{width}}  failed: {type(exc).__name__}: {exc}")
                results.append({"group": group, "case": name, "error": str(exc)})
                continue
            print(f"{name:<{width}}  {ops:>14,.0f} ops/s  {1e6 / ops:>12,.2f} us/op")
            results.append({"group": group, "case": name, "ops_per_s": round(ops, 1),
                            "us_per_op": round(1e6 / ops, 3)})
    if args.json:
        args.json.write_text(json.dumps({"python": platform.python_version(),
                                         "routes": args.routes, "results": results}, indent=2)
                             + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
