"""OpenTelemetry traces, off unless RNNSERVE_TRACING=otlp; then every process (front-ends and
engines) exports its spans over OTLP gRPC, configured by the standard variables
(OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER, OTEL_BSP_*, ...).

A request's trace: its W3C traceparent (HTTP header or gRPC metadata) is the parent of
  request (SERVER: "POST /v1/models/{name}:predict", the gRPC method)
    tokenize
    queued      (in the engine, from arrival to its batch; linked to the batch)
    generation  (a generate request's stream, first token to last)
and each batch is a span of its own (rows, padded tokens, calls), linked to every request it ran.
Off, nothing of OpenTelemetry is imported and each hook is one test. On, a request whose trace the
sampler drops (OTEL_TRACES_SAMPLER) costs one question to the sampler: no span. A kept one is
recorded by serving/common/spans.py, not by the SDK's tracer, and handed to the SDK's exporter
as the SDK's own ReadableSpan: the same spans for less.
"""
import logging
import os
import time
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

from serving.common import spans
from serving.common.spans import CURRENT, Span

log = logging.getLogger(__name__)
PROVIDER = None  # the SDK's TracerProvider once configure() has run with tracing on
SAMPLER = None  # its sampler (OTEL_TRACES_SAMPLER), asked before a root span is made
OTEL = None  # what the hooks use of OpenTelemetry, imported once


def configure(mode: str, role: str):
    """Set up this process's tracing (role: frontend | engine) when mode is "otlp"."""
    global PROVIDER, SAMPLER, OTEL
    if mode != "otlp":
        return
    from opentelemetry import trace
    from opentelemetry.propagate import extract
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "rnnserve"), "rnnserve.role": role})
    PROVIDER = TracerProvider(resource=resource)
    spans.export(PROVIDER, "rnnserve")
    trace.set_tracer_provider(PROVIDER)
    SAMPLER = PROVIDER.sampler
    OTEL = SimpleNamespace(trace=trace, extract=extract, SERVER=trace.SpanKind.SERVER, INTERNAL=trace.SpanKind.INTERNAL)
    log.info("tracing: OTLP to %s", os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
             or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "the default endpoint"))


def shutdown():
    """Export what is still buffered."""
    if PROVIDER:
        PROVIDER.shutdown()


def server_span(name: str, headers: dict, **attributes):
    """The request's span, its parent the caller's traceparent (headers: HTTP headers or gRPC
    metadata, bytes or str), or nothing when the sampler drops its trace (asked as the SDK asks it,
    with the trace id the span gets)."""
    if not SAMPLER:
        return nullcontext()
    text = lambda s: s.decode("latin-1") if isinstance(s, bytes) else s
    carrier = {text(k): text(v) for k, v in headers.items() if text(k) in ("traceparent", "tracestate")}
    context = OTEL.extract(carrier) if carrier else None
    parent = OTEL.trace.get_current_span(context).get_span_context() if context else OTEL.trace.INVALID_SPAN_CONTEXT
    trace_id = parent.trace_id if parent.is_valid else spans.SDK.ids.generate_trace_id()
    sampled = SAMPLER.should_sample(context, trace_id, name, OTEL.SERVER, attributes)
    if not sampled.decision.is_sampled():
        return nullcontext()
    return Span(name, trace_id, parent if parent.is_valid else None, dict(sampled.attributes), kind=OTEL.SERVER,
                trace_state=sampled.trace_state)


def span(name: str, **attributes):
    """A child of the current span, current while it runs (nothing when no span is recorded)."""
    parent = CURRENT.get()
    return parent.child(name, attributes) if parent else nullcontext()


def start(name: str, **attributes) -> Span | None:
    """A child of the current span that the caller ends (span.end()), or None when none is recorded."""
    parent = CURRENT.get()
    return parent.child(name, attributes) if parent else None


def traceparent() -> str:
    """The current span as a W3C traceparent, to send with an engine message ("" when none is
    recorded: the engine then makes no span for it)."""
    current = CURRENT.get()
    return f"00-{current.context.trace_id:032x}-{current.context.span_id:016x}-01" if current else ""


def set_attributes(**attributes):
    if current := CURRENT.get():
        current.set_attributes(attributes)


def epoch_ns(monotonic_s: float) -> int:
    """A time.monotonic() reading as the epoch nanoseconds spans are stamped with."""
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)


@contextmanager
def batch_span(model: str, requests: list, started: float):
    """An engine batch: its own span (a root, which the sampler may drop), linked to each traced
    request's; each of those requests gets a queued span (arrival to `started`, monotonic) under
    its own trace, linked to the batch. requests: objects with .trace (a traceparent from
    traceparent(), or "") and .arrived (monotonic)."""
    traced = [r for r in requests if r.trace]
    if not SAMPLER or not traced:
        yield None
        return
    parents = [spans.remote(int(r.trace[3:35], 16), int(r.trace[36:52], 16)) for r in traced]  # 00-{trace}-{span}-01
    begun = epoch_ns(started)
    batch = Span("batch", spans.SDK.ids.generate_trace_id(), None,
                 {"rnnserve.model": model, "rnnserve.requests": len(requests)},
                 links=[spans.link(p) for p in parents], start_ns=begun)
    to_batch = [spans.link(batch.context)]
    for request, parent in zip(traced, parents):
        Span("queued", parent.trace_id, parent, links=to_batch, start_ns=epoch_ns(request.arrived)).end(begun)
    kept = SAMPLER.should_sample(None, batch.context.trace_id, "batch", OTEL.INTERNAL, batch.attributes)
    if kept.decision.is_sampled():
        with batch:
            yield batch
    else:
        yield batch  # not exported; the queued spans still link to its ids, as the SDK's would
