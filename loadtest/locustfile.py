"""Locust users for rnnserve: the text predict API, V2 infer (JSON tensors, binary tensors, gRPC),
and streaming generation.

    python -m loadtest run --host http://127.0.0.1:8000 --users 64 --duration 60s --scenario predict
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 PredictUser   # the web UI

Settings from the environment: RNNSERVE_LOADTEST_MODEL (classifier, default imdb-gru),
RNNSERVE_LOADTEST_LM (language model, default timemachine-gru), RNNSERVE_LOADTEST_WORKLOAD
(short: 16-128 words of an IMDB test review; long: whole reviews), RNNSERVE_LOADTEST_SEED,
RNNSERVE_LOADTEST_ROWS (rows per V2 request, default 1), RNNSERVE_LOADTEST_GRPC (the gRPC
address, default the host's name and port 8001).
No think time, but a user whose connection is refused backs off (BacksOff). Generation's tokens
and times to first token go, stream by stream, to the file RNNSERVE_LOADTEST_STREAMS names, which
python -m loadtest run summarises as rates (loadtest/headless.py).
"""
import json
import os
import random
import time
from pathlib import Path
from urllib.request import urlopen

import grpc.experimental.gevent
from locust import FastHttpUser, User, events, task
from tritonclient.grpc import service_pb2 as pb, service_pb2_grpc

from core.codec import pad
from loadtest.headless import grpc_address
from loadtest.workloads import PROMPTS, predict_body, texts, v2_binary_body, v2_body

grpc.experimental.gevent.init_gevent()  # gRPC calls yield to Locust's other users

MODEL = os.environ.get("RNNSERVE_LOADTEST_MODEL", "imdb-gru")
LM = os.environ.get("RNNSERVE_LOADTEST_LM", "timemachine-gru")
WORKLOAD = os.environ.get("RNNSERVE_LOADTEST_WORKLOAD", "short")
SEED = int(os.environ.get("RNNSERVE_LOADTEST_SEED", "0"))
ROWS = int(os.environ.get("RNNSERVE_LOADTEST_ROWS", "1"))
HEADERS = {"Content-Type": "application/json"}
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.1, 5.0
STREAMS: list[list[float]] = []  # each generation's [started, first token, ended] (seconds) and tokens


REQUEST_TEXTS = texts(WORKLOAD, 2000, SEED)  # read at import, before Locust's run-time clock starts


class BacksOff:
    """No wait between a user's requests while the server answers; after a refused connection
    BACKOFF_FIRST_S, doubled with each refusal up to BACKOFF_MAX_S. (With no wait a user against a
    closed port tries again at once, a thousand times a second, and its failures swamp the report.)"""
    backoff_s = 0.0

    def wait_time(self) -> float:
        return self.backoff_s

    def back_off(self, error: BaseException | None):
        """After each request, with what its connection met (None: an answer). Over gRPC a refused
        connection is UNAVAILABLE, as is a server shedding load: both are reasons to wait."""
        refused = isinstance(error, ConnectionRefusedError) or (
            isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.UNAVAILABLE)
        self.backoff_s = min(2 * self.backoff_s or BACKOFF_FIRST_S, BACKOFF_MAX_S) if refused else 0.0

    def answered(self, response) -> bool:
        """back_off, then whether an HTTP response came (if not, Locust counts its error as the failure)."""
        self.back_off(getattr(response, "error", None))
        return response.status_code != 0


class PredictUser(BacksOff, FastHttpUser):
    """KServe V1 text API: one IMDB text per request."""

    def on_start(self):
        self.rng = random.Random(SEED + id(self))

    @task
    def predict(self):
        body = predict_body(self.rng.choice(REQUEST_TEXTS))
        with self.client.post(f"/v1/models/{MODEL}:predict", data=body, headers=HEADERS,
                              name="v1 predict", catch_response=True) as r:
            if self.answered(r) and (r.status_code != 200 or "predictions" not in r.text):
                r.failure(f"{r.status_code}: {r.text[:200]}")


