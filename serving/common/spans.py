"""Spans recorded by a small object of our own instead of the OpenTelemetry SDK's, and exported by
the SDK's BatchSpanProcessor and OTLP gRPC exporter (so OTEL_BSP_* and OTEL_EXPORTER_OTLP_* work as
they do for the SDK): the collector gets what the SDK would send (ids, parent, kind, times,
attributes, links, the status and event of an exception, the resource, the "rnnserve" scope) for
a fifth of the CPU. The SDK's span cleans every attribute, asks the sampler for every child and
calls its processors; its encoder hashes the resource (JSON) for every span. Here a child of a
kept span is kept (what every standard sampler decides for it), and the exporter's thread encodes
a batch with one resource and one scope.
"""
import time
import traceback
from contextvars import ContextVar
from types import SimpleNamespace

CURRENT: ContextVar = ContextVar("span", default=None)  # the recorded span the running code is under
PROCESSOR = None  # a BatchSpanProcessor over Exporter once export() has run
IDS = None  # the SDK's RandomIdGenerator
INTERNAL, SERVER = 1, 2  # OTLP's span kinds
HAS_IS_REMOTE, IS_REMOTE = 0x100, 0x200  # OTLP's span flags: whether the parent (or a link) is remote
ERROR = 2  # OTLP's status code


class Span:
    """A kept span: ids as ints, times in epoch nanoseconds, links as (trace_id, span_id, remote).
    As a context manager: current while it runs, ended on exit, an Exception recorded as the SDK
    records it (an "exception" event and an ERROR status)."""
    __slots__ = ("name", "kind", "trace_id", "span_id", "parent_id", "remote", "trace_state", "start_ns", "end_ns",
                 "attributes", "links", "events", "status", "token")
    context = SimpleNamespace(trace_flags=SimpleNamespace(sampled=True))  # what BatchSpanProcessor.on_end asks

    def __init__(self, name: str, trace_id: int, parent_id: int = 0, attributes: dict | None = None, *,
                 kind: int = INTERNAL, remote: bool = False, trace_state: str = "", links: list | tuple = (),
                 start_ns: int | None = None):
        self.name, self.kind, self.trace_id, self.span_id = name, kind, trace_id, IDS.generate_span_id()
        self.parent_id, self.remote, self.trace_state, self.links = parent_id, remote, trace_state, links
        self.attributes = attributes if attributes is not None else {}
        self.start_ns = time.time_ns() if start_ns is None else start_ns
        self.events, self.status = (), (0, None)

    def child(self, name: str, attributes: dict) -> "Span":
        return Span(name, self.trace_id, self.span_id, attributes, trace_state=self.trace_state)

    def set_attributes(self, attributes: dict):
        self.attributes.update(attributes)

    def end(self, end_ns: int | None = None):
        self.end_ns = time.time_ns() if end_ns is None else end_ns
        PROCESSOR.on_end(self)

    def __enter__(self):
        self.token = CURRENT.set(self)
        return self

    def __exit__(self, kind, error, stack):
        CURRENT.reset(self.token)
        if isinstance(error, Exception):
            name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
            self.events = [("exception", time.time_ns(), {
                "exception.type": name, "exception.message": str(error),
                "exception.stacktrace": "".join(traceback.format_exception(error)), "exception.escaped": "False"})]
            self.status = (ERROR, f"{kind.__name__}: {error}")
        self.end()


def export(provider, scope: str):
    """Export ended spans, with the batch processor and OTLP exporter that `provider` (the SDK's
    TracerProvider, its resource and ids ours) gets too: the spans its own tracers make (FastAPI's,
    for the routes it serves) go the same way. `scope`: the name our spans are exported under."""
    global PROCESSOR, IDS
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, InstrumentationScope, KeyValue
    from opentelemetry.proto.resource.v1.resource_pb2 import Resource
    from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans
    from opentelemetry.proto.trace.v1.trace_pb2 import Span as Message
    from opentelemetry.proto.trace.v1.trace_pb2 import Status
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    def value(v) -> AnyValue:
        if isinstance(v, str):
            return AnyValue(string_value=v)
        if isinstance(v, bool):
            return AnyValue(bool_value=v)
        if isinstance(v, (list, tuple)):
            return AnyValue(array_value=ArrayValue(values=[value(x) for x in v]))
        return AnyValue(int_value=v) if isinstance(v, int) else AnyValue(double_value=v)

    def pairs(attributes: dict) -> list:
        return [KeyValue(key=k, value=value(v)) for k, v in attributes.items()]

    def message(s: Span) -> Message:
        """A span as the SDK's encoder makes it (the same fields, an unset status included)."""
        flags = lambda remote: HAS_IS_REMOTE | (IS_REMOTE if remote else 0)  # noqa: E731
        return Message(trace_id=s.trace_id.to_bytes(16, "big"), span_id=s.span_id.to_bytes(8, "big"),
                       trace_state=s.trace_state, parent_span_id=s.parent_id.to_bytes(8, "big") if s.parent_id else b"",
                       name=s.name, kind=s.kind, start_time_unix_nano=s.start_ns, end_time_unix_nano=s.end_ns,
                       attributes=pairs(s.attributes), status=Status(code=s.status[0], message=s.status[1]),
                       events=[Message.Event(name=n, time_unix_nano=t, attributes=pairs(a)) for n, t, a in s.events],
                       links=[Message.Link(trace_id=t.to_bytes(16, "big"), span_id=i.to_bytes(8, "big"), flags=flags(r))
                              for t, i, r in s.links],
                       flags=flags(s.remote))

    resource = Resource(attributes=pairs(provider.resource.attributes))

    class Exporter(OTLPSpanExporter):
        """The SDK's OTLP gRPC exporter (endpoint, headers, TLS, retries), encoding our spans itself:
        one resource and one scope for the batch."""
        def _translate_data(self, batch: list) -> ExportTraceServiceRequest:
            request = encode_spans([s for s in batch if type(s) is not Span])  # the SDK's, as it encodes them
            if ours := [message(s) for s in batch if type(s) is Span]:
                request.resource_spans.append(ResourceSpans(
                    resource=resource, schema_url=provider.resource.schema_url,
                    scope_spans=[ScopeSpans(scope=InstrumentationScope(name=scope), spans=ours)]))
            return request

    IDS, PROCESSOR = provider.id_generator, BatchSpanProcessor(Exporter())
    provider.add_span_processor(PROCESSOR)
