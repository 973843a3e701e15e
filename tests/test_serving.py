import asyncio
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from core.tokenize import Tokenizer
from core.repository import ServingConfig, read_version
from serving.engine.batching import plan_calls
from serving.engine.runner import ModelLoadError, Runner
from serving.common.settings import Settings
from tests.serving_fixtures import Server, alone, device_here, graph_logits, sample, slowed, tiny_repository

TEXTS = ["good film", "the plot was awful awful awful", "a", "great great good film the plot " * 3,
         "bad", "unknownword film", "the a the a good bad great awful plot film"]


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    return tiny_repository(tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="module", params=[False, True], ids=["inline", "device-thread"])
def server(repository, request):
    """The calls inline in the engine's loop (the CPU's default) and on its device thread (a GPU's)."""
    s = Server(repository, max_queue_delay_ms=5, device_thread=request.param)
    yield s
    s.stop()


def test_v1_predict_answers_like_the_graph_alone(server, repository):
    r = httpx.post(f"{server.url}/v1/models/clf:predict", json={"instances": TEXTS})
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    assert len(predictions) == len(TEXTS)
    for text, p in zip(TEXTS, predictions):
        expected = alone(repository, text)
        assert set(p) == {"label", "score", "probabilities", "truncated"}
        assert np.abs(np.array([p["probabilities"]["neg"], p["probabilities"]["pos"]]) - expected).max() < 1e-5
        assert p["label"] == ["neg", "pos"][int(expected.argmax())] and p["score"] == max(p["probabilities"].values())
    assert [p["truncated"] for p in predictions] == [len(Tokenizer("word")(t)) > 12 for t in TEXTS]


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server, repository):
    rng = np.random.default_rng(0)
    words = ["good", "bad", "film", "plot", "great", "awful", "the", "a"]
    texts = [" ".join(rng.choice(words, rng.integers(1, 20))) for _ in range(300)]

    async def fire():
        async with httpx.AsyncClient(base_url=server.url, timeout=30,
                                     limits=httpx.Limits(max_connections=300)) as client:
            return await asyncio.gather(*(client.post("/v1/models/clf:predict", json={"instances": [t]})
                                          for t in texts))

    before = batch_counts(server)
    responses = asyncio.run(fire())
    assert all(r.status_code == 200 for r in responses), {r.status_code for r in responses}
    for text, r in zip(texts, responses):
        p = r.json()["predictions"][0]["probabilities"]
        assert np.abs(np.array([p["neg"], p["pos"]]) - alone(repository, text)).max() < 1e-5
    calls, rows = (a - b for a, b in zip(batch_counts(server), before))
    print(f"{rows:.0f} rows in {calls:.0f} calls")
    assert rows == 300 and calls <= rows / 2, (calls, rows)  # two rows or more per call on average


def batch_counts(server) -> tuple[float, float]:
    text = httpx.get(f"{server.url}/metrics").text
    count = re.search(r'rnnserve_batch_size_count\{model="clf"\} (\S+)', text)
    total = re.search(r'rnnserve_batch_size_sum\{model="clf"\} (\S+)', text)
    return (float(count[1]), float(total[1])) if count else (0.0, 0.0)


BAD_REQUESTS = [
    ("/v1/models/clf:predict", b"{not json", 400),
    ("/v1/models/clf:predict", b'{"instances": "not a list"}', 400),
    ("/v1/models/clf:predict", b'{"texts": ["wrong field"]}', 400),
    ("/v1/models/clf:predict", b'{"instances": []}', 400),
    ("/v1/models/clf:predict", b'{"instances": ["fine", "  "]}', 400),
    ("/v1/models/clf:predict", b'{"instances": [3]}', 400),
    ("/v1/models/clf:predict", b'{"instances": ["\xff\xfe bad utf-8"]}', 400),
    ("/v1/models/clf:predict", json.dumps({"instances": ["x"] * 257}).encode(), 413),
    ("/v1/models/nope:predict", b'{"instances": ["x"]}', 404),
    ("/v1/models/lm:predict", b'{"instances": ["x"]}', 400),
    ("/v1/models/clf:predict", b'{"instances": ["a"], "foo": 1}', 400),  # an unknown field: refused, never ignored
    ("/v1/models/lm:generate", b'{"prompt": "a", "max_tokens": 5}', 400),
    ("/v2/models/nope/infer", b'{"inputs": []}', 404),
    ("/v2/models/clf/versions/7/infer", b'{"inputs": []}', 404),
]


