"""Locust users for rnnserve: the text predict API, V2 infer, and streaming generation.

    python -m loadtest run --host http://127.0.0.1:8000 --users 64 --duration 60s --scenario predict
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 PredictUser   # the web UI

Settings from the environment: RNNSERVE_LOADTEST_MODEL (classifier, default imdb-gru),
RNNSERVE_LOADTEST_LM (language model, default timemachine-gru), RNNSERVE_LOADTEST_WORKLOAD
(short: 16-128 words of an IMDB test review; long: whole reviews), RNNSERVE_LOADTEST_SEED.
No think time. Generation reports two custom entries: "time to first token" (ms) and
"tokens per second" (its "response time" column holds tokens/s).
"""
import json
import os
import random
import time

from locust import FastHttpUser, constant, task

from loadtest.workloads import PROMPTS, predict_body, texts, v2_body

MODEL = os.environ.get("RNNSERVE_LOADTEST_MODEL", "imdb-gru")
LM = os.environ.get("RNNSERVE_LOADTEST_LM", "timemachine-gru")
WORKLOAD = os.environ.get("RNNSERVE_LOADTEST_WORKLOAD", "short")
SEED = int(os.environ.get("RNNSERVE_LOADTEST_SEED", "0"))
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


class V2User(FastHttpUser):
    """Open Inference Protocol infer: one pre-tokenized row of 16-128 ids per request."""
    wait_time = constant(0)

    def on_start(self):
        self.rng = random.Random(SEED + id(self))
        self.vocab_size = self.client.get(f"/v1/models/{MODEL}").json()["vocab_size"]

    @task
    def infer(self):
        row = [self.rng.randrange(2, self.vocab_size) for _ in range(self.rng.randint(16, 128))]
        with self.client.post(f"/v2/models/{MODEL}/infer", data=v2_body(row), headers=HEADERS,
                              name="v2 infer", catch_response=True) as r:
            if r.status_code != 200 or '"logits"' not in r.text:
                r.failure(f"{r.status_code}: {r.text[:200]}")


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
