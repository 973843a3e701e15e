"""OpenTelemetry traces, off unless RNNSERVE_TRACING=otlp; then every process (front-ends and
engines) exports its spans with the OTLP gRPC exporter, configured by the standard variables
(OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER, OTEL_BSP_*, ...).

A request's trace: its W3C traceparent (HTTP header or gRPC metadata) is the parent of
  request (SERVER: "POST /v1/models/{name}:predict", the gRPC method)
    tokenize
    queued      (in the engine, from arrival to its batch; linked to the batch)
    generation  (a generate request's stream, first token to last)
and each batch is a span of its own (rows, padded tokens, calls), linked to every request it ran.
Off, nothing of OpenTelemetry is imported and each hook is one test of TRACER. On, a request
whose trace the sampler drops (OTEL_TRACES_SAMPLER) costs one question to the sampler: no span.
"""
import logging
import os
import time
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from types import SimpleNamespace

log = logging.getLogger(__name__)
TRACER = None  # an opentelemetry Tracer once configure() has run with tracing on
SAMPLER = None  # its provider's sampler (OTEL_TRACES_SAMPLER), asked before a request span is made
IDS = None  # its provider's trace ids: DrawnIds
OTEL = None  # what the hooks use of OpenTelemetry, imported once
KEPT = ContextVar("kept", default=False)  # under a request span the sampler kept


def configure(mode: str, role: str):
    """Set up this process's tracer (role: frontend | engine) when mode is "otlp"."""
    global TRACER, SAMPLER, IDS, OTEL
    if mode != "otlp":
        return
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.propagate import extract, inject
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class DrawnIds(RandomIdGenerator):
        """Random ids, except the trace id that server_span drew to ask the sampler with: the
        request span gets it, so the SDK's own decision is the same one."""
        drawn = 0

        def generate_trace_id(self) -> int:
            drawn, self.drawn = self.drawn, 0
            return drawn or super().generate_trace_id()

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "rnnserve"), "rnnserve.role": role})
    IDS = DrawnIds()
    provider = TracerProvider(resource=resource, id_generator=IDS)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    TRACER, SAMPLER = trace.get_tracer("rnnserve"), provider.sampler
    OTEL = SimpleNamespace(trace=trace, extract=extract, inject=inject, SERVER=trace.SpanKind.SERVER)
    log.info("tracing: OTLP to %s", os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
             or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "the default endpoint"))


def shutdown():
    """Export what is still buffered."""
    if TRACER:
        from opentelemetry import trace
        trace.get_tracer_provider().shutdown()


def server_span(name: str, headers: dict, **attributes):
    """The request's span, its parent the caller's traceparent (headers: HTTP headers or gRPC
    metadata, bytes or str). The sampler is asked first, with the trace id the span would get: a
    request whose trace it drops gets no span at all (the SDK would make one that records nothing,
    at a third of a kept span's cost)."""
    if not TRACER:
        return nullcontext()
    text = lambda s: s.decode("latin-1") if isinstance(s, bytes) else s
    carrier = {text(k): text(v) for k, v in headers.items() if text(k) in ("traceparent", "tracestate")}
    context = OTEL.extract(carrier) if carrier else None
    parent = OTEL.trace.get_current_span(context).get_span_context() if context else OTEL.trace.INVALID_SPAN_CONTEXT
    trace_id = parent.trace_id if parent.is_valid else IDS.generate_trace_id()
    if not SAMPLER.should_sample(context, trace_id, name, OTEL.SERVER, attributes).decision.is_sampled():
        return nullcontext()
    if not parent.is_valid:
        IDS.drawn = trace_id
    return kept(name, context, attributes)


@contextmanager
def kept(name: str, context, attributes: dict):
    """A sampled request's span, current while it runs, and KEPT true under it."""
    token = KEPT.set(True)
    try:
        with TRACER.start_as_current_span(name, context=context, kind=OTEL.SERVER, attributes=attributes) as request:
            yield request
    finally:
        KEPT.reset(token)


def recording() -> bool:
    """Whether the current span is kept: tracing is on and the sampler chose its request's trace."""
    return KEPT.get()


def span(name: str, **attributes):
    """A child of the current span (nothing when it is not recorded)."""
    return TRACER.start_as_current_span(name, attributes=attributes) if recording() else nullcontext()


def start(name: str, **attributes):
    """A child of the current span that the caller ends (span.end()), or None when not recorded."""
    return TRACER.start_span(name, attributes=attributes) if recording() else None


def traceparent() -> str:
    """The current span as a W3C traceparent, to send with an engine message ("" when it is not
    recorded: the engine then makes no span for it)."""
    if not recording():
        return ""
    carrier = {}
    OTEL.inject(carrier)
    return carrier.get("traceparent", "")


def set_attributes(**attributes):
    if recording():
        OTEL.trace.get_current_span().set_attributes(attributes)


def epoch_ns(monotonic_s: float) -> int:
    """A time.monotonic() reading as the epoch nanoseconds spans are stamped with."""
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)


@contextmanager
def batch_span(model: str, requests: list, started: float):
    """An engine batch: its own span, linked to each traced request's; each of those requests gets
    a queued span (arrival to `started`, monotonic) under its own trace, linked to the batch.
    requests: objects with .trace (a traceparent or "") and .arrived (monotonic)."""
    traced = [r for r in requests if r.trace]
    if not TRACER or not traced:
        yield None
        return
    from opentelemetry import trace
    from opentelemetry.propagate import extract
    from opentelemetry.trace import Link

    parents = [trace.get_current_span(extract({"traceparent": r.trace})).get_span_context() for r in traced]
    begun = epoch_ns(started)
    with TRACER.start_as_current_span("batch", context=trace.set_span_in_context(trace.INVALID_SPAN),
                                      links=[Link(p) for p in parents], start_time=begun,
                                      attributes={"rnnserve.model": model, "rnnserve.requests": len(requests)}) as batch:
        link = Link(batch.get_span_context())
        for request, parent in zip(traced, parents):
            queued = TRACER.start_span("queued", context=trace.set_span_in_context(trace.NonRecordingSpan(parent)),
                                       links=[link], start_time=epoch_ns(request.arrived))
            queued.end(end_time=begun)
        yield batch
