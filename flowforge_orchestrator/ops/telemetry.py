"""OpenTelemetry setup and the trace-context helpers that carry a trace across processes.

A run's trace crosses PostgreSQL and Redis (orchestrator -> outbox, orchestrator -> arq ->
worker), where no instrumentation can follow it, so we store the W3C `traceparent` string
and rebuild a parent `Context` from it on the other side.

Quiet when idle: spans are made only for runs. The asyncpg instrumentation records a query
only under a span already current (`ChildSpansOnly`), so the daemons' background work
(polls, lease renewals, retention, samplers, claims that find nothing, heartbeats) starts
no trace of its own; a query made for a step (the worker's result write) lands in that
step's trace.

Configuration comes from the standard `OTEL_*` variables. Reading them here is a deliberate
exception to "config is read once at the edge": the SDK and its exporters read them anyway,
and they are the contract operators expect.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
)
from opentelemetry.trace import Span, SpanContext, SpanKind, Tracer, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util import types

# The API's return type of `start_as_current_span` (a context manager that also decorates).
from opentelemetry.util._decorator import _AgnosticContextManager

__all__ = [
    "TRACER_NAME",
    "ChildSpansOnly",
    "ChildSpansOnlyTracer",
    "add_span_processor",
    "configure",
    "context_from_traceparent",
    "current_traceparent",
    "has_parent_span",
    "instrument_asyncpg",
    "setup_tracing",
    "shutdown_tracing",
    "traceparent_of",
    "tracer",
]

TRACER_NAME = "flowforge_orchestrator"
DEFAULT_SERVICE_NAME = "flowforge-orchestrator"

_log = logging.getLogger(__name__)
_lock = threading.Lock()
# Exporters this process has attached, so that a second setup_tracing() adds nothing twice.
_attached: set[str] = set()
_propagator = TraceContextTextMapPropagator()


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() == "true"


def _sdk_provider() -> SdkTracerProvider | None:
    provider = trace.get_tracer_provider()
    return provider if isinstance(provider, SdkTracerProvider) else None


def _install_provider(service_name: str) -> SdkTracerProvider:
    """Create and register the global SDK provider (caller holds `_lock`)."""
    existing = _sdk_provider()
    if existing is not None:
        return existing
    # OTEL_SERVICE_NAME wins over the caller's name, as the specification says; the SDK's own
    # detector would lose to an explicit attribute, hence the explicit read.
    name = os.environ.get("OTEL_SERVICE_NAME", "").strip() or service_name
    provider = SdkTracerProvider(resource=Resource.create({SERVICE_NAME: name}))
    trace.set_tracer_provider(provider)
    installed = _sdk_provider()
    if installed is None:
        # Someone registered a non-SDK provider first; the global cannot be replaced.
        _log.warning("a non-SDK tracer provider is already registered; spans go there")
        return provider
    return installed


def setup_tracing(*, service_name: str, console: bool = False) -> SdkTracerProvider | None:
    """Configure the process's tracer provider; safe to call again (nothing is added twice).

    Exports to OTLP/HTTP (batched) when `OTEL_EXPORTER_OTLP_ENDPOINT` or
    `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set, and to stderr when `console` is true. With
    neither (and no SDK provider installed already), nothing is installed: spans stay
    non-recording, which costs next to nothing per step, and a traceparent received from
    an API still flows through. `OTEL_SDK_DISABLED=true` records nothing either.
    """
    otlp = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    with _lock:
        if not (otlp or console) and _sdk_provider() is None:
            return None
        provider = _install_provider(service_name)
        if _env_true("OTEL_SDK_DISABLED"):
            return provider
        if otlp and "otlp" not in _attached:
            # Imported lazily: it pulls in requests and protobuf, which most tests never need.
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            # The exporter reads the endpoint, headers and timeout from the OTEL_* variables.
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            _attached.add("otlp")
        if console and "console" not in _attached:
            # Simple (synchronous) so local debugging output appears as spans end.
            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
            _attached.add("console")
        return provider


def add_span_processor(processor: SpanProcessor) -> None:
    """Attach `processor` to the active SDK provider, creating one if needed (tests use this)."""
    with _lock:
        provider = _install_provider(DEFAULT_SERVICE_NAME)
    provider.add_span_processor(processor)


def shutdown_tracing() -> None:
    """Flush pending spans and shut the provider down; call once at process exit."""
    provider = _sdk_provider()
    if provider is not None:
        provider.force_flush()
        provider.shutdown()


def configure(*, service_name: str, console: bool = False) -> SdkTracerProvider | None:
    """What a daemon calls at start: `setup_tracing`, and query spans (under a current span
    only) where spans are recorded. Unrecorded, each query's span would still cost ~30 us
    of the worker's time per step (measured with cProfile under the throughput benchmark)."""
    provider = setup_tracing(service_name=service_name, console=console)
    if provider is not None:
        instrument_asyncpg()
    return provider


def instrument_asyncpg() -> None:
    """Trace asyncpg queries made under a span (without their parameters, which may carry
    user data); idempotent. A query outside any span records nothing: see `ChildSpansOnly`."""
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

    with _lock:
        # The instrumentor is a singleton with an unannotated __init__.
        instrumentor = AsyncPGInstrumentor(capture_parameters=False)  # type: ignore[no-untyped-call]
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument(tracer_provider=ChildSpansOnly())


def has_parent_span(context: Context | None = None) -> bool:
    """Whether `context` (default: the current one) holds a valid span to parent a new one."""
    return trace.get_current_span(context).get_span_context().is_valid


class ChildSpansOnlyTracer(Tracer):
    """A tracer that makes spans only as children: without a parent span in the given or
    current context it returns the invalid (non-recording) span, so no root trace begins."""

    def __init__(self, inner: Tracer) -> None:
        self._inner = inner

    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: trace._Links = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> Span:
        if not has_parent_span(context):
            return trace.INVALID_SPAN
        return self._inner.start_span(
            name,
            context,
            kind,
            attributes,
            links,
            start_time,
            record_exception,
            set_status_on_exception,
        )

    def start_as_current_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: trace._Links = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> _AgnosticContextManager[Span]:
        span = self.start_span(
            name,
            context,
            kind,
            attributes,
            links,
            start_time,
            record_exception,
            set_status_on_exception,
        )
        return trace.use_span(
            span,
            end_on_exit=end_on_exit,
            record_exception=record_exception,
            set_status_on_exception=set_status_on_exception,
        )


class ChildSpansOnly(TracerProvider):
    """The tracer provider given to instrumentations of background I/O (asyncpg): their
    tracers come from the global provider, looked up at each call, and only make children."""

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: types.Attributes = None,
    ) -> Tracer:
        inner = trace.get_tracer(
            instrumenting_module_name,
            instrumenting_library_version,
            schema_url=schema_url,
            attributes=attributes,
        )
        return ChildSpansOnlyTracer(inner)


def tracer() -> Tracer:
    """The tracer of this package (a proxy until a provider is set, so always usable)."""
    return trace.get_tracer(TRACER_NAME)


def traceparent_of(span_or_context: Span | SpanContext | Context) -> str | None:
    """The W3C `traceparent` of a span, span context or context; None when it has no valid span."""
    if isinstance(span_or_context, SpanContext):
        span_or_context = trace.NonRecordingSpan(span_or_context)
    if isinstance(span_or_context, Span):
        ctx = trace.set_span_in_context(span_or_context, Context())
    else:
        ctx = span_or_context
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=ctx)
    return carrier.get("traceparent")


def context_from_traceparent(tp: str | None) -> Context:
    """A Context whose parent is the span `tp` names; empty or invalid gives a root context.

    Extraction starts from an empty Context, not the current one, so a bad `traceparent`
    never silently parents the new span under whatever span happens to be active.
    """
    if not tp:
        return Context()
    return _propagator.extract({"traceparent": tp.strip()}, context=Context())


def current_traceparent() -> str | None:
    """The `traceparent` of the active span, or None outside any span."""
    return traceparent_of(otel_context.get_current())
