"""edgeproxy.telemetry.tracing without a network: when tracing is on, which OTEL_* values are refused at
start, the bounded export queue and what it counts, and the SDK staying unloaded when off."""

from __future__ import annotations

import subprocess
import sys
import threading
from typing import Any

import pytest
from helpers import ROOT, wait_for
from opentelemetry.sdk.trace.export import SpanExportResult

from edgeproxy.core.settings import SettingsError
from edgeproxy.telemetry import tracing

ON = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}


@pytest.mark.parametrize(("env", "on"), [
    ({}, False),
    (ON, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, True),
    ({**ON, "OTEL_SDK_DISABLED": "true"}, False),
    ({**ON, "OTEL_TRACES_EXPORTER": "none"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, False),
])
def test_tracing_is_on_only_with_an_endpoint(env: dict[str, str], on: bool) -> None:
    assert tracing.enabled(env) is on


@pytest.mark.parametrize(("env", "variable", "message"), [
    ({**ON, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "OTEL_EXPORTER_OTLP_PROTOCOL",
     "opentelemetry-exporter-otlp-proto-grpc, is not installed"),
    ({**ON, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"},
     "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "expected http/protobuf"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"}, "OTEL_EXPORTER_OTLP_ENDPOINT",
     "an http:// or https:// URL"),
    ({**ON, "OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER", "one of always_off"),
    ({**ON, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
      "OTEL_TRACES_SAMPLER_ARG": "1.5"}, "OTEL_TRACES_SAMPLER_ARG", "a ratio from 0 to 1"),
    ({**ON, "OTEL_BSP_MAX_QUEUE_SIZE": "0"}, "OTEL_BSP_MAX_QUEUE_SIZE", "a positive whole"),
])
def test_unusable_settings_are_refused_at_start(env: dict[str, str], variable: str,
                                                message: str) -> None:
    with pytest.raises(SettingsError, match=message) as info:
        tracing.check_env(env)
    assert info.value.env == variable


def test_settings_are_not_checked_while_tracing_is_off() -> None:
    tracing.check_env({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_TRACES_SAMPLER": "x"})
    tracing.check_env({**ON, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                       "OTEL_TRACES_SAMPLER_ARG": "0.25", "OTEL_BSP_SCHEDULE_DELAY": "100"})


def test_trace_headers_are_left_out_whatever_their_case() -> None:
    raw = ((b"Host", b"a"), (b"TraceParent", b"00-x"), (b"tracestate", b"k=v"), (b"X", b"1"))
    assert tracing.without_trace_headers(raw) == ((b"Host", b"a"), (b"X", b"1"))


class FakeExporter:
    """Blocks each export until released; answers with `result`."""

    def __init__(self, result: SpanExportResult = SpanExportResult.SUCCESS) -> None:
        self.result = result
        self.release = threading.Event()
        self.exported: list[Any] = []
        self.shut = False

    def export(self, batch: list[Any]) -> SpanExportResult:
        self.release.wait(5)
        self.exported.extend(batch)
        return self.result

    def shutdown(self) -> None:
        self.shut = True


def drops() -> tuple[dict[str, int], Any]:
    counted: dict[str, int] = {}

    def on_drop(reason: str, n: int) -> None:
        counted[reason] = counted.get(reason, 0) + n
    return counted, on_drop


def test_a_stuck_exporter_fills_the_queue_and_drops_are_counted() -> None:
    exporter = FakeExporter()
    counted, on_drop = drops()
    processor = tracing.BoundedBatchProcessor(exporter, on_drop, max_queue=3, batch=2,
                                              delay=0.01)  # type: ignore[arg-type]
    processor.on_end("s1")  # type: ignore[arg-type]
    processor.on_end("s2")  # type: ignore[arg-type]  # a whole batch: the exporter takes it
    wait_for(lambda: not processor._queue, 5, what="the batch taken")
    for n in range(10):  # the exporter hangs: 3 fit, 7 are dropped, none blocks
        processor.on_end(f"t{n}")  # type: ignore[arg-type]
    assert counted == {"queue_full": 7}
    exporter.release.set()
    processor.shutdown(timeout=5)
    assert exporter.exported == ["s1", "s2", "t0", "t1", "t2"]
    assert exporter.shut


def test_spans_of_a_failed_export_are_counted_as_dropped() -> None:
    exporter = FakeExporter(SpanExportResult.FAILURE)
    exporter.release.set()
    counted, on_drop = drops()
    processor = tracing.BoundedBatchProcessor(exporter, on_drop, max_queue=10, batch=4,
                                              delay=0.01)  # type: ignore[arg-type]
    for n in range(3):
        processor.on_end(f"s{n}")  # type: ignore[arg-type]
    wait_for(lambda: counted.get("export_failed") == 3, 5, what="failed spans counted")
    processor.shutdown()


def test_the_sdk_is_not_loaded_while_tracing_is_off() -> None:
    code = ("from edgeproxy.proxy.pipeline import Proxy\n"
            "from edgeproxy.core.settings import load_settings\n"
            "from edgeproxy.routes.table import RouteTable\n"
            "p = Proxy(load_settings({}), lambda: RouteTable())\n"
            "assert p.tracing is None\n"
            "import sys; print(' '.join(sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT, env={"PATH": "/usr/bin:/bin"})
    assert not [m for m in out.stdout.split() if m.startswith("opentelemetry")]
