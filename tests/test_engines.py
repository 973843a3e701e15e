"""The process layout of python -m serving: HTTP front-ends and inference engines, each engine
owning its sessions. Exactness across processes, engines that die with their server, and the
per-model serving config (config.json beside the versions)."""
import asyncio
import json
import os
import shutil
import signal
import time

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from core.codec import softmax
from core.repository import read_version
from export.repository import export_run
from tests.serving_fixtures import Server, alone, serve, tiny_repository
from tests.test_export import make_run
from tests.test_lifecycle import children


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    return tiny_repository(tmp_path_factory.mktemp("engines"))


def test_answers_across_front_ends_and_engines_equal_the_graph_alone(repository):
    """2 front-ends, 2 engines, 300 concurrent requests of 1 to 3 texts: every answer is the graph
    run on that text alone (1e-5), whichever processes served it, and both engines served."""
    server, url = serve(repository, "--workers", "2", "--engines", "2")
    rng = np.random.default_rng(0)
    words = ["good", "bad", "film", "plot", "great", "awful", "the", "a"]
    bodies = [[" ".join(rng.choice(words, rng.integers(1, 20))) for _ in range(rng.integers(1, 4))] for _ in range(300)]
    try:
        async def fire():
            async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=100)) as client:
                return await asyncio.gather(*(client.post("/v1/models/clf:predict", json={"instances": texts})
                                              for texts in bodies))
        responses = asyncio.run(fire())
        assert [r.status_code for r in responses] == [200] * 300
        for texts, r in zip(bodies, responses):
            for text, p in zip(texts, r.json()["predictions"]):
                assert np.abs(np.array([p["probabilities"]["neg"], p["probabilities"]["pos"]]) - alone(repository, text)).max() < 1e-5
        metrics = httpx.get(f"{url}/metrics").text
        calls = [line for line in metrics.splitlines() if line.startswith('rnnserve_batch_size_count{model="clf"}')]
        assert calls and float(calls[0].split()[-1]) < 300 + 10  # rows were batched together
        engines = [p for p in children(server.pid) if "serving.engine" in p[1]]
        assert len(engines) == 2
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0


def test_engines_die_with_their_server(repository):
    """SIGKILL leaves the server no time to stop anything: its engines still exit (PDEATHSIG)."""
    server, _ = serve(repository, "--workers", "1", "--engines", "2")
    engines = [pid for pid, command in children(server.pid) if "serving.engine" in command]
    assert len(engines) == 2
    server.kill()
    server.wait(10)
    deadline = time.time() + 5
    while any(os.path.exists(f"/proc/{pid}") for pid in engines) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in engines)


def test_a_model_is_served_as_its_config_says(repository, tmp_path):
    """config.json beside the versions: its int8 variant, one row per call; the other model keeps
    the server's settings. A config that does not fit the schema keeps the model out, with the
    file and field named."""
    rows = [(" ".join(np.random.default_rng(i).choice(["good", "bad", "film", "plot"], 5)), "pos" if i % 2 else "neg")
            for i in range(60)]
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    repo = tmp_path / "repo"
    shutil.copytree(repository / "lm", repo / "lm")
    export_run(make_run(tmp_path / "run", "classifier", "lstm", data=tmp_path / "d.csv"), repo, name="q",
               quantize="int8", cases=3)
    (repo / "q" / "config.json").write_text(json.dumps({"variant": "int8", "max_batch_size": 1}))
    s = Server(repo, max_queue_delay_ms=50)
    try:
        assert s.deployment("q").runner.variant == "int8" and s.deployment("q").runner.limits.max_batch_size == 1
        assert httpx.get(f"{s.url}/v1/models/q").json()["variant"] == "int8"
        texts = ["good film", "bad plot the", "film"]
        answer = httpx.post(f"{s.url}/v1/models/q:predict", json={"instances": texts}).json()["predictions"]
        version = read_version(repo / "q" / "1")
        int8 = ort.InferenceSession(version.graph_bytes("int8"), providers=["CPUExecutionProvider"])
        for text, p in zip(texts, answer):
            ids, _ = version.codec.encode(text)
            expected = softmax(int8.run(None, {"input_ids": np.array([ids]), "lengths": np.array([len(ids)])})[0][0])
            assert np.abs(np.array(list(p["probabilities"].values())) - expected).max() < 1e-5
        sizes = httpx.get(f"{s.url}/metrics").text
        assert 'rnnserve_batch_size_bucket{le="1.0",model="q"} 3.0' in sizes  # three calls of one row each
    finally:
        s.stop()
    (repo / "q" / "config.json").write_text(json.dumps({"max_batch_size": 0, "varient": "int8"}))
    s = Server(repo, control="open")
    try:
        assert "q" not in s.engine.deployments.current
        index = {r["name"]: r for r in httpx.post(f"{s.url}/v2/repository/index").json()}
        assert "config.json: max_batch_size: Input should be greater than 0" in index["q"]["reason"]
    finally:
        s.stop()