def v2_body(**changes) -> bytes:
    ids = {"name": "input_ids", "shape": [2, 3], "datatype": "INT64", "data": [[2, 3, 4], [5, 6, 0]]}
    lengths = {"name": "lengths", "shape": [2], "datatype": "INT64", "data": [3, 2]}
    for key, value in changes.items():
        target, field = key.split("__")
        (ids if target == "ids" else lengths)[field] = value
    return json.dumps({"inputs": [ids, lengths]}).encode()


BAD_V2 = [v2_body(ids__name="tokens"), v2_body(ids__datatype="FP32"), v2_body(ids__shape=[6]),
          v2_body(ids__data=[2, 3, 4, 5]), v2_body(lengths__data=[3, 4]), v2_body(lengths__data=[0, 2]),
          v2_body(ids__data=[[2, 3, 4], [5, 6, 99]]), v2_body(ids__data=[["a", "b", "c"], [1, 2, 3]]),
          v2_body(lengths__shape=[3], lengths__data=[1, 1, 1]), v2_body(ids__dtype="INT64")]


@pytest.mark.parametrize("path,body,status", BAD_REQUESTS + [("/v2/models/clf/infer", b, 400) for b in BAD_V2])
def test_bad_input_gets_a_clear_4xx_and_the_server_goes_on(server, path, body, status):
    r = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert isinstance(r.json()["error"], str) and r.json()["error"]
    ok = httpx.post(f"{server.url}/v1/models/clf:predict", json={"instances": ["good film"]})
    assert ok.status_code == 200


def test_body_over_the_limit_is_413(repository):
    s = Server(repository, max_body_bytes=1000)
    try:
        r = httpx.post(f"{s.url}/v1/models/clf:predict", json={"instances": ["good " * 300]})
        assert r.status_code == 413 and "bytes" in r.json()["error"]
        assert httpx.post(f"{s.url}/v1/models/clf:predict", json={"instances": ["good"]}).status_code == 200
    finally:
        s.stop()


def test_v2_endpoints_return_the_documented_shapes(server, repository):
    get = lambda path: httpx.get(server.url + path)
    assert get("/v2/health/live").status_code == 200 and get("/v2/health/ready").status_code == 200
    assert set(get("/v2").json()) == {"name", "version", "extensions"}
    meta = get("/v2/models/clf").json()
    assert meta == {"name": "clf", "versions": ["1"], "platform": "onnxruntime_onnx",
                    "inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
                               {"name": "lengths", "datatype": "INT64", "shape": [-1, 1]},
                               {"name": "text_input", "datatype": "BYTES", "shape": [-1, 1]}],
                    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 2]},
                                {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
                                {"name": "label", "datatype": "BYTES", "shape": [-1, 1]}],
                    "parameters": dict(zip(("provider", "device"), device_here()))}
    assert get("/v2/models/clf/versions/1").json() == meta
    assert get("/v2/models/clf/ready").status_code == 200 and get("/v2/models/clf/versions/1/ready").status_code == 200
    for unready in ("/v2/models/clf/versions/2/ready", "/v2/models/nope/ready"):  # Triton's answer: 400, saying why
        r = get(unready)
        assert r.status_code == 400 and r.json()["error"].startswith("not ready: ") and r.json()["request_id"], r.text
    r = httpx.post(f"{server.url}/v2/models/clf/infer", content=v2_body())  # no content-type, as some clients send
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"model_name", "model_version", "outputs"} and body["model_version"] == "1"
    (out,) = body["outputs"]
    assert (out["name"], out["shape"], out["datatype"], len(out["data"])) == ("logits", [2, 2], "FP32", 4)
    sess = ort.InferenceSession(str(repository / "clf" / "1" / "model.onnx"))
    expected = sess.run(None, {"input_ids": np.array([[2, 3, 4]]), "lengths": np.array([3])})[0]
    assert np.abs(np.array(out["data"][:2]) - expected[0]).max() < 1e-5
    lm = httpx.post(f"{server.url}/v2/models/lm/infer", json={"id": "r1", "inputs": [
        {"name": "input_ids", "shape": [2, 3], "datatype": "INT64", "data": [2, 3, 4, 5, 0, 0]},
        {"name": "lengths", "shape": [2], "datatype": "INT64", "data": [3, 1]}]}).json()
    assert lm["id"] == "r1" and lm["outputs"][0]["shape"] == [2, 3, 12]


