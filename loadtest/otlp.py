"""A local OTLP trace receiver (gRPC, 127.0.0.1): keeps the spans a traced server exports, for the
tracing test and benchmark; no collector or external service needed.

    python -m loadtest.otlp --port 4317    # prints each span as it arrives: role, name, ids, duration
"""
import argparse
import threading
import time
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """.spans: every span received, as (service role, opentelemetry.proto Span)."""

    def __init__(self, port: int):
        self.port, self.spans, self.lock = port, [], threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.server.add_insecure_port(f"127.0.0.1:{port}")
        self.server.start()

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    self.spans += [(attributes.get("rnnserve.role", ""), s) for s in scope_spans.spans]
        return trace_service_pb2.ExportTraceServiceResponse()

    def stop(self):
        self.server.stop(0)


def main():
    p = argparse.ArgumentParser(prog="python -m loadtest.otlp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=4317)
    args = p.parse_args()
    receiver = Receiver(args.port)
    print(f"receiving OTLP traces on 127.0.0.1:{args.port}", flush=True)
    shown = 0
    try:
        while True:
            time.sleep(0.5)
            with receiver.lock:
                new, shown = receiver.spans[shown:], len(receiver.spans)
            for role, span in new:
                print(line(role, span), flush=True)
    except KeyboardInterrupt:
        receiver.stop()


def line(role: str, span) -> str:
    """One span: role, name, trace and span ids, its parent, duration and attributes."""
    attributes = " ".join(f"{a.key}={getattr(a.value, a.value.WhichOneof('value'))}" for a in span.attributes)
    parent = span.parent_span_id.hex() or "-"
    return (f"{role:8s} {span.name:40s} trace {span.trace_id.hex()[:16]} span {span.span_id.hex()} parent {parent} "
            f"{(span.end_time_unix_nano - span.start_time_unix_nano) / 1e6:.2f} ms {attributes}")


if __name__ == "__main__":
    main()
