"""Tracing setup and the traceparent helpers that carry a trace through PostgreSQL and Redis."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from flowforge_orchestrator.ops import telemetry
from flowforge_orchestrator.ops.telemetry import (
    context_from_traceparent,
    current_traceparent,
    setup_tracing,
    traceparent_of,
    tracer,
)


@pytest.fixture(scope="module")
def _module_exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    telemetry.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()  # stays attached to the global provider, but stops storing spans


@pytest.fixture
def exporter(_module_exporter: InMemorySpanExporter) -> InMemorySpanExporter:
    _module_exporter.clear()
    return _module_exporter


def test_setup_twice_returns_the_same_sdk_provider(exporter: InMemorySpanExporter) -> None:
    first = setup_tracing(service_name="one")
    second = setup_tracing(service_name="two")
    assert first is second
    assert isinstance(first, TracerProvider)
    assert trace.get_tracer_provider() is first
    with tracer().start_as_current_span("after-setup"):
        pass
    assert [s.name for s in exporter.get_finished_spans()] == ["after-setup"]


def test_in_memory_exporter_captures_spans(exporter: InMemorySpanExporter) -> None:
    with tracer().start_as_current_span("outer", attributes={"k": "v"}):
        with tracer().start_as_current_span("inner"):
            pass
    inner, outer = exporter.get_finished_spans()
    assert (inner.name, outer.name) == ("inner", "outer")
    assert inner.parent is not None and outer.context is not None
    assert inner.parent.span_id == outer.context.span_id
    assert outer.attributes == {"k": "v"}
    assert outer.instrumentation_scope is not None
    assert outer.instrumentation_scope.name == "flowforge_orchestrator"


def test_traceparent_round_trip(exporter: InMemorySpanExporter) -> None:
    with tracer().start_as_current_span("parent") as parent:
        tp = traceparent_of(parent)
    # Another process, much later: no span is active, only the stored string.
    with tracer().start_as_current_span("child", context=context_from_traceparent(tp)) as child:
        pass
    parent_ctx = parent.get_span_context()
    flags = parent_ctx.trace_flags
    assert tp == f"00-{parent_ctx.trace_id:032x}-{parent_ctx.span_id:016x}-{flags:02x}"
    assert parent_ctx.trace_flags.sampled
    assert child.get_span_context().trace_id == parent_ctx.trace_id
    finished = {s.name: s for s in exporter.get_finished_spans()}
    child_parent = finished["child"].parent
    assert child_parent is not None
    assert child_parent.span_id == parent_ctx.span_id
    assert child_parent.is_remote


def test_traceparent_of_span_span_context_and_context_agree() -> None:
    with tracer().start_as_current_span("s") as span:
        from_span = traceparent_of(span)
        assert from_span is not None
        assert traceparent_of(span.get_span_context()) == from_span
        assert traceparent_of(trace.set_span_in_context(span)) == from_span
        assert current_traceparent() == from_span


def test_no_traceparent_without_a_valid_span() -> None:
    assert current_traceparent() is None
    assert traceparent_of(trace.INVALID_SPAN) is None
    assert traceparent_of(Context()) is None


@pytest.mark.parametrize(
    "tp",
    [None, "", "garbage", "00-00000000000000000000000000000000-0000000000000000-01"],
)
def test_bad_traceparent_gives_a_root_even_inside_a_span(
    exporter: InMemorySpanExporter, tp: str | None
) -> None:
    with tracer().start_as_current_span("unrelated"):
        with tracer().start_as_current_span("fresh", context=context_from_traceparent(tp)):
            pass
    fresh = next(s for s in exporter.get_finished_spans() if s.name == "fresh")
    assert fresh.parent is None


def test_instrument_asyncpg_is_idempotent(caplog: pytest.LogCaptureFixture) -> None:
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

    # opentelemetry-instrumentation-asyncpg leaves its constructor unannotated.
    instrumentor = AsyncPGInstrumentor()  # type: ignore[no-untyped-call]
    try:
        with caplog.at_level(logging.WARNING):
            telemetry.instrument_asyncpg()
            telemetry.instrument_asyncpg()
        assert instrumentor.is_instrumented_by_opentelemetry
        assert "already instrumented" not in caplog.text
    finally:
        instrumentor.uninstrument()


# Process-wide behaviour (environment, exporters, shutdown) runs in a fresh interpreter:
# the global provider of this one can be set only once.

_SCRIPT = """
from flowforge_orchestrator.ops import telemetry
telemetry.setup_tracing(service_name="from-code", console=True)
telemetry.setup_tracing(service_name="from-code", console=True)
with telemetry.tracer().start_as_current_span("probe"):
    pass