def test_v1_model_listing_shows_versions_task_labels_and_provider(server):
    models = {m["name"]: m for m in httpx.get(f"{server.url}/v1/models").json()["models"]}
    assert models["clf"]["labels"] == ["neg", "pos"] and models["clf"]["task"] == "classifier"
    assert models["lm"]["task"] == "lm" and (models["clf"]["provider"], models["clf"]["device"]) == device_here()
    assert httpx.get(f"{server.url}/v1/models/clf").json()["version"] == "1"
    assert httpx.get(f"{server.url}/v1/models/nope").status_code == 404


def test_metrics_count_what_the_requests_did(server, repository):
    """One request of three texts (1, 2 and 3 tokens: one call, 9 padded tokens for 6 real) and
    one for a model that does not exist: each metric moves by what they did, no more."""
    texts = ["good", "good film", "good film plot"]
    codec = read_version(repository / "clf" / "1").codec
    assert [len(codec.encode(t)[0]) for t in texts] == [1, 2, 3]
    before = httpx.get(f"{server.url}/metrics").text
    assert httpx.post(f"{server.url}/v1/models/clf:predict", json={"instances": texts}).status_code == 200
    assert httpx.post(f"{server.url}/v1/models/nope:predict", json={"instances": ["good"]}).status_code == 404
    after = httpx.get(f"{server.url}/metrics").text
    expected = {  # series: how much it moved
        'rnnserve_requests_total{endpoint="v1_predict",model="clf",status="200",version="1"}': 1,
        'rnnserve_requests_total{endpoint="v1_predict",model="_not_deployed",status="404",version="none"}': 1,
        'rnnserve_request_latency_seconds_count{endpoint="v1_predict",model="clf",version="1"}': 1,
        'rnnserve_queue_time_seconds_count{model="clf"}': 1, 'rnnserve_inference_time_seconds_count{model="clf"}': 1,
        'rnnserve_batch_size_count{model="clf"}': 1, 'rnnserve_batch_size_sum{model="clf"}': 3,
        'rnnserve_batch_size_bucket{le="2.0",model="clf"}': 0, 'rnnserve_batch_size_bucket{le="4.0",model="clf"}': 1,
        'rnnserve_padding_ratio_count{model="clf"}': 1, 'rnnserve_padding_ratio_sum{model="clf"}': 0.5,
        'rnnserve_padding_ratio_bucket{le="0.25",model="clf"}': 0,
        'rnnserve_padding_ratio_bucket{le="0.5",model="clf"}': 1}
    assert {series: sample(after, series) - sample(before, series) for series in expected} == expected
    latency, queued, ran = (sample(after, series) - sample(before, series) for series in (
        'rnnserve_request_latency_seconds_sum{endpoint="v1_predict",model="clf",version="1"}',
        'rnnserve_queue_time_seconds_sum{model="clf"}', 'rnnserve_inference_time_seconds_sum{model="clf"}'))
    print(f"latency {latency * 1000:.1f} ms: queued {queued * 1000:.1f} ms, ran {ran * 1000:.1f} ms")
    assert 0 < queued and 0 < ran and queued + ran < latency < 30  # the request's own times
    assert re.search(r'^rnnserve_queue_depth\{model="clf"\} 0\.0$', after, re.M)  # a sample, nothing left waiting


