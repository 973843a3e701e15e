"""OpenTelemetry traces: python -m serving with RNNSERVE_TRACING=otlp exports, over OTLP gRPC to a
receiver on 127.0.0.1, a trace per request under the caller's traceparent: the request span, its
tokenize, its time queued (linked to the batch it ran in) and a generation's stream."""
import ast
import os
import queue
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton

from loadtest.otlp import Receiver
from loadtest.servers import free_port
from tests.serving_fixtures import serve, tiny_repository

TRACE = "0af7651916cd43dd8448eb211c80319c"


def traceparent(n: int) -> tuple[str, str]:
    """A caller's span id and its W3C traceparent (one trace, a caller span per request)."""
    span_id = f"{n:016x}"
    return span_id, f"00-{TRACE}-{span_id}-01"


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """(receiver, url, grpc port) of a traced server exporting every 100 ms."""
    repository = tiny_repository(tmp_path_factory.mktemp("tracing"))
    receiver, grpc_port = Receiver(free_port()), free_port()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{receiver.port}")
        env.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        env.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        process, url = serve(repository, tracing="otlp", grpc_port=grpc_port, max_queue_delay_ms=2)
    yield receiver, url, grpc_port
    process.terminate()
    process.wait(30)
    receiver.stop()


def spans_under(receiver: Receiver, caller: str, names: set, timeout_s: float = 10) -> dict:
    """name -> (role, span) of the request span whose parent is `caller` and of everything under
    it, once every name in `names` has arrived."""
    deadline = time.time() + timeout_s
    while True:
        with receiver.lock:
            spans = list(receiver.spans)
        found, parents = {}, {bytes.fromhex(caller)}
        for _ in range(3):  # request -> tokenize, queued, generation
            for role, span in spans:
                if span.trace_id.hex() == TRACE and span.parent_span_id in parents:
                    found[span.name] = (role, span)
                    parents.add(span.span_id)
        if names <= found.keys() or time.time() > deadline:
            return found
        time.sleep(0.1)


def batch_of(receiver: Receiver, queued, timeout_s: float = 10) -> object:
    """The batch span the queued span links to, once it has arrived: the engine's exporter may send
    it in a later export than the queued span, which ends first."""
    (link,) = queued.links
    deadline = time.time() + timeout_s
    while True:
        with receiver.lock:
            found = [s for _, s in receiver.spans if s.name == "batch" and s.span_id == link.span_id]
        if found or time.time() > deadline:
            assert found, f"no batch span {link.span_id.hex()} within {timeout_s}s"
            return found[0]
        time.sleep(0.05)


def attributes(span) -> dict:
    return {a.key: a.value.int_value or a.value.string_value for a in span.attributes}


def check_request(receiver, caller: str, request_name: str, names=frozenset({"tokenize", "queued"})) -> dict:
    found = spans_under(receiver, caller, {request_name, *names})
    assert {request_name, *names} <= found.keys(), f"spans under the caller: {sorted(found)}"
    role, request = found[request_name]
    assert role == "frontend" and request.kind == request.SPAN_KIND_SERVER
    assert request.parent_span_id.hex() == caller
    if "queued" in names:
        role, queued = found["queued"]
        assert role == "engine" and queued.parent_span_id == request.span_id
        batch = batch_of(receiver, queued)
        assert batch.parent_span_id == b"" and request.span_id in [link.span_id for link in batch.links]
        assert attributes(batch)["rnnserve.rows"] >= 1 and attributes(batch)["rnnserve.padded_tokens"] >= 1
    return found


def test_a_predict_is_traced_from_the_callers_span_to_its_batch(traced):
    receiver, url, _ = traced
    caller, header = traceparent(1)
    r = httpx.post(f"{url}/v1/models/clf:predict", json={"instances": ["a fine film"]}, headers={"traceparent": header})
    assert r.status_code == 200
    found = check_request(receiver, caller, "POST /v1/models/{name}:predict")
    assert found["tokenize"][1].parent_span_id == found["POST /v1/models/{name}:predict"][1].span_id


