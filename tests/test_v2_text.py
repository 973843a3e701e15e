"""Plain text to a classifier over V2: text_input (BYTES [B]) answered with logits, probabilities
and label, read by tritonclient's http and grpc clients unchanged, over REST JSON, binary tensors
and gRPC; the same answers as V1 :predict for the same texts, and the same refusals."""
import json
import queue

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.grpc import service_pb2 as pb, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from core.codec import pad
from core.repository import read_version
from loadtest.servers import free_port
from tests.serving_fixtures import Server, graph_logits, tiny_repository

TEXTS = ["good film", "awful plot , the worst", "A GREAT film", "bad " * 20 + "good",  # the last past max_len 12
         "great great great good film the plot", "zebra"]  # an unknown word only
LIMIT = 300  # the server's max_text_chars here


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    return tiny_repository(tmp_path_factory.mktemp("v2text"))


@pytest.fixture(scope="module")
def server(repository):
    s = Server(repository, grpc_port=free_port(), max_queue_delay_ms=2, max_text_chars=LIMIT, max_instances=8)
    s.http = triton_http.InferenceServerClient(s.url[len("http://"):], concurrency=32)
    s.grpc = triton_grpc.InferenceServerClient(f"127.0.0.1:{s.settings.grpc_port}")
    yield s
    s.stop()


def v1(server, texts: list[str]) -> tuple[np.ndarray, list[str]]:
    """V1 :predict's probabilities (B, C) and labels for the texts."""
    r = httpx.post(f"{server.url}/v1/models/clf:predict", json={"instances": texts})
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    return np.array([list(p["probabilities"].values()) for p in predictions]), [p["label"] for p in predictions]


def expected_logits(repository, texts: list[str]) -> np.ndarray:
    """The graph's logits on the texts as V1 encodes them (the model's codec, cut at max_len)."""
    ids, lengths = pad([ids for ids, _ in map(read_version(repository / "clf" / "1").codec.encode, texts)])
    return graph_logits(repository, "clf", ids, lengths)


def strings(values: np.ndarray) -> list[str]:
    """A BYTES output as tritonclient gives it (bytes from raw bytes, str from JSON) as text."""
    return [v.decode() if isinstance(v, bytes) else v for v in values.ravel().tolist()]


def text_input(module, texts: list[str], binary: bool = True):
    t = module.InferInput("text_input", [len(texts)], "BYTES")
    if module is triton_http:
        t.set_data_from_numpy(np.array(texts, dtype=object), binary_data=binary)
    else:
        t.set_data_from_numpy(np.array(texts, dtype=object))
    return t


def asked(module, binary: bool, names=("logits", "probabilities", "label")):
    if module is triton_http:
        return [module.InferRequestedOutput(n, binary_data=binary) for n in names]
    return [module.InferRequestedOutput(n) for n in names]


TRANSPORTS = {"json": (triton_http, False), "binary": (triton_http, True), "grpc": (triton_grpc, True)}


@pytest.mark.parametrize("texts", [TEXTS[:1], TEXTS], ids=["one text", "a batch"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_text_is_answered_as_v1_answers_it(server, repository, transport, texts):
    module, binary = TRANSPORTS[transport]
    client = server.http if module is triton_http else server.grpc
    result = client.infer("clf", [text_input(module, texts, binary)], outputs=asked(module, binary))
    if module is triton_http:
        assert all(("binary_data_size" in result.get_output(n).get("parameters", {})) == binary
                   for n in ("logits", "probabilities", "label"))
    probabilities, labels = v1(server, texts)
    assert result.as_numpy("probabilities").shape == (len(texts), 2) and result.as_numpy("probabilities").dtype == np.float32
    assert np.abs(result.as_numpy("probabilities") - probabilities).max() < 1e-6
    assert strings(result.as_numpy("label")) == labels
    assert np.abs(result.as_numpy("logits") - expected_logits(repository, texts)).max() < 1e-5


def test_without_outputs_named_a_text_gets_all_three_and_ids_get_logits(server):
    for module, client in ((triton_http, server.http), (triton_grpc, server.grpc)):
        text = client.infer("clf", [text_input(module, TEXTS[:2])])
        names = [o["name"] for o in text.get_response()["outputs"]] if module is triton_http else \
            [o.name for o in text.get_response().outputs]
        assert names == ["logits", "probabilities", "label"]
        ids = [module.InferInput("input_ids", [1, 2], "INT64"), module.InferInput("lengths", [1], "INT64")]
        ids[0].set_data_from_numpy(np.array([[0, 1]], np.int64))
        ids[1].set_data_from_numpy(np.array([2], np.int64))
        assert client.infer("clf", ids).as_numpy("probabilities") is None  # as before: logits alone
        both = client.infer("clf", ids, outputs=asked(module, True, ("label", "probabilities")))
        assert strings(both.as_numpy("label"))[0] in ("neg", "pos") and both.as_numpy("logits") is None
        assert abs(both.as_numpy("probabilities").sum() - 1) < 1e-6


def test_raw_rest_json_and_grpc_bytes_contents_are_read_too(server):
    """A plain JSON body ("data": [strings]) and gRPC's typed bytes_contents, not only what
    tritonclient sends (binary / raw_input_contents)."""
    r = httpx.post(f"{server.url}/v2/models/clf/infer", json={"inputs": [
        {"name": "text_input", "shape": [2], "datatype": "BYTES", "data": TEXTS[:2]}], "outputs": [{"name": "label"}]})
    assert r.status_code == 200, r.text
    assert r.json()["outputs"] == [{"name": "label", "datatype": "BYTES", "shape": [2], "data": v1(server, TEXTS[:2])[1]}]
    request = pb.ModelInferRequest(model_name="clf", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="text_input", datatype="BYTES", shape=[2, 1], contents=pb.InferTensorContents(
            bytes_contents=[t.encode() for t in TEXTS[:2]]))])
    with grpc.insecure_channel(f"127.0.0.1:{server.settings.grpc_port}") as channel:
        answer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert [o.name for o in answer.outputs] == ["logits", "probabilities", "label"]
    probabilities = np.frombuffer(answer.raw_output_contents[1], "<f4").reshape(2, 2)
    assert np.abs(probabilities - v1(server, TEXTS[:2])[0]).max() < 1e-6


