"""Triton's model configuration and statistics extensions, over REST and gRPC, read by tritonclient
unchanged: what they say of the tiny repository's models, and counts that add up after N requests."""
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from loadtest.servers import free_port
from tests.serving_fixtures import Server, graph_logits, serve, tiny_repository

IDS, LENGTHS = np.array([[2, 3, 4], [5, 6, 0]], np.int64), np.array([3, 2], np.int64)


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    return tiny_repository(tmp_path_factory.mktemp("extensions"))


@pytest.fixture(scope="module")
def server(repository):
    s = Server(repository, grpc_port=free_port(), max_queue_delay_ms=2, max_batch_size=16)
    s.http = triton_http.InferenceServerClient(s.url[len("http://"):])
    s.grpc = triton_grpc.InferenceServerClient(f"127.0.0.1:{s.settings.grpc_port}")
    yield s
    s.stop()


def tensors(module, ids=IDS, lengths=LENGTHS):
    inputs = [module.InferInput("input_ids", list(ids.shape), "INT64"),
              module.InferInput("lengths", list(lengths.shape), "INT64")]
    inputs[0].set_data_from_numpy(ids)
    inputs[1].set_data_from_numpy(lengths)
    return inputs


def test_both_extensions_are_listed_in_the_server_metadata(server):
    assert {"model_configuration", "statistics"} <= set(server.http.get_server_metadata()["extensions"])
    assert {"model_configuration", "statistics"} <= set(server.grpc.get_server_metadata().extensions)


@pytest.mark.parametrize("model", ["clf", "lm"])
def test_the_configuration_is_the_same_over_rest_and_grpc_and_says_how_the_model_is_served(server, model):
    rest = server.http.get_model_config(model)
    assert rest == server.http.get_model_config(model, "1")
    grpc = server.grpc.get_model_config(model).config
    for config in (rest, {"name": grpc.name, "platform": grpc.platform, "max_batch_size": grpc.max_batch_size,
                          "input": [{"name": t.name, "data_type": triton_grpc.model_config_pb2.DataType.Name(t.data_type),
                                     "dims": list(t.dims), "optional": t.optional} for t in grpc.input],
                          "output": [{"name": t.name, "data_type": triton_grpc.model_config_pb2.DataType.Name(t.data_type),
                                      "dims": list(t.dims)} for t in grpc.output],
                          "dynamic_batching": {"max_queue_delay_microseconds":
                                               grpc.dynamic_batching.max_queue_delay_microseconds},
                          "instance_group": [{"kind": triton_grpc.model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind),
                                              "count": g.count} for g in grpc.instance_group],
                          "model_transaction_policy": {"decoupled": grpc.model_transaction_policy.decoupled}}):
        assert config["name"] == model and config["platform"] == "onnxruntime_onnx"
        assert config["max_batch_size"] == 16
        clf = model == "clf"  # either its ids or its text (tests/test_v2_text.py): each input optional
        assert [(t["name"], t["data_type"], t["dims"], t["optional"]) for t in config["input"]] == [
            ("input_ids", "TYPE_INT64", [-1], clf), ("lengths", "TYPE_INT64", [1], clf),
            *[("text_input", "TYPE_STRING", [1], True)] * clf]
        width = 2 if clf else server.deployment("lm").runner.session.get_outputs()[0].shape[-1]
        assert [(t["name"], t["data_type"], t["dims"]) for t in config["output"]] == [
            ("logits", "TYPE_FP32", [2] if clf else [-1, width]),
            *[("probabilities", "TYPE_FP32", [2]), ("label", "TYPE_STRING", [1])] * clf]
        assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 2000
        assert [(g["kind"], g["count"]) for g in config["instance_group"]] == [
            ("KIND_GPU" if server.deployment(model).runner.device.startswith("cuda") else "KIND_CPU", 1)]
        assert config["model_transaction_policy"]["decoupled"] is (model == "lm")