def test_a_v2_infer_over_rest_and_over_grpc_is_traced(traced):
    receiver, url, grpc_port = traced
    caller, header = traceparent(2)
    body = {"inputs": [{"name": "input_ids", "shape": [1, 3], "datatype": "INT64", "data": [2, 3, 4]},
                       {"name": "lengths", "shape": [1], "datatype": "INT64", "data": [3]}]}
    assert httpx.post(f"{url}/v2/models/clf/infer", json=body, headers={"traceparent": header}).status_code == 200
    check_request(receiver, caller, "POST /v2/models/{name}/infer", names={"queued"})

    caller, header = traceparent(3)
    inputs = [triton.InferInput("input_ids", [1, 3], "INT64"), triton.InferInput("lengths", [1], "INT64")]
    inputs[0].set_data_from_numpy(np.array([[2, 3, 4]], np.int64))
    inputs[1].set_data_from_numpy(np.array([3], np.int64))
    triton.InferenceServerClient(f"127.0.0.1:{grpc_port}").infer("clf", inputs, headers={"traceparent": header})
    check_request(receiver, caller, "inference.GRPCInferenceService/ModelInfer", names={"queued"})


@pytest.mark.parametrize("stream", [False, True])
def test_a_generation_is_traced_with_its_stream(traced, stream):
    receiver, url, _ = traced
    caller, header = traceparent(4 + stream)
    r = httpx.post(f"{url}/v1/models/lm:generate", headers={"traceparent": header},
                   json={"prompt": "the time", "max_new_tokens": 12, "stream": stream, "seed": 1})
    assert r.status_code == 200
    found = check_request(receiver, caller, "POST /v1/models/{name}:generate", names={"tokenize", "generation"})
    request, generation = found["POST /v1/models/{name}:generate"][1], found["generation"][1]
    assert generation.parent_span_id == request.span_id
    assert attributes(generation)["rnnserve.tokens"] >= 1


@pytest.mark.parametrize("stream", [False, True])
def test_an_openai_completion_is_traced_under_the_model_its_body_names(traced, stream):
    receiver, url, _ = traced
    caller, header = traceparent(20 + stream)
    r = httpx.post(f"{url}/openai/v1/completions", headers={"traceparent": header},
                   json={"model": "lm", "prompt": "the time", "max_tokens": 12, "stream": stream, "seed": 1})
    assert r.status_code == 200
    found = check_request(receiver, caller, "POST /openai/v1/completions", names={"tokenize", "generation"})
    request, generation = found["POST /openai/v1/completions"][1], found["generation"][1]
    assert generation.parent_span_id == request.span_id and attributes(generation)["rnnserve.tokens"] == 12
    assert attributes(request)["rnnserve.model"] == "lm"


def test_a_generation_over_the_grpc_stream_is_traced(traced):
    """ModelStreamInfer: the stream's span, each request's tokenize and generation under it, and the
    stream answered whole (the span ends when the stream does)."""
    receiver, url, grpc_port = traced
    caller, header = traceparent(6)
    client = triton.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), headers={"traceparent": header})
    text = triton.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"the time"], dtype=np.object_))
    client.async_stream_infer("lm", [text], request_id="g1", parameters={"max_tokens": 12, "seed": 1})
    result, error = answers.get(timeout=30)
    client.stop_stream()
    assert error is None and result.get_response().parameters["triton_final_response"].bool_param
    found = check_request(receiver, caller, "inference.GRPCInferenceService/ModelStreamInfer",
                          names={"tokenize", "generation"})
    stream, generation = found["inference.GRPCInferenceService/ModelStreamInfer"][1], found["generation"][1]
    assert generation.parent_span_id == stream.span_id and attributes(generation)["rnnserve.tokens"] == 12


def test_a_kept_request_carries_what_the_sdk_would_send(traced):
    """Our spans are recorded by serving/common/spans.py, not by the SDK's tracer, but arrive as its
    would: the request span's attributes, the caller's tracestate on it and its children, the span
    flags (parent remote or not), an unset status."""
    receiver, url, _ = traced
    caller, header = traceparent(10)
    r = httpx.post(f"{url}/v1/models/clf:predict", json={"instances": ["a fine film"]},
                   headers={"traceparent": header, "tracestate": "vendor=abc", "x-request-id": "kept-1"})
    assert r.status_code == 200
    found = check_request(receiver, caller, "POST /v1/models/{name}:predict")
    request, tokenize, queued = (found[n][1] for n in ("POST /v1/models/{name}:predict", "tokenize", "queued"))
    assert attributes(request) == {"http.route": "/v1/models/{name}:predict", "url.path": "/v1/models/clf:predict",
                                   "rnnserve.model": "clf", "rnnserve.request_id": "kept-1",
                                   "http.response.status_code": 200}
    assert request.trace_state == tokenize.trace_state == "vendor=abc"
    assert (request.flags, tokenize.flags, queued.flags) == (0x300, 0x100, 0x300)  # parent remote: the caller, an engine's
    assert request.HasField("status") and request.status.code == 0 and tokenize.kind == tokenize.SPAN_KIND_INTERNAL