def test_concurrent_requests_of_mixed_texts_each_get_their_own_answer(server):
    """32 requests at once over HTTP and gRPC, each of its own texts: batched together by the engine
    (fewer ONNX Runtime calls than requests), each answered with its own."""
    asks = [[TEXTS[i % len(TEXTS)], TEXTS[(i * 7 + 1) % len(TEXTS)]][: 1 + i % 2] for i in range(32)]
    before = server.http.get_inference_statistics("clf")["model_stats"][0]
    pending, answered = [], queue.Queue()
    for i, texts in enumerate(asks):
        if i % 2:
            pending.append(server.http.async_infer("clf", [text_input(triton_http, texts)]))
        else:
            server.grpc.async_infer("clf", [text_input(triton_grpc, texts)], lambda result, error, i=i: answered.put((i, result, error)))
            pending.append(None)
    for _ in range(16):
        i, result, error = answered.get(timeout=30)
        assert error is None, error
        pending[i] = result
    results = [p.get_result() if i % 2 else p for i, p in enumerate(pending)]
    after = server.http.get_inference_statistics("clf")["model_stats"][0]
    assert after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"] == 32
    assert after["execution_count"] - before["execution_count"] < 32
    for texts, result in zip(asks, results):
        probabilities, labels = v1(server, texts)
        assert strings(result.as_numpy("label")) == labels
        assert np.abs(result.as_numpy("probabilities") - probabilities).max() < 1e-6


def rest_text(server, texts: list, datatype: str = "BYTES", raw: bytes | None = None, more: list | None = None):
    """A V2 REST request of text_input: JSON data, or raw bytes (the binary extension)."""
    tensor = {"name": "text_input", "shape": [len(texts)], "datatype": datatype}
    if raw is None:
        body, headers = json.dumps({"inputs": [tensor | {"data": texts}, *(more or [])]}).encode(), {}
    else:
        head = json.dumps({"inputs": [tensor | {"parameters": {"binary_data_size": len(raw)}}]}).encode()
        body, headers = head + raw, {"Inference-Header-Content-Length": str(len(head))}
    return httpx.post(f"{server.url}/v2/models/clf/infer", content=body, headers=headers)


def grpc_code(server, texts, model: str = "clf", raw: bytes | None = None, extra=()) -> str:
    """The status of a ModelInfer of these texts (or of these raw bytes as text_input's raw contents)."""
    if raw is None:
        with pytest.raises(InferenceServerException) as raised:
            server.grpc.infer(model, [text_input(triton_grpc, texts), *extra])
        return raised.value.status()
    request = pb.ModelInferRequest(model_name=model, raw_input_contents=[raw], inputs=[
        pb.ModelInferRequest.InferInputTensor(name="text_input", datatype="BYTES", shape=[len(texts)])])
    with grpc.insecure_channel(f"127.0.0.1:{server.settings.grpc_port}") as channel:
        with pytest.raises(grpc.RpcError) as raised:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    return str(raised.value.code())


def serialized(*elements: bytes) -> bytes:
    return b"".join(len(e).to_bytes(4, "little") + e for e in elements)


