"""Locust users for rnnserve: the text predict API, V2 infer (JSON tensors, binary tensors, gRPC),
and streaming generation.

    python -m loadtest run --host http://127.0.0.1:8000 --users 64 --duration 60s --scenario predict
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 PredictUser   # the web UI

Settings from the environment: RNNSERVE_LOADTEST_MODEL (classifier, default imdb-gru),
RNNSERVE_LOADTEST_LM (language model, default timemachine-gru), RNNSERVE_LOADTEST_WORKLOAD
(short: 16-128 words of an IMDB test review; long: whole reviews), RNNSERVE_LOADTEST_SEED,
RNNSERVE_LOADTEST_ROWS (rows per V2 request, default 1), RNNSERVE_LOADTEST_GRPC (the gRPC
address, default the host's name and port 8001).
No think time. Generation reports two custom entries: "time to first token" (ms) and
"tokens per second" (its "response time" column holds tokens/s).
"""
import json
import os
import random
import time
from urllib.parse import urlsplit
from urllib.request import urlopen

import grpc.experimental.gevent
from locust import FastHttpUser, User, constant, task
from tritonclient.grpc import service_pb2 as pb, service_pb2_grpc

from core.codec import pad
from loadtest.workloads import PROMPTS, predict_body, texts, v2_binary_body, v2_body

grpc.experimental.gevent.init_gevent()  # gRPC calls yield to Locust's other users

MODEL = os.environ.get("RNNSERVE_LOADTEST_MODEL", "imdb-gru")
LM = os.environ.get("RNNSERVE_LOADTEST_LM", "timemachine-gru")
WORKLOAD = os.environ.get("RNNSERVE_LOADTEST_WORKLOAD", "short")
SEED = int(os.environ.get("RNNSERVE_LOADTEST_SEED", "0"))
ROWS = int(os.environ.get("RNNSERVE_LOADTEST_ROWS", "1"))
HEADERS = {"Content-Type": "application/json"}


REQUEST_TEXTS = texts(WORKLOAD, 2000, SEED)  # read at import, before Locust's run-time clock starts


class PredictUser(FastHttpUser):
    """KServe V1 text API: one IMDB text per request."""
    wait_time = constant(0)

    def on_start(self):
        self.rng = random.Random(SEED + id(self))

    @task
    def predict(self):
        body = predict_body(self.rng.choice(REQUEST_TEXTS))
        with self.client.post(f"/v1/models/{MODEL}:predict", data=body, headers=HEADERS,
                              name="v1 predict", catch_response=True) as r:
            if r.status_code != 200 or "predictions" not in r.text:
                r.failure(f"{r.status_code}: {r.text[:200]}")


def random_rows(rng: random.Random, vocab_size: int) -> list[list[int]]:
    """ROWS pre-tokenized rows of 16-128 ids."""
    return [[rng.randrange(2, vocab_size) for _ in range(rng.randint(16, 128))] for _ in range(ROWS)]


class V2User(FastHttpUser):
    """Open Inference Protocol infer, JSON tensors: ROWS pre-tokenized rows per request."""
    wait_time = constant(0)

    def on_start(self):
        self.rng = random.Random(SEED + id(self))
        self.vocab_size = self.client.get(f"/v1/models/{MODEL}").json()["vocab_size"]

    @task
    def infer(self):
        body = v2_body(*random_rows(self.rng, self.vocab_size))
        with self.client.post(f"/v2/models/{MODEL}/infer", data=body, headers=HEADERS,
                              name="v2 infer", catch_response=True) as r:
            if r.status_code != 200 or '"logits"' not in r.text:
                r.failure(f"{r.status_code}: {r.text[:200]}")


class V2BinaryUser(V2User):
    """Open Inference Protocol infer, binary tensors in and out (tritonclient.http's default)."""

    @task
    def infer(self):
        body, header_length = v2_binary_body(*random_rows(self.rng, self.vocab_size))
        headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(header_length)}
        with self.client.post(f"/v2/models/{MODEL}/infer", data=body, headers=headers,
                              name="v2 infer (binary)", catch_response=True) as r:
            if r.status_code != 200 or "Inference-Header-Content-Length" not in r.headers:
                r.failure(f"{r.status_code}: {r.text[:200]}")


class GrpcUser(User):
    """KServe V2 over gRPC, raw tensor contents in and out."""
    wait_time = constant(0)

    def on_start(self):
        self.rng = random.Random(SEED + id(self))
        address = os.environ.get("RNNSERVE_LOADTEST_GRPC", f"{urlsplit(self.host).hostname}:8001")
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address))
        with urlopen(f"{self.host}/v1/models/{MODEL}") as r:
            self.vocab_size = json.load(r)["vocab_size"]

    @task
    def infer(self):
        ids, lengths = pad(random_rows(self.rng, self.vocab_size))
        request = pb.ModelInferRequest(model_name=MODEL, raw_input_contents=[ids.tobytes(), lengths.tobytes()],
                                       inputs=[pb.ModelInferRequest.InferInputTensor(name="input_ids", datatype="INT64", shape=ids.shape),
                                               pb.ModelInferRequest.InferInputTensor(name="lengths", datatype="INT64", shape=lengths.shape)])
        started, exception, size = time.perf_counter(), None, 0
        try:
            size = len(self.stub.ModelInfer(request, timeout=30).raw_output_contents[0])
        except grpc.RpcError as e:
            exception = e
        self.environment.events.request.fire(request_type="gRPC", name="ModelInfer", response_length=size,
                                             response_time=(time.perf_counter() - started) * 1000,
                                             exception=exception, context={})


class GenerateUser(FastHttpUser):
    """Streaming generation: 100 tokens after a Time Machine prompt."""
    wait_time = constant(0)

    def on_start(self):
        self.rng = random.Random(SEED + id(self))

    @task
    def generate(self):
        body = json.dumps({"prompt": self.rng.choice(PROMPTS), "max_new_tokens": 100, "temperature": 1.0,
                           "seed": self.rng.randrange(10 ** 6), "stream": True}).encode()
        started, first, tokens = time.perf_counter(), None, 0
        with self.client.post(f"/v1/models/{LM}:generate", data=body, headers=HEADERS, stream=True,
                              name="generate (stream)", catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}")
                return
            for chunk in r.iter_content(chunk_size=256, decode_content=False):
                new = chunk.count(b'{"token"')
                if new and first is None:
                    first = time.perf_counter()
                tokens += new
        if first is None:
            return
        elapsed = time.perf_counter() - started
        fire = self.environment.events.request.fire
        fire(request_type="SSE", name="time to first token", response_time=(first - started) * 1000,
             response_length=0, exception=None, context={})
        fire(request_type="SSE", name="tokens per second", response_time=tokens / elapsed,
             response_length=tokens, exception=None, context={})