SAME_SPANS = """
from opentelemetry import trace
from opentelemetry.propagate import extract
from serving.common import tracing

tracing.configure("otlp", "frontend")
headers = {"traceparent": "00-%s-00000000000000aa-01", "tracestate": "vendor=abc"}
attributes = {"rnnserve.model": "clf", "rnnserve.rows": 3, "rnnserve.score": 0.5, "rnnserve.ok": True}
try:
    with tracing.server_span("ours", headers, **attributes):
        with tracing.span("tokenize", texts=1):
            pass
        raise ValueError("bad row")
except ValueError:
    pass
tracer = trace.get_tracer("rnnserve")
try:
    with tracer.start_as_current_span("the SDK's", extract(headers), kind=trace.SpanKind.SERVER, attributes=attributes):
        with tracer.start_as_current_span("tokenize", attributes={"texts": 1}):
            pass
        raise ValueError("bad row")
except ValueError:
    pass
tracing.shutdown()
""" % TRACE


class Requests(Receiver):
    """A receiver that keeps each span's resource and scope too: (resource, scope, span) in .kept."""

    def __init__(self, port: int):
        super().__init__(port)
        self.kept = []

    def Export(self, request, context):
        with self.lock:
            self.kept += [(r.resource, s.scope, span) for r in request.resource_spans for s in r.scope_spans
                          for span in s.spans]
        return super().Export(request, context)


def test_a_kept_span_reaches_the_collector_as_the_sdks_tracer_sends_it():
    """serving/common/spans.py records spans itself and hands them to the SDK as ReadableSpans: the
    same request (a caller's traceparent and tracestate, attributes of each type, a child, an
    exception) made by our hooks and by the SDK's own tracer in one process arrives the same, but
    for ids, times and the stack trace's frames, under the same resource and scope."""
    receiver = Requests(free_port())
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}", "OTEL_EXPORTER_OTLP_INSECURE": "true"}
    try:
        subprocess.run([sys.executable, "-c", SAME_SPANS], env=os.environ | env, check=True, timeout=60)
    finally:
        receiver.stop()
    assert len(receiver.kept) == 4, [s.name for _, _, s in receiver.kept]
    for _, _, span in receiver.kept:  # what differs by nature: ids, times, the frames, the request's name
        request = span.parent_span_id.hex() == "00000000000000aa"
        for field in ("span_id", "start_time_unix_nano", "end_time_unix_nano"):
            span.ClearField(field)
        if not request:
            span.ClearField("parent_span_id")
        span.name = "request" if request else span.name
        for event in span.events:
            (stack,) = [a for a in event.attributes if a.key == "exception.stacktrace"]
            assert stack.value.string_value.endswith("ValueError: bad row\n")
            stack.value.string_value = ""
            event.ClearField("time_unix_nano")
    assert len({span.SerializeToString() for _, _, span in receiver.kept}) == 2  # a request and a tokenize, twice each
    assert len({(r.SerializeToString(), s.SerializeToString()) for r, s, _ in receiver.kept}) == 1
    assert receiver.kept[0][1].name == "rnnserve"