telemetry.shutdown_tracing()
"""


def _run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def _console_spans(stderr: str) -> list[dict[str, object]]:
    # ConsoleSpanExporter prints one pretty-printed JSON object per span.
    decoder = json.JSONDecoder()
    spans, pos = [], 0
    while (start := stderr.find("{", pos)) != -1:
        obj, pos = decoder.raw_decode(stderr, start)
        spans.append(obj)
    return spans


def test_console_exporter_once_and_otel_service_name_wins() -> None:
    proc = _run({"OTEL_SERVICE_NAME": "from-env"})
    spans = _console_spans(proc.stderr)
    assert [s["name"] for s in spans] == ["probe"]  # two setups, one console processor
    resource = spans[0]["resource"]
    assert isinstance(resource, dict)
    assert resource["attributes"]["service.name"] == "from-env"
    assert proc.stdout == ""


def test_sdk_disabled_records_nothing() -> None:
    proc = _run({"OTEL_SDK_DISABLED": "true"})
    assert _console_spans(proc.stderr) == []


class _Collector(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, str | None, int]]] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", "0"))
        self.rfile.read(length)
        self.received.append((self.path, self.headers.get("content-type"), length))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_otlp_exporter_when_endpoint_is_set_and_flushed_at_shutdown() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        _run({"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert len(_Collector.received) == 1
    path, content_type, length = _Collector.received[0]
    assert (path, content_type) == ("/v1/traces", "application/x-protobuf")
    assert length > 0


_CONFIGURE = """
import sys
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from flowforge_orchestrator.ops import telemetry
telemetry.configure(service_name="daemon", console=sys.argv[1] == "console")
print(AsyncPGInstrumentor().is_instrumented_by_opentelemetry)
"""


@pytest.mark.parametrize(("console", "instrumented"), [(False, "False"), (True, "True")])
def test_queries_are_traced_only_where_spans_are_recorded(console: bool, instrumented: str) -> None:
    # Without an exporter every query would still build a span that nobody records.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    proc = subprocess.run(
        [sys.executable, "-c", _CONFIGURE, "console" if console else "none"],
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert proc.stdout.strip() == instrumented


def test_child_spans_only_records_nothing_without_a_parent(exporter: InMemorySpanExporter) -> None:
    quiet = telemetry.ChildSpansOnly().get_tracer("background")
    with quiet.start_as_current_span("SELECT") as span:
        assert not span.is_recording()
        assert not telemetry.has_parent_span()  # nothing became current either
    assert not quiet.start_span("SELECT").is_recording()
    # A parent given explicitly, but invalid (a bad traceparent), is no parent.
    assert not quiet.start_span("SELECT", context=context_from_traceparent("00-bad")).is_recording()
    assert exporter.get_finished_spans() == ()


def test_child_spans_only_records_children_of_the_current_or_given_span(
    exporter: InMemorySpanExporter,
) -> None:
    quiet = telemetry.ChildSpansOnly().get_tracer("background")
    with tracer().start_as_current_span("step") as step:
        with quiet.start_as_current_span("INSERT") as insert:
            assert trace.get_current_span() is insert
    given = quiet.start_span("UPDATE", context=context_from_traceparent(traceparent_of(step)))
    given.end()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert sorted(spans) == ["INSERT", "UPDATE", "step"]
    step_id = step.get_span_context().span_id
    for name in ("INSERT", "UPDATE"):
        parent = spans[name].parent
        assert parent is not None and parent.span_id == step_id