def test_lengths_sent_as_the_configuration_says_are_read_as_lengths(server, repository):
    """dims [1]: a Triton client sends lengths as [B, 1], and the answer is the same."""
    result = server.grpc.infer("clf", tensors(triton_grpc, lengths=LENGTHS[:, None]))
    assert np.abs(result.as_numpy("logits") - graph_logits(repository, "clf", IDS, LENGTHS)).max() < 1e-5


def stats_of(client, model: str) -> dict:
    (row,) = client.get_inference_statistics(model)["model_stats"]
    return row


def test_statistics_add_up_after_n_requests_over_rest_and_grpc(server):
    before = stats_of(server.http, "clf")
    n = 7
    for i in range(n):
        (server.http if i % 2 else server.grpc).infer("clf", tensors(triton_http if i % 2 else triton_grpc))
    after = stats_of(server.http, "clf")
    grpc_row = server.grpc.get_inference_statistics("clf", "1").model_stats[0]
    assert (grpc_row.name, grpc_row.version, grpc_row.inference_count) == ("clf", "1", after["inference_count"])
    assert grpc_row.inference_stats.compute_infer.ns == after["inference_stats"]["compute_infer"]["ns"]

    def delta(*path):
        a, b = after, before
        for key in path:
            a, b = a[key], b[key]
        return a - b
    assert delta("inference_count") == n * len(LENGTHS)  # rows
    assert delta("inference_stats", "success", "count") == n and delta("inference_stats", "fail", "count") == 0
    for phase in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert delta("inference_stats", phase, "count") == n and delta("inference_stats", phase, "ns") > 0
    calls = sum(b["compute_infer"]["count"] for b in after["batch_stats"]) - \
        sum(b["compute_infer"]["count"] for b in before["batch_stats"])
    rows = sum(b["batch_size"] * b["compute_infer"]["count"] for b in after["batch_stats"]) - \
        sum(b["batch_size"] * b["compute_infer"]["count"] for b in before["batch_stats"])
    assert 1 <= calls == delta("execution_count") <= n and rows == n * len(LENGTHS)
    assert after["last_inference"] > 0 and delta("last_inference") >= 0
    success = after["inference_stats"]["success"]["ns"]  # each request's whole time covers its parts
    assert success >= sum(after["inference_stats"][p]["ns"] for p in ("queue", "compute_infer"))
    everything = server.http.get_inference_statistics()["model_stats"]
    assert [(r["name"], r["version"]) for r in everything] == [("clf", "1"), ("lm", "1")]


def test_an_unknown_model_or_version_is_not_found(server):
    for path in ("/v2/models/nope/config", "/v2/models/nope/stats", "/v2/models/clf/versions/9/config",
                 "/v2/models/clf/versions/9/stats"):
        r = httpx.get(server.url + path)
        assert r.status_code == 404 and "error" in r.json(), path
    for call in (lambda: server.grpc.get_model_config("nope"), lambda: server.grpc.get_inference_statistics("nope"),
                 lambda: server.grpc.get_model_config("clf", "9")):
        with pytest.raises(InferenceServerException) as raised:
            call()
        assert raised.value.status() == "StatusCode.NOT_FOUND"


def test_every_engines_counts_are_summed(repository):
    """python -m serving with two engines: the classifier is served by both (two instances), and
    the statistics sum what each engine ran (requests sent together go to the engine with the
    least waiting, so both take some)."""
    process, url = serve(repository, "--workers", "1", "--engines", "2")
    try:
        client = triton_http.InferenceServerClient(url[len("http://"):], concurrency=8)
        assert client.get_model_config("clf")["instance_group"][0]["count"] == 2
        before = stats_of(client, "clf")
        n = 48
        for pending in [client.async_infer("clf", tensors(triton_http)) for _ in range(n)]:
            pending.get_result()
        after = stats_of(client, "clf")
        assert after["inference_count"] - before["inference_count"] == n * len(LENGTHS)
        assert after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"] == n
    finally:
        process.terminate()
        process.wait(30)