def test_the_queue_depth_rises_under_load_before_latency_does(repository):
    """Twelve requests at once to a slow model (one row per call, each call 0.2 s longer): /metrics
    counts ten rows waiting while at most the first request has been answered; the later ones
    then answer slower and slower (the last over five times slower than the first). Once all are
    answered the gauge is back to zero."""
    s = Server(repository, max_batch_size=1)
    slowed(s, "clf", 0.2)
    depth = 'rnnserve_queue_depth{model="clf"}'
    try:
        async def timed(client):
            started = time.perf_counter()
            r = await client.post("/v1/models/clf:predict", json={"instances": ["good film"]})
            return r.status_code, time.perf_counter() - started

        async def scenario():
            async with httpx.AsyncClient(base_url=s.url, timeout=30) as client:
                posts = [asyncio.create_task(timed(client)) for _ in range(12)]
                seen = []  # (rows waiting, requests answered) while they run
                while not all(p.done() for p in posts):
                    seen.append((sample((await client.get("/metrics")).text, depth), sum(p.done() for p in posts)))
                    await asyncio.sleep(0.02)
                return seen, sorted([await p for p in posts], key=lambda a: a[1]), sample(
                    (await client.get("/metrics")).text, depth)

        seen, answers, after = asyncio.run(scenario())
        latencies = [round(t, 2) for _, t in answers]
        print("(rows waiting, answered):", seen[::5], "latencies:", latencies)
        assert [status for status, _ in answers] == [200] * 12
        risen = next(i for i, (rows, _) in enumerate(seen) if rows >= 10)
        assert seen[risen][1] <= 1  # up while at most the first answer is out
        assert latencies[-1] > 5 * latencies[0]  # then latency follows
        assert after == 0
    finally:
        s.stop()


def test_overload_gets_503_at_once_and_the_server_recovers(repository):
    """40 requests at once to a queue of 2 in front of a model whose calls take 0.5 s: the ones
    refused get 503 at once, or at the end of the call in progress (the engine answers between
    calls), before the second accepted one: not after waiting their turn. The server serves again
    afterwards."""
    s = Server(repository, max_queue_size=2, max_batch_size=1)
    runner = s.deployment("clf").runner
    run_call = runner.run_call
    slowed(s, "clf", 0.5)
    try:
        async def timed(client):
            started = time.perf_counter()
            r = await client.post("/v1/models/clf:predict", json={"instances": ["good"]})
            return r, time.perf_counter() - started

        async def fire():
            async with httpx.AsyncClient(base_url=s.url, timeout=30) as client:
                return await asyncio.gather(*(timed(client) for _ in range(40)))
        answers = asyncio.run(fire())
        statuses = [r.status_code for r, _ in answers]
        assert set(statuses) == {200, 503} and statuses.count(503) >= 20, statuses
        assert all(r.headers["retry-after"] == "1" and "retry" in r.json()["error"]
                   for r, _ in answers if r.status_code == 503)
        refused = max(t for r, t in answers if r.status_code == 503)
        accepted = sorted(round(t, 2) for r, t in answers if r.status_code == 200)
        print(f"{statuses.count(503)} refused, the last after {refused:.3f}s; accepted answered after {accepted} s")
        assert len(accepted) >= 2 and refused < accepted[1]  # rejected at once, not after waiting their turn
        runner.run_call = run_call
        assert httpx.post(f"{s.url}/v1/models/clf:predict", json={"instances": ["good"]}).status_code == 200
    finally:
        s.stop()


def v2_rows(*rows) -> dict:
    seq = max(map(len, rows))
    return {"inputs": [{"name": "input_ids", "shape": [len(rows), seq], "datatype": "INT64",
                        "data": [r + [0] * (seq - len(r)) for r in rows]},
                       {"name": "lengths", "shape": [len(rows)], "datatype": "INT64", "data": list(map(len, rows))}]}


def test_a_failing_batch_fails_only_its_requests(repository):
    s = Server(repository, max_queue_delay_ms=100)
    runner = s.deployment("clf").runner
    run_call = runner.run_call

    def poisoned(ids, lengths):
        if (ids == 9).any():
            raise RuntimeError("poisoned row")
        return run_call(ids, lengths)

    runner.run_call = poisoned
    try:
        async def scenario():
            async with httpx.AsyncClient(base_url=s.url, timeout=30) as client:
                return await asyncio.gather(client.post("/v2/models/clf/infer", json=v2_rows([2, 3])),
                                            client.post("/v2/models/clf/infer", json=v2_rows([9])))
        first, second = asyncio.run(scenario())
        assert first.status_code == second.status_code == 500, (first.text, second.text)  # one batch, both failed
        assert "poisoned row" in second.json()["error"]
        later = httpx.post(f"{s.url}/v2/models/clf/infer", json=v2_rows([4, 5, 6]))
        assert later.status_code == 200  # and the engine went on
    finally:
        s.stop()


