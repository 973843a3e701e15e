"""Spans recorded by a small object of our own instead of the OpenTelemetry SDK's, and exported by
the SDK's BatchSpanProcessor and OTLP gRPC exporter (so OTEL_BSP_* and OTEL_EXPORTER_OTLP_* work as
they do for the SDK): the collector gets what the SDK would send (ids, parent, kind, times,
attributes, links, the status and event of an exception, the resource, the "rnnserve" scope) for
about a seventh of the CPU (docs/benchmarks.md). The SDK's span cleans every attribute, asks the
sampler for every child and calls its processors; its encoder hashes the resource (as JSON) for
every span. Here a child of a kept span is kept (what every standard sampler decides for it), and
a batch is encoded with one resource and one scope.
"""
import time
import traceback
from contextvars import ContextVar
from types import SimpleNamespace

CURRENT: ContextVar = ContextVar("span", default=None)  # the recorded span the running code is under
PROCESSOR = None  # a BatchSpanProcessor over Exporter once export() has run
IDS = None  # the tracer provider's id generator
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
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    def put(value, v):
        """An attribute's value into an AnyValue message (set field by field: upb's keyword
        constructors cost three times as much)."""
        if isinstance(v, str):
            value.string_value = v
        elif isinstance(v, bool):
            value.bool_value = v
        elif isinstance(v, int):
            value.int_value = v
        elif isinstance(v, float):
            value.double_value = v
        else:
            for x in v:
                put(value.array_value.values.add(), x)

    def add_pairs(pairs, attributes: dict):
        for k, v in attributes.items():
            pair = pairs.add()
            pair.key = k
            put(pair.value, v)

    def add_span(messages, s: Span):
        """A span as the SDK's encoder makes it: the same fields, an unset status included."""
        flags = lambda remote: HAS_IS_REMOTE | (IS_REMOTE if remote else 0)  # noqa: E731
        m = messages.add(trace_id=s.trace_id.to_bytes(16, "big"), span_id=s.span_id.to_bytes(8, "big"),
                         trace_state=s.trace_state, parent_span_id=s.parent_id.to_bytes(8, "big") if s.parent_id else b"",
                         name=s.name, kind=s.kind, start_time_unix_nano=s.start_ns, end_time_unix_nano=s.end_ns,
                         flags=flags(s.remote))
        add_pairs(m.attributes, s.attributes)
        for name, time_ns, attributes in s.events:
            add_pairs(m.events.add(name=name, time_unix_nano=time_ns).attributes, attributes)
        for trace_id, span_id, remote in s.links:
            m.links.add(trace_id=trace_id.to_bytes(16, "big"), span_id=span_id.to_bytes(8, "big"), flags=flags(remote))
        m.status.SetInParent()
        if s.status[0]:
            m.status.code, m.status.message = s.status

    class Exporter(OTLPSpanExporter):
        """The SDK's OTLP gRPC exporter (endpoint, headers, TLS, retries), encoding our spans itself:
        one resource and one scope for the batch."""
        def _translate_data(self, batch: list) -> ExportTraceServiceRequest:
            request = encode_spans([s for s in batch if type(s) is not Span])  # the SDK's, as it encodes them
            ours = [s for s in batch if type(s) is Span]
            if ours:
                resource_spans = request.resource_spans.add(schema_url=provider.resource.schema_url)
                add_pairs(resource_spans.resource.attributes, provider.resource.attributes)
                scope_spans = resource_spans.scope_spans.add()
                scope_spans.scope.name = scope
                for s in ours:
                    add_span(scope_spans.spans, s)
            return request

    IDS, PROCESSOR = provider.id_generator, BatchSpanProcessor(Exporter())
    provider.add_span_processor(PROCESSOR)