def test_tracing_uses_only_the_public_names_of_opentelemetry():
    """spans.py and tracing.py import no private module or name of OpenTelemetry, read or set no
    private attribute of anything, and subclass nothing of it (no method of the SDK overridden):
    a patch release of the SDK can change only what it documents."""
    for path in (Path("serving/common/spans.py"), Path("serving/common/tracing.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module.startswith("opentelemetry"):
                names = node.module.split(".") + [a.name for a in node.names]
                assert not [n for n in names if n.startswith("_")], f"{path}:{node.lineno} imports {names}"
            if isinstance(node, ast.Attribute):
                private = node.attr.startswith("_") and not node.attr.startswith("__")
                assert not private, f"{path}:{node.lineno} uses .{node.attr}"
            if isinstance(node, ast.ClassDef):
                assert not node.bases, f"{path}:{node.lineno} subclasses {[ast.unparse(b) for b in node.bases]}"


def test_a_refused_rpc_records_the_exception_as_the_sdk_does(traced):
    receiver, url, grpc_port = traced
    caller, header = traceparent(11)
    with pytest.raises(triton.InferenceServerException):
        triton.InferenceServerClient(f"127.0.0.1:{grpc_port}").get_model_metadata("nope", headers={"traceparent": header})
    (_, request), = spans_under(receiver, caller, {"inference.GRPCInferenceService/ModelMetadata"}).values()
    assert request.status.code == request.status.STATUS_CODE_ERROR
    assert request.status.message == "Refused: unknown model 'nope'"
    (event,) = request.events
    assert event.name == "exception" and attributes(event)["exception.type"] == "serving.frontend.core.refused.Refused"


def test_other_libraries_spans_are_exported_too(traced):
    """The SDK's tracer provider stays the global one, with our exporter: FastAPI's own spans for
    the routes it serves (here the model's metadata) reach the collector beside ours."""
    receiver, url, _ = traced
    caller, header = traceparent(12)
    assert httpx.get(f"{url}/v2/models/clf", headers={"traceparent": header}).status_code == 200
    found = spans_under(receiver, caller, {"GET /v2/models/{name}"})
    assert "GET /v2/models/{name}" in found, f"spans under the caller: {sorted(found)}"


def test_without_a_traceparent_a_request_starts_its_own_trace(traced):
    receiver, url, _ = traced
    r = httpx.post(f"{url}/v1/models/clf:predict", json={"instances": ["plain"]}, headers={"x-request-id": "untraced-1"})
    assert r.status_code == 200
    deadline = time.time() + 10
    while time.time() < deadline:
        with receiver.lock:
            mine = [s for _, s in receiver.spans if attributes(s).get("rnnserve.request_id") == "untraced-1"]
        if mine:
            break
        time.sleep(0.1)
    assert mine and mine[0].parent_span_id == b"" and mine[0].trace_id.hex() != TRACE


def test_a_caller_that_does_not_sample_its_trace_gets_no_spans(traced):
    """The standard parent-based sampler: flags 00 in the traceparent, nothing recorded anywhere."""
    receiver, url, _ = traced
    unsampled = "1f" * 16
    r = httpx.post(f"{url}/v1/models/clf:predict", json={"instances": ["not sampled"]},
                   headers={"traceparent": f"00-{unsampled}-00000000000000aa-00", "x-request-id": "unsampled-1"})
    assert r.status_code == 200
    marker, header = traceparent(9)  # a sampled request after it: once its spans are in, so would the other's be
    assert httpx.post(f"{url}/v1/models/clf:predict", json={"instances": ["sampled"]},
                      headers={"traceparent": header}).status_code == 200
    check_request(receiver, marker, "POST /v1/models/{name}:predict")
    with receiver.lock:
        assert not [s for _, s in receiver.spans if s.trace_id.hex() == unsampled]


def test_a_ratio_sampler_keeps_its_share_of_requests_each_with_its_whole_trace(tmp_path):
    """OTEL_TRACES_SAMPLER=traceidratio at 0.5, no caller traceparent: the front-end asks the sampler
    before it makes a request span, with the trace id the span then gets, so its decision is the
    span's (asked twice with different ids it would keep a quarter); each kept request has its
    tokenize and queued spans, and a dropped one leaves nothing, in the engine either."""
    repository = tiny_repository(tmp_path)
    receiver = Receiver(free_port())
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{receiver.port}")
        env.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        env.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        env.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
        env.setenv("OTEL_TRACES_SAMPLER_ARG", "0.5")
        process, url = serve(repository, tracing="otlp", max_queue_delay_ms=2)
    try:
        with httpx.Client(base_url=url) as client:
            for i in range(200):
                assert client.post("/v1/models/clf:predict", json={"instances": [f"text {i}"]}).status_code == 200
        time.sleep(1.0)  # two export periods of every process
        with receiver.lock:
            spans = [s for _, s in receiver.spans]
        requests = {s.trace_id for s in spans if s.name == "POST /v1/models/{name}:predict"}
        children = {name: {s.trace_id for s in spans if s.name == name} for name in ("tokenize", "queued")}
        print(f"{len(requests)} of 200 requests traced")
        assert 65 <= len(requests) <= 135  # binomial(200, 0.5): 5 standard deviations either side
        assert children["tokenize"] == children["queued"] == requests
    finally:
        process.terminate()
        process.wait(30)
        receiver.stop()


def test_the_receiver_prints_each_span_it_gets(tmp_path):
    """python -m loadtest.otlp prints every span as it arrives (its docstring's promise)."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    port = free_port()
    receiver = subprocess.Popen([sys.executable, "-m", "loadtest.otlp", "--port", str(port)], stdout=subprocess.PIPE,
                                text=True)
    try:
        assert "receiving OTLP traces" in receiver.stdout.readline()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(f"127.0.0.1:{port}", insecure=True)))
        with provider.get_tracer("test").start_as_current_span("the span to print", attributes={"rnnserve.rows": 3}):
            pass
        provider.shutdown()
        line = receiver.stdout.readline()
        assert "the span to print" in line and "rnnserve.rows=3" in line and " ms " in line, line
    finally:
        receiver.terminate()
        receiver.wait(10)