def random_rows(rng: random.Random, model: dict) -> list[list[int]]:
    """ROWS pre-tokenized rows of 16-128 ids, cut at the model's max_len (as its V1 cuts texts;
    V2 refuses longer rows). model: GET /v1/models/{name}'s answer."""
    return [[rng.randrange(2, model["vocab_size"]) for _ in range(min(rng.randint(16, 128), model["max_len"]))]
            for _ in range(ROWS)]


class V2User(BacksOff, FastHttpUser):
    """Open Inference Protocol infer, JSON tensors: ROWS pre-tokenized rows per request."""

    def on_start(self):
        self.rng = random.Random(SEED + id(self))
        self.model = self.client.get(f"/v1/models/{MODEL}", name="v1 model").json()

    @task
    def infer(self):
        body = v2_body(*random_rows(self.rng, self.model))
        with self.client.post(f"/v2/models/{MODEL}/infer", data=body, headers=HEADERS,
                              name="v2 infer", catch_response=True) as r:
            if self.answered(r) and (r.status_code != 200 or '"logits"' not in r.text):
                r.failure(f"{r.status_code}: {r.text[:200]}")


class V2BinaryUser(V2User):
    """Open Inference Protocol infer, binary tensors in and out (tritonclient.http's default)."""

    @task
    def infer(self):
        body, header_length = v2_binary_body(*random_rows(self.rng, self.model))
        headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(header_length)}
        with self.client.post(f"/v2/models/{MODEL}/infer", data=body, headers=headers,
                              name="v2 infer (binary)", catch_response=True) as r:
            if self.answered(r) and (r.status_code != 200 or "Inference-Header-Content-Length" not in r.headers):
                r.failure(f"{r.status_code}: {r.text[:200]}")


class GrpcUser(BacksOff, User):
    """KServe V2 over gRPC, raw tensor contents in and out."""

    def on_start(self):
        self.rng = random.Random(SEED + id(self))
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(grpc_address(self.host)))
        with urlopen(f"{self.host}/v1/models/{MODEL}") as r:
            self.model = json.load(r)

    @task
    def infer(self):
        ids, lengths = pad(random_rows(self.rng, self.model))
        request = pb.ModelInferRequest(model_name=MODEL, raw_input_contents=[ids.tobytes(), lengths.tobytes()],
                                       inputs=[pb.ModelInferRequest.InferInputTensor(name="input_ids", datatype="INT64", shape=ids.shape),
                                               pb.ModelInferRequest.InferInputTensor(name="lengths", datatype="INT64", shape=lengths.shape)])
        started, exception, size = time.perf_counter(), None, 0
        try:
            size = len(self.stub.ModelInfer(request, timeout=30).raw_output_contents[0])
        except grpc.RpcError as e:
            exception = e
        self.back_off(exception)
        self.environment.events.request.fire(request_type="gRPC", name="ModelInfer", response_length=size,
                                             response_time=(time.perf_counter() - started) * 1000,
                                             exception=exception, context={})


class GenerateUser(BacksOff, FastHttpUser):
    """Streaming generation: 100 tokens after a Time Machine prompt."""

    def on_start(self):
        self.rng = random.Random(SEED + id(self))

    @task
    def generate(self):
        body = json.dumps({"prompt": self.rng.choice(PROMPTS), "max_new_tokens": 100, "temperature": 1.0,
                           "seed": self.rng.randrange(10 ** 6), "stream": True}).encode()
        started, first, tokens = time.perf_counter(), None, 0
        with self.client.post(f"/v1/models/{LM}:generate", data=body, headers=HEADERS, stream=True,
                              name="generate (stream)", catch_response=True) as r:
            if not self.answered(r):
                return
            if r.status_code != 200:
                r.failure(f"{r.status_code}")
                return
            for chunk in r.iter_content(chunk_size=256, decode_content=False):
                new = chunk.count(b'{"token"')
                if new and first is None:
                    first = time.perf_counter()
                tokens += new
        if first is not None:
            STREAMS.append([started, first, time.perf_counter(), tokens])


@events.test_stop.add_listener
def write_streams(**_):
    """Each generation's timings, for python -m loadtest run's summary, where it asks for them."""
    if path := os.environ.get("RNNSERVE_LOADTEST_STREAMS"):
        Path(path).write_text(json.dumps(STREAMS))