def test_batch_plan_sorts_by_length_and_respects_both_caps():
    lengths = [5, 1, 9, 3, 3, 20, 2, 8]
    calls = plan_calls(lengths, max_rows=3, max_tokens=20)
    assert sorted(i for c in calls for i in c) == list(range(8))
    for call in calls:
        assert len(call) <= 3 and (len(call) == 1 or len(call) * max(lengths[i] for i in call) <= 20)
    assert [lengths[i] for c in calls for i in c] == sorted(lengths)


def test_a_model_that_does_not_match_its_checksum_is_refused(repository, tmp_path):
    import shutil
    shutil.copytree(repository / "clf", tmp_path / "clf")
    with open(tmp_path / "clf" / "1" / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelLoadError, match="sha256"):
        Runner.load(tmp_path / "clf" / "1", Settings(), ServingConfig())


def test_the_serving_process_imports_no_pytorch():
    code = "import sys, serving.__main__, serving.frontend.app, serving.frontend.grpc.v2; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("device_thread", [False, True], ids=["inline", "device-thread"])
def test_a_request_whose_client_went_away_is_dropped_before_it_runs(repository, device_thread):
    """While the model runs a 0.3 s call, a client gives up on its request after 0.1 s in the
    queue: that request never runs (one sent after it does). On the device thread its batch is
    formed behind the running one already: it is not run."""
    s = Server(repository, max_batch_size=1, max_queue_delay_ms=0, device_thread=device_thread)
    seen = slowed(s, "clf", 0.3)
    try:
        async def scenario():
            async with httpx.AsyncClient(base_url=s.url) as client:
                busy = asyncio.ensure_future(client.post("/v1/models/clf:predict", json={"instances": ["good"]}))
                while not seen:  # the model is now busy with that one
                    await asyncio.sleep(0.01)
                with pytest.raises(httpx.ReadTimeout):  # this client gives up while it waits in the queue
                    await client.post("/v1/models/clf:predict", json={"instances": ["good film plot awful"]},
                                      timeout=0.1)
                later = await client.post("/v1/models/clf:predict", json={"instances": ["good film"]})
                return await busy, later
        busy, later = asyncio.run(scenario())
        assert busy.status_code == later.status_code == 200
        assert seen == [1, 2]  # the 4-token request never ran; the 2-token one after it did
    finally:
        s.stop()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("model", ["clf", "lm"])
def test_an_off_the_shelf_v2_client_works_unchanged(server, repository, model, binary):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(model)
    meta = client.get_model_metadata(model)
    assert meta["inputs"][0]["name"] == "input_ids" and meta["outputs"][0]["datatype"] == "FP32"
    ids, lengths = np.array([[2, 3, 4], [5, 6, 0]], dtype=np.int64), np.array([3, 2], dtype=np.int64)
    inputs = [triton.InferInput("input_ids", list(ids.shape), "INT64"), triton.InferInput("lengths", [2], "INT64")]
    inputs[0].set_data_from_numpy(ids, binary_data=binary)  # binary_data=True is the client's default
    inputs[1].set_data_from_numpy(lengths, binary_data=binary)
    result = client.infer(model, inputs, outputs=[triton.InferRequestedOutput("logits", binary_data=binary)])
    assert ("binary_data_size" in result.get_output("logits").get("parameters", {})) == binary
    assert np.abs(result.as_numpy("logits") - graph_logits(repository, model, ids, lengths)).max() < 1e-5
    if binary:  # no outputs named: the client asks binary_data_output for all
        assert np.array_equal(client.infer(model, inputs).as_numpy("logits"), result.as_numpy("logits"))


