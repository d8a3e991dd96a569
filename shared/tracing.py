"""Optional OpenTelemetry tracing: one trace per request, across the API and the worker.

On when the SDK is installed (`pip install sluice[otel]`) and an exporter is configured:
OTLP over HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the SDK reads the rest of the
standard `OTEL_*` variables), or JSON lines in `SLUICE_TRACE_DIR` (one file per process, for
tests and debugging). Off, every function here is a no-op costing a `None` check.

The API's request span is the root; its context travels in the job (`GenerationJob.trace`, W3C
`traceparent`), and the worker adds `queue` (enqueued to claimed) and `generate` under it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace import Span, Tracer

_tracer: Tracer | None = None


def setup(service: str) -> None:
    """Install a tracer provider for this process, if the SDK and an exporter are there."""
    global _tracer
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    trace_dir = os.environ.get("SLUICE_TRACE_DIR")
    if not endpoint and not trace_dir:
        return
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SimpleSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )
    except ImportError:
        return

    class JsonLines(SpanExporter):
        """Each span as one JSON line."""

        def __init__(self, path: Path) -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", buffering=1)

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            for span in spans:
                self._file.write(span.to_json(indent=None) + "\n")
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            self._file.close()

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if trace_dir:
        path = Path(trace_dir) / f"{service}-{os.getpid()}.jsonl"
        provider.add_span_processor(SimpleSpanProcessor(JsonLines(path)))
    if endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _tracer = trace.get_tracer("sluice")


def start_span(
    name: str, *, parent: Context | None = None, start_ns: int | None = None
) -> Span | None:
    if _tracer is None:
        return None
    return _tracer.start_span(name, context=parent, start_time=start_ns)


def carrier(span: Span | None) -> dict[str, str] | None:
    """The W3C trace context of `span`, to carry in a job."""
    if span is None:
        return None
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    out: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(out, trace.set_span_in_context(span))
    return out


def parent_of(carried: dict[str, str] | None) -> Context | None:
    if _tracer is None or carried is None:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract(carried)


def child_context(span: Span | None) -> Context | None:
    if span is None:
        return None
    from opentelemetry import trace

    return trace.set_span_in_context(span)