def test_a_text_past_the_size_limit_is_refused_as_v1_refuses_it(server):
    """V1's limits and answer (413, max_text_chars and max_instances), over every transport; the
    server goes on. (A text longer than max_len tokens is cut, as V1 cuts it: TEXTS[3].)"""
    long = "good " * (LIMIT // 5 + 1)
    assert httpx.post(f"{server.url}/v1/models/clf:predict", json={"instances": [long]}).status_code == 413
    for r in (rest_text(server, ["good", long]), rest_text(server, ["good", long], raw=serialized(b"good", long.encode()))):
        assert r.status_code == 413 and "text_input[1] has 305 characters; at most 300" in r.json()["error"], r.text
    assert grpc_code(server, ["good", long]) == "StatusCode.RESOURCE_EXHAUSTED"
    r = rest_text(server, ["good"] * 9)  # and more texts than max_instances, as V1's instances
    assert r.status_code == 413 and "text_input: 9 texts; at most 8 per request" in r.json()["error"], r.text
    assert rest_text(server, ["good"]).status_code == 200


def test_both_input_forms_at_once_a_wrong_datatype_an_empty_text_and_non_utf8_are_400(server):
    ids = {"name": "input_ids", "shape": [1, 1], "datatype": "INT64", "data": [1]}
    lengths = {"name": "lengths", "shape": [1], "datatype": "INT64", "data": [1]}
    cases = {
        "send either text_input or input_ids and lengths, not both": rest_text(server, ["good"], more=[ids, lengths]),
        "text_input: datatype must be BYTES": rest_text(server, [1, 2], datatype="INT64"),
        "text_input: datatype must be BYTES ": rest_text(server, ["good"], datatype="INT64",
                                                         raw=np.array([1], "<i8").tobytes()),
        "text_input [1] are empty": rest_text(server, ["good", "  "]),
        "not UTF-8": rest_text(server, ["good", "x"], raw=serialized(b"good", b"\xff\xfe")),
        "BYTES element 1 runs past": rest_text(server, ["good", "x"], raw=serialized(b"good") + b"\x09\0\0\0ab"),
        "BYTES data must be strings": rest_text(server, ["good", 3]),
        "shape must be [B]": httpx.post(f"{server.url}/v2/models/clf/infer", json={"inputs": [
            {"name": "text_input", "shape": [1, 2], "datatype": "BYTES", "data": ["a", "b"]}]}),
    }
    for says, r in cases.items():
        assert r.status_code == 400 and says.strip() in r.json()["error"], (says, r.text)
    both = [triton_grpc.InferInput("input_ids", [1, 1], "INT64"), triton_grpc.InferInput("lengths", [1], "INT64")]
    both[0].set_data_from_numpy(np.array([[1]], np.int64))
    both[1].set_data_from_numpy(np.array([1], np.int64))
    assert grpc_code(server, ["good"], extra=both) == "StatusCode.INVALID_ARGUMENT"
    assert grpc_code(server, ["good", "x"], raw=serialized(b"good", b"\xff")) == "StatusCode.INVALID_ARGUMENT"
    assert grpc_code(server, [""]) == "StatusCode.INVALID_ARGUMENT"
    wrong = triton_grpc.InferInput("text_input", [1], "INT64")
    wrong.set_data_from_numpy(np.array([1], np.int64))
    with pytest.raises(InferenceServerException) as raised:
        server.grpc.infer("clf", [wrong])
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT" and "must be BYTES" in raised.value.message()
    assert rest_text(server, ["good"]).status_code == 200  # and the server goes on


def test_a_language_model_takes_no_text_input_here_and_unknown_outputs_are_named(server):
    assert grpc_code(server, ["the time"], model="lm") == "StatusCode.INVALID_ARGUMENT"
    r = httpx.post(f"{server.url}/v2/models/lm/infer", json={"inputs": [
        {"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["the time"]}]})
    assert r.status_code == 400 and "language model" in r.json()["error"], r.text
    r = httpx.post(f"{server.url}/v2/models/clf/infer", json={"inputs": [
        {"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["good"]}], "outputs": [{"name": "scores"}]})
    assert r.status_code == 400 and "unknown outputs ['scores']" in r.json()["error"], r.text


def test_metadata_and_configuration_list_both_input_forms(server):
    meta = server.http.get_model_metadata("clf")
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("input_ids", "INT64", [-1, -1]), ("lengths", "INT64", [-1, 1]), ("text_input", "BYTES", [-1, 1])]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]] == [
        ("logits", "FP32", [-1, 2]), ("probabilities", "FP32", [-1, 2]), ("label", "BYTES", [-1, 1])]
    grpc_meta = server.grpc.get_model_metadata("clf")
    assert [(t.name, t.datatype, list(t.shape)) for t in grpc_meta.inputs] == [
        (t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]]
    config = server.http.get_model_config("clf")
    assert [(t["name"], t["data_type"], t["dims"], t["optional"]) for t in config["input"]] == [
        ("input_ids", "TYPE_INT64", [-1], True), ("lengths", "TYPE_INT64", [1], True),
        ("text_input", "TYPE_STRING", [1], True)]
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["output"]] == [
        ("logits", "TYPE_FP32", [2]), ("probabilities", "TYPE_FP32", [2]), ("label", "TYPE_STRING", [1])]
    grpc_config = server.grpc.get_model_config("clf").config
    assert [(t.name, t.optional) for t in grpc_config.input] == [(t["name"], True) for t in config["input"]]
    assert [t["name"] for t in server.http.get_model_metadata("lm")["inputs"]] == ["input_ids", "lengths"]
