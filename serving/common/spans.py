"""Spans recorded by a small object of our own and handed, as each ends, to the OpenTelemetry SDK
as a ReadableSpan (its public constructor): the SDK's BatchSpanProcessor queues it and its OTLP
gRPC exporter encodes and sends it, so OTEL_BSP_* and OTEL_EXPORTER_OTLP_* work as they do for
the SDK, and the collector gets what the SDK's encoder makes of a span. Only public interfaces:
no method of the SDK overridden, no attribute it reads made up (docs/benchmarks.md has what this
costs against the SDK's tracer and against the private-encoder version it replaced).

The SDK's tracer would clean every attribute, ask the sampler again for every child and call its
processors as each span starts and ends; here a child of a kept span is kept (what every standard
sampler decides for it), and a span is one object until it ends.
"""
import time
import traceback
from contextvars import ContextVar
from types import SimpleNamespace

CURRENT: ContextVar = ContextVar("span", default=None)  # the recorded span the running code is under
SDK = None  # what spans use of OpenTelemetry once export() has run: its classes, resource, scope, processor


class Span:
    """A kept span: its SpanContext and its parent's (None for a root), times in epoch nanoseconds,
    links as the SDK's Links. As a context manager: current while it runs, ended on exit, an
    Exception recorded as the SDK's span records it (an "exception" event and an ERROR status).
    kind: the SDK's SpanKind, None for INTERNAL."""
    __slots__ = ("name", "kind", "context", "parent", "start_ns", "attributes", "links", "events", "status", "token")

    def __init__(self, name: str, trace_id: int, parent=None, attributes: dict | None = None, *, kind=None,
                 trace_state=None, links: list | tuple = (), start_ns: int | None = None):
        self.name, self.kind, self.parent, self.links = name, kind or SDK.INTERNAL, parent, links
        self.context = SDK.SpanContext(trace_id, SDK.ids.generate_span_id(), False, SDK.SAMPLED, trace_state)
        self.attributes = attributes if attributes is not None else {}
        self.start_ns = time.time_ns() if start_ns is None else start_ns
        self.events, self.status = (), SDK.UNSET

    def child(self, name: str, attributes: dict) -> "Span":
        return Span(name, self.context.trace_id, self.context, attributes, trace_state=self.context.trace_state)

    def set_attributes(self, attributes: dict):
        self.attributes.update(attributes)

    def end(self, end_ns: int | None = None):
        SDK.processor.on_end(SDK.ReadableSpan(
            self.name, self.context, self.parent, SDK.resource, self.attributes, self.events, self.links, self.kind,
            status=self.status, start_time=self.start_ns, end_time=time.time_ns() if end_ns is None else end_ns,
            instrumentation_scope=SDK.scope))

    def __enter__(self):
        self.token = CURRENT.set(self)
        return self

    def __exit__(self, kind, error, stack):
        CURRENT.reset(self.token)
        if isinstance(error, Exception):
            name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
            self.events = [SDK.Event("exception", {
                "exception.type": name, "exception.message": str(error),
                "exception.stacktrace": "".join(traceback.format_exception(error)), "exception.escaped": "False"})]
            self.status = SDK.Status(SDK.ERROR, f"{kind.__name__}: {error}")
        self.end()


def remote(trace_id: int, span_id: int):
    """The SpanContext of a span in another process (a traceparent's), to parent or link to."""
    return SDK.SpanContext(trace_id, span_id, True, SDK.SAMPLED)


def link(context):
    return SDK.Link(context)


def export(provider, scope: str):
    """Export ended spans with a BatchSpanProcessor over the SDK's OTLP gRPC exporter, which
    `provider` (the SDK's TracerProvider, whose resource and id generator our spans use) gets too:
    the spans its own tracers make (FastAPI's, for the routes it serves) go the same way.
    `scope`: the instrumentation scope our spans are exported under."""
    global SDK
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

    processor = BatchSpanProcessor(OTLPSpanExporter())
    SDK = SimpleNamespace(ReadableSpan=ReadableSpan, SpanContext=SpanContext, Event=Event, Link=Link, Status=Status,
                          ERROR=StatusCode.ERROR, UNSET=Status(StatusCode.UNSET), INTERNAL=SpanKind.INTERNAL,
                          SAMPLED=TraceFlags(TraceFlags.SAMPLED), ids=provider.id_generator,
                          resource=provider.resource, scope=InstrumentationScope(scope), processor=processor)
    provider.add_span_processor(processor)