def binary_request(*inputs: tuple[str, list[int], bytes], **parameters) -> tuple[bytes, dict]:
    """A V2 body with the binary tensor extension: (name, shape, raw bytes) per input."""
    header = json.dumps({"inputs": [{"name": n, "shape": shape, "datatype": "INT64",
                                     "parameters": {"binary_data_size": len(raw)}} for n, shape, raw in inputs],
                         **parameters}).encode()
    return header + b"".join(raw for _, _, raw in inputs), {"Inference-Header-Content-Length": str(len(header))}


IDS, LENGTHS = np.array([[2, 3, 4], [5, 6, 0]], "<i8").tobytes(), np.array([3, 2], "<i8").tobytes()
GOOD = binary_request(("input_ids", [2, 3], IDS), ("lengths", [2], LENGTHS))
BAD_BINARY = {
    "sizes short of the body": (GOOD[0] + b"\0" * 8, GOOD[1]),
    "truncated body": (GOOD[0][:-8], GOOD[1]),
    "size not shape x datatype": binary_request(("input_ids", [2, 3], IDS[:-8]), ("lengths", [2], LENGTHS)),
    "size not a number": (GOOD[0].replace(b'"binary_data_size": 48', b'"binary_data_size": "48"'), GOOD[1]),
    "header not a number": (GOOD[0], {"Inference-Header-Content-Length": "12a"}),
    "header past the body": (GOOD[0], {"Inference-Header-Content-Length": str(len(GOOD[0]) + 1)}),
    "header missing": (GOOD[0], {}),
    "input the model lacks": binary_request(("input_ids", [2, 3], IDS), ("lengths", [2], LENGTHS), ("h0", [1], IDS[:8])),
    "FP32 bytes": (GOOD[0].replace(b'"INT64"', b'"FP32"', 1), GOOD[1]),
}


@pytest.mark.parametrize("case", BAD_BINARY)
def test_a_malformed_binary_request_gets_400_and_the_server_goes_on(server, case):
    body, headers = BAD_BINARY[case]
    r = httpx.post(f"{server.url}/v2/models/clf/infer", content=body, headers=headers)
    assert r.status_code == 400, r.text
    assert r.json()["error"] and r.json()["request_id"]
    ok = httpx.post(f"{server.url}/v2/models/clf/infer", content=GOOD[0], headers=GOOD[1])
    assert ok.status_code == 200 and len(ok.json()["outputs"][0]["data"]) == 4


@pytest.mark.parametrize("body,headers,says", [
    (*GOOD, None),
    (GOOD[0], {}, "needs the Inference-Header-Content-Length header"),  # a binary body read as JSON: named
    (v2_body(ids__shape=["2", 3]), {}, "body.inputs.0.shape.0: Input should be a valid integer"),  # never coerced
    (json.dumps({"inputs": json.loads(v2_body())["inputs"], "parameters": {"binary_data_output": "yes"}}).encode(), {},
     "binary_data_output must be true or false"),
])
def test_a_v2_request_is_read_strictly_and_its_refusal_says_what_to_fix(server, body, headers, says):
    r = httpx.post(f"{server.url}/v2/models/clf/infer", content=body, headers=headers)
    if says is None:
        assert r.status_code == 200, r.text
    else:
        assert r.status_code == 400 and says in r.json()["error"], r.text


