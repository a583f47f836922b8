"""A dummy OTLP/HTTP trace collector for bench/run.py: accepts every POST, keeps nothing.

It answers like a collector (200, an empty protobuf response) and counts export requests and
bytes, so the `otel` row can say the spans really left the proxy. GET / answers the counts.

Run: python bench/collector.py PORT
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

STATS = {"exports": 0, "bytes": 0}


class Handler(BaseHTTPRequestHandler):
    """POST: swallow the body, count it; GET: the counts as JSON."""

    protocol_version = "HTTP/1.1"  # keep-alive, as a real collector

    def do_POST(self) -> None:
        size = int(self.headers.get("Content-Length", "0"))
        self.rfile.read(size)
        STATS["exports"] += 1
        STATS["bytes"] += size
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        body = json.dumps(STATS).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
