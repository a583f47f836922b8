"""The access line's fast path renders what structlog's pipeline renders for the same event."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

from edgeproxy.core import logs


def _record(worker: Any, path: str = "/orders/1") -> dict[str, Any]:
    # The shape the pipeline builds (edgeproxy/proxy/pipeline.py, Proxy.run).
    return {"logger": "access", "worker": worker, "method": "GET", "path": path,
            "status": 200, "route": "orders", "upstream": "10.0.0.5:8080", "bytes": 20,
            "duration_ms": 1.234, "request_id": "abc", "client": "192.0.2.1", "error": None,
            "retries": 0, "protocol": None, "grpc_status": None,
            "event": "access", "level": "info"}


@pytest.fixture
def lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The access lines written, as (raw bytes lines)."""
    out = tmp_path / "out"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT)
    monkeypatch.setattr(logs, "_access_sink", logs.BufferedLines(fd))

    def read() -> list[bytes]:
        logs.flush_access_log()
        return out.read_bytes().splitlines()

    yield read
    os.close(fd)


@pytest.mark.parametrize("context", [{}, {"worker": 3}])
def test_the_fast_line_is_structlogs_line(lines: Any, context: dict[str, Any]) -> None:
    fields = {k: v for k, v in _record(None).items()
              if k not in ("logger", "worker", "event", "level")}
    logs.access_logger("json", **context).info("access", **fields)
    logs.fast_access_logger("json", **context).emit(_record(context.get("worker")))
    slow, fast = (json.loads(line) for line in lines())
    # Same fields in the same order; only the timestamps differ.
    assert list(fast) == list(slow)
    assert {**fast, "timestamp": ""} == {**slow, "timestamp": ""}
    assert ("worker" in fast) == bool(context)


def test_the_timestamp_is_iso_utc_with_microseconds(lines: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    log = logs.fast_access_logger("json")
    # 2026-12-04T21:00:05.000042Z: leading zeros kept in the fraction
    at = 1796418005 * 1_000_000_000 + 42_000
    monkeypatch.setattr(time, "time_ns", lambda: at)
    log.emit(_record(None))
    monkeypatch.setattr(time, "time_ns", lambda: at + 999_950_000)
    log.emit(_record(None))
    monkeypatch.setattr(time, "time_ns", lambda: at + 1_000_000_000)  # the next second
    log.emit(_record(None))
    stamps = [json.loads(line)["timestamp"] for line in lines()]
    assert stamps == ["2026-12-04T21:00:05.000042Z", "2026-12-04T21:00:05.999992Z",
                      "2026-12-04T21:00:06.000042Z"]


def test_the_real_clock_gives_structlogs_format(lines: Any) -> None:
    logs.fast_access_logger("json").emit(_record(None))
    stamp = json.loads(lines()[0])["timestamp"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp)
    parsed = time.mktime(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    assert abs(parsed - time.time()) < 5


def test_a_long_line_is_cut_to_one_atomic_write(lines: Any) -> None:
    logs.fast_access_logger("json", worker=1).emit(_record(1, "/" + "x" * 10_000))
    (line,) = lines()
    assert len(line) <= logs.MAX_LINE
    event = json.loads(line)
    assert event["truncated"] is True and "[cut " in event["path"]
    assert event["route"] == "orders" and event["worker"] == 1


def test_the_console_format_goes_through_structlog(lines: Any) -> None:
    logs.fast_access_logger("console", worker=2).emit(_record(2))
    (line,) = lines()
    text = line.decode()
    assert "access" in text and "path=/orders/1" in text and "status=200" in text
    assert "worker=2" in text and text.count("worker=") == 1