def test_binary_output_is_given_when_asked_and_json_otherwise(server, repository):
    expected = graph_logits(repository, "clf", np.frombuffer(IDS, "<i8").reshape(2, 3), np.frombuffer(LENGTHS, "<i8"))
    json_inputs = json.loads(v2_body())["inputs"]
    for asked, binary in [({"parameters": {"binary_data_output": True}}, True),
                          ({"outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}, True),
                          ({"parameters": {"binary_data_output": True},
                            "outputs": [{"name": "logits", "parameters": {"binary_data": False}}]}, False),
                          ({}, False)]:
        r = httpx.post(f"{server.url}/v2/models/clf/infer", json={"inputs": json_inputs, **asked})
        assert r.status_code == 200, r.text
        if binary:
            length = int(r.headers["Inference-Header-Content-Length"])
            header = json.loads(r.content[:length])
            assert header["outputs"][0]["parameters"]["binary_data_size"] == len(r.content) - length == 16
            got = np.frombuffer(r.content[length:], "<f4").reshape(header["outputs"][0]["shape"])
        else:
            assert "Inference-Header-Content-Length" not in r.headers
            got = np.array(r.json()["outputs"][0]["data"]).reshape(2, 2)
        assert np.abs(got - expected).max() < 1e-5, asked


def raw_request(url: str, head: bytes, timeout_s: float = 10) -> tuple[bytes, float]:
    """Send bytes as they are (headers whose body never comes, say); the answer and its wait."""
    host, port = url.removeprefix("http://").split(":")
    started = time.perf_counter()
    with socket.create_connection((host, int(port)), timeout=timeout_s) as s:
        s.sendall(head)
        answer = s.recv(65536)
    return answer, time.perf_counter() - started


def test_a_models_own_queue_limit_sheds_at_the_front_door_before_the_body(repository, tmp_path):
    """clf's config.json caps its queue at 2 (the server's default is 1024). Once the engine has
    said the queue is full, the front door answers 503 before reading the body (before, it shed
    by the server-wide limit, so a request whose body never came waited for the body timeout:
    408)."""
    repo = tmp_path / "repo"
    shutil.copytree(repository, repo)
    (repo / "clf" / "config.json").write_text(json.dumps({"max_queue_size": 2, "max_batch_size": 1}))
    s = Server(repo, body_timeout_s=5)
    slowed(s, "clf", 2.0)
    try:
        async def fill():
            async with httpx.AsyncClient(base_url=s.url, timeout=30) as client:
                posts = [asyncio.create_task(client.post("/v1/models/clf:predict", json={"instances": ["good"]}))
                         for _ in range(6)]
                # The engine runs one (2 s) and queues two, or queues two: either way it refuses the rest,
                # and its first refusal comes with the depth that says its queue is full.
                while not any(p.done() and p.result().status_code == 503 for p in posts):
                    await asyncio.sleep(0.01)
                answer, waited = await asyncio.to_thread(raw_request, s.url, b"POST /v1/models/clf:predict HTTP/1.1\r\n"
                                                         b"Host: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n")
                return answer, waited, [(await p).status_code for p in posts]

        answer, waited, statuses = asyncio.run(fill())
        print(f"answered {answer.split(b' ', 2)[1].decode()} in {waited:.3f}s; the six: {statuses}")
        assert answer.startswith(b"HTTP/1.1 503") and b"2 or more requests waiting" in answer, answer[:300]
        assert waited < s.settings.body_timeout_s  # before the body timeout (then it would be 408)
        assert statuses.count(200) >= 2 and set(statuses) <= {200, 503}
    finally:
        s.stop()


CHANGED_BEFORE = {  # V2 inputs that were silently changed before: [2.9, true] became [2, 1], a length of 3.99 became 3
    "a float id": (v2_body(ids__data=[[2.9, 3, 4], [5, 6, 0]]), "input_ids"),
    "a boolean id": (v2_body(ids__data=[[True, 3, 4], [5, 6, 0]]), "input_ids"),
    "a float length": (v2_body(lengths__data=[2.99, 2]), "lengths"),
    "a boolean length": (v2_body(lengths__data=[True, 2]), "lengths"),
}


@pytest.mark.parametrize("case", list(CHANGED_BEFORE))
def test_v2_integers_are_integers_or_a_400_names_the_tensor(server, case):
    body, tensor = CHANGED_BEFORE[case]
    r = httpx.post(f"{server.url}/v2/models/clf/infer", content=body)
    assert r.status_code == 400 and tensor in r.json()["error"] and "integer" in r.json()["error"], r.text


def long_row(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((1, n), 3, np.int64), np.array([n], np.int64)


def test_a_v2_row_longer_than_max_len_is_refused_over_json_and_binary(server):
    """The length rule of every transport: a classifier reads at most max_len (12) tokens of a row.
    V1 texts are cut there; a V2 tensor is never changed, so a longer row is a 400 (before, V2 ran
    it whole)."""
    ids, lengths = long_row(13)
    for body, headers in ((json.dumps({"inputs": [
            {"name": "input_ids", "shape": [1, 13], "datatype": "INT64", "data": ids.ravel().tolist()},
            {"name": "lengths", "shape": [1], "datatype": "INT64", "data": [13]}]}).encode(), {}),
            binary_body(ids, lengths)):
        r = httpx.post(f"{server.url}/v2/models/clf/infer", content=body, headers=headers)
        assert r.status_code == 400 and "max_len 12" in r.json()["error"], r.text
    ids, lengths = long_row(12)
    assert httpx.post(f"{server.url}/v2/models/clf/infer", content=binary_body(ids, lengths)[0],
                      headers=binary_body(ids, lengths)[1]).status_code == 200


def binary_body(ids: np.ndarray, lengths: np.ndarray) -> tuple[bytes, dict]:
    header = json.dumps({"inputs": [
        {"name": "input_ids", "shape": list(ids.shape), "datatype": "INT64", "parameters": {"binary_data_size": ids.nbytes}},
        {"name": "lengths", "shape": list(lengths.shape), "datatype": "INT64",
         "parameters": {"binary_data_size": lengths.nbytes}}]}).encode()
    return header + ids.tobytes() + lengths.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def test_a_language_models_v2_answer_is_bounded(repository):
    """A language model answers rows x length x vocabulary floats: past max_response_bytes the
    request is refused with 413 before it runs (before, nothing bounded it)."""
    s = Server(repository, max_response_bytes=1000)
    try:
        small, big = long_row(4), long_row(40)  # 4 tokens x 12 logits x 4 bytes fit in 1000; 40 tokens do not
        assert httpx.post(f"{s.url}/v2/models/lm/infer", content=binary_body(*small)[0],
                          headers=binary_body(*small)[1]).status_code == 200
        r = httpx.post(f"{s.url}/v2/models/lm/infer", content=binary_body(*big)[0], headers=binary_body(*big)[1])
        assert r.status_code == 413 and "RNNSERVE_MAX_RESPONSE_BYTES" in r.json()["error"], r.text
    finally:
        s.stop()


class References(HTMLParser):
    """Every src and href of a page."""

    def __init__(self):
        super().__init__()
        self.found = []

    def handle_starttag(self, tag, attrs):
        self.found += [value for name, value in attrs if name in ("src", "href") and value]


TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png", ".json": "application/json"}


def test_the_docs_page_loads_everything_it_asks_for_from_rnnserve(server):
    """/docs where the machine cannot reach a CDN: the page, its script, styles and icon, and the
    schema it renders all come from the server itself."""
    page = httpx.get(f"{server.url}/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    parser = References()
    parser.feed(page.text)
    asked = parser.found + re.findall(r"url: '([^']+)'", page.text)  # the schema, in the page's script
    print("/docs asks for", asked)
    assert len(asked) >= 4
    for reference in asked:
        url = urljoin(f"{server.url}/docs", reference)
        assert url.startswith(server.url + "/"), f"{reference}: not served by rnnserve"
        r = httpx.get(url)
        kind = TYPES[Path(urlsplit(url).path).suffix]
        assert r.status_code == 200 and kind in r.headers["content-type"], (url, r.status_code, r.headers)
    assert httpx.get(f"{server.url}/redoc").status_code == 404  # off: it would load its script from a CDN


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no headless Chromium here (apt-get install chromium)")
def test_the_docs_page_lists_the_operations_in_a_browser_that_reaches_nothing_else(server, tmp_path):
    """Headless Chromium, every host but 127.0.0.1 unresolvable, renders /docs: the operations are
    on the page (Swagger UI draws nothing at all when its script does not load)."""
    done = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path}",
                           "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--virtual-time-budget=20000",
                           "--dump-dom", f"{server.url}/docs"], capture_output=True, text=True, timeout=120)
    page = done.stdout.replace("\u200b", "")  # Swagger UI breaks paths after each / with a zero-width space
    print(f"Chromium's DOM of /docs: {len(page)} characters")
    for path in ("/v1/models/{name}:predict", "/v2/models/{name}/infer", "/v1/models/{name}:generate"):
        assert path in page, (path, done.stderr[-2000:])
