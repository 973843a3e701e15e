"""The CUDA path, where a GPU and onnxruntime-gpu exist (the GPU machine: ../shared/GPU.md); on a
machine without them these tests are skipped, and say why. The same answers as the CPU's, to the
1e-5 of the contract, with the defaults (use_tf32 0), through I/O binding."""
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from tests.serving_fixtures import Server, alone, tiny_repository

CUDA = "CUDAExecutionProvider"
pytestmark = pytest.mark.skipif(CUDA not in ort.get_available_providers() or not list(Path("/dev").glob("nvidia[0-9]*")),
                                reason="needs a GPU with onnxruntime-gpu (the CUDA execution provider); none here")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repository = tiny_repository(tmp_path_factory.mktemp("cuda"))
    s = Server(repository, providers=[CUDA, "CPUExecutionProvider"])
    yield s, repository
    s.stop()


def test_the_engine_runs_on_cuda(server):
    s, _ = server
    assert s.deployment("clf").runner.provider == CUDA
    assert httpx.get(f"{s.url}/v1/models/clf").json()["provider"] == CUDA


def test_cuda_answers_equal_the_graph_alone_on_the_cpu(server):
    s, repository = server
    rng = np.random.default_rng(0)
    words = ["good", "bad", "film", "plot", "great", "awful", "the", "a"]
    texts = [" ".join(rng.choice(words, rng.integers(1, 20))) for _ in range(200)]
    answer = httpx.post(f"{s.url}/v1/models/clf:predict", json={"instances": texts}, timeout=60).json()["predictions"]
    for text, p in zip(texts, answer):
        assert np.abs(np.array([p["probabilities"]["neg"], p["probabilities"]["pos"]]) - alone(repository, text)).max() < 1e-5


def test_greedy_generation_on_cuda_equals_the_cpu(server, tmp_path):
    s, repository = server
    body = {"prompt": "the time", "max_new_tokens": 40, "temperature": 0}
    on_cuda = httpx.post(f"{s.url}/v1/models/lm:generate", json=body, timeout=60).json()
    cpu = Server(repository, providers=["CPUExecutionProvider"])
    try:
        assert httpx.post(f"{cpu.url}/v1/models/lm:generate", json=body, timeout=60).json() == on_cuda
    finally:
        cpu.stop()
