import asyncio
import json
import re
import time

import httpx
import numpy as np
import pytest

from core.codec import TextCodec
from core.repository import ServingConfig
from core.tokenize import Tokenizer, Vocab
from models.checkpoint import load_run
from models.rnn import generate as reference_generate
from serving.common.messages import Generate, PromptLogprobs, Step, Stepped, Tokens
from serving.common.settings import Settings
from serving.engine.generation import LanguageModel
from serving.engine.runner import Runner
from serving.frontend.client import Stream
from serving.frontend.core.generation import Generation, rest
from serving.frontend.schemas import GenerateRequest
from tests.serving_fixtures import Server, cpu_session, slowed_steps, tiny_repository
from tests.test_sampling import most_likely_before


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm")
    tiny_repository(folder)
    return folder


@pytest.fixture(scope="module")
def server(folder):
    s = Server(folder / "repo")
    yield s
    s.stop()


def gen(server, **body):
    return httpx.post(f"{server.url}/v1/models/lm:generate", json={"prompt": "the time", **body}, timeout=30)


def test_greedy_generation_equals_the_pytorch_reference(server, folder):
    model, config, tokenizer, vocab = load_run(folder / "runs" / "lm")
    expected = "".join(vocab.decode(reference_generate(model, vocab.encode(tokenizer("the time")), 40, temperature=0)))
    r = gen(server, max_new_tokens=40, temperature=0)
    assert r.status_code == 200, r.text
    assert r.json() == {"text": expected, "tokens": 40, "finish_reason": "length", "prompt_tokens": 8,
                        "unknown_prompt_tokens": 0}


def test_the_same_seed_gives_the_same_text(server):
    texts = [gen(server, max_new_tokens=30, seed=seed, top_k=5, top_p=0.9).json()["text"] for seed in (7, 7, 8)]
    assert texts[0] == texts[1] and texts[0] != texts[2]


def test_stop_ends_the_text_before_the_stop_string(server):
    full = gen(server, max_new_tokens=40, temperature=0).json()["text"]
    stop = full[10:13]
    r = gen(server, max_new_tokens=40, temperature=0, stop=[stop]).json()
    assert r["finish_reason"] == "stop" and r["text"] == full[: full.index(stop)]


def events(response_text: str) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in response_text.splitlines() if line.startswith("data: ")]


def test_streaming_sends_one_event_per_token_then_the_summary(server):
    full = gen(server, max_new_tokens=25, temperature=0).json()
    r = gen(server, max_new_tokens=25, temperature=0, stream=True)
    assert r.headers["content-type"].startswith("text/event-stream")
    got = events(r.text)
    assert len(got) == 26 and "".join(e["token"] for e in got[:-1]) == full["text"]
    assert got[-1] == full


def step_counts(server) -> tuple[float, float]:
    text = httpx.get(f"{server.url}/metrics").text
    count = re.search(r'rnnserve_batch_size_count\{model="lm:step"\} (\S+)', text)
    rows = re.search(r'rnnserve_batch_size_sum\{model="lm:step"\} (\S+)', text)
    return float(count[1]), float(rows[1])


def test_concurrent_generations_share_steps_and_each_matches_its_solo_run(server):
    prompts = ["the", "time", "t", "the time traveller", "ramet", "hhh", "a", "ever"] * 2
    solo = {p: gen(server, prompt=p, max_new_tokens=30, temperature=0).json()["text"] for p in set(prompts)}
    calls_before, rows_before = step_counts(server)

    async def fire():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            return await asyncio.gather(*(client.post("/v1/models/lm:generate", json={
                "prompt": p, "max_new_tokens": 30, "temperature": 0}) for p in prompts))

    responses = asyncio.run(fire())
    assert [r.json()["text"] for r in responses] == [solo[p] for p in prompts]
    calls, rows = step_counts(server)
    assert rows - rows_before == 16 * 29  # 29 single-token steps per generation; no prefill: each prompt ran solo
    assert calls - calls_before < 16 * 30 / 4  # steps of different generations shared ONNX Runtime calls


def test_feeding_a_session_in_steps_equals_feeding_it_whole(server):
    def session():
        return httpx.post(f"{server.url}/v1/models/lm/sessions").json()["session_id"]

    def step(sid, text):
        r = httpx.post(f"{server.url}/v1/models/lm/sessions/{sid}:step", json={"text": text, "top_k": 12})
        assert r.status_code == 200, r.text
        return r.json()

    a, b = session(), session()
    for piece in ("the ti", "me tr", "a"):
        last = step(a, piece)
    whole = step(b, "the time tra")
    assert last["total_tokens"] == whole["total_tokens"] == 12
    pa = {t["token"]: t["probability"] for t in last["next"]}
    pb = {t["token"]: t["probability"] for t in whole["next"]}
    assert pa.keys() == pb.keys() and max(abs(pa[k] - pb[k]) for k in pa) < 1e-5
    assert httpx.delete(f"{server.url}/v1/models/lm/sessions/{a}").status_code == 200
    assert httpx.post(f"{server.url}/v1/models/lm/sessions/{a}:step", json={"text": "x"}).status_code == 404


def test_a_step_keeps_the_pool_in_the_graphs_layout_and_answers_the_top_k(folder):
    """In one engine, no server: the pool is one (layers, slots, H) array per state input of the
    graph, kept across steps (never rebuilt or reordered); a session step leaves in its slot the
    state the graph itself returns for its text, touches no other slot, and answers the top k of
    the graph's logits as the front-end computed them before."""
    version = folder / "repo" / "lm" / "1"
    runner = Runner.load(version, Settings(providers=["CPUExecutionProvider"]), ServingConfig())
    lm = LanguageModel(runner, max_generations=2, max_sessions=2, idle_s=60, max_new_tokens=8)
    graph_inputs = {i.name: i.shape for i in runner.session.get_inputs()}
    spec, pool = runner.manifest.state, list(lm.pool)
    assert [p.shape for p in pool] == [(spec.layers, 4, spec.hidden_size)] * len(spec.inputs)
    assert all(graph_inputs[n][0] == spec.layers and graph_inputs[n][2] == spec.hidden_size for n in spec.inputs)
    first, second = lm.open(), lm.open()
    ids, slot = [3, 4, 5, 6], lm.sessions[second].slot
    for k in (5, 3):  # two steps: the pool's arrays stay the same objects
        assert lm.step_session(b"f", Step(k, second, ids, time.monotonic() + 60, k)) is None
        replies = lm.step()
        assert all(now is before for now, before in zip(lm.pool, pool))
    graph = cpu_session(version / "model.onnx")
    state = [np.zeros((spec.layers, 1, spec.hidden_size), np.float32) for _ in spec.inputs]
    for _ in range(2):
        logits, *state = graph.run(None, {"input_ids": np.array([ids]), "lengths": np.array([len(ids)]),
                                          **dict(zip(spec.inputs, state))})
    for kept, alone in zip(lm.pool, state):  # (layers, slots, H) and (layers, 1, H)
        assert np.abs(kept[:, slot] - alone[:, 0]).max() < 1e-6
        assert not np.delete(kept, slot, axis=1).any()  # the other slots: still the zero state
    [(_, stepped)] = replies
    assert isinstance(stepped, Stepped) and stepped.total_tokens == 8
    expected = most_likely_before(logits[0, -1], 3)
    assert stepped.tokens == [i for i, _ in expected]
    assert np.abs(np.array(stepped.probabilities) - [p for _, p in expected]).max() <= 1e-6
    assert lm.sessions[first].slot != slot


def test_a_prompt_seen_before_starts_from_its_kept_state_and_samples_the_same_tokens(folder):
    """In one engine, no server: a generation whose prompt ran before makes no call over it, and
    samples what it sampled the first time and what an engine keeping no prompts samples (same
    seed); one that asks for the prompt's log-probabilities runs it; beyond the budget (two
    prompts here) the least recently used prompt is run again."""
    runner = Runner.load(folder / "repo" / "lm" / "1", Settings(providers=["CPUExecutionProvider"]), ServingConfig())
    calls, advance = [], runner.advance
    runner.advance = lambda ids, *rest: calls.append(ids.shape) or advance(ids, *rest)  # (B, T) of each call
    probe = LanguageModel(runner, 1, 1, 60, 12)
    entry = probe.state_bytes + 4 * probe.vocab_size  # a kept prompt: its state and its (V,) float32 logits
    kept, none_kept = LanguageModel(runner, 4, 1, 60, 12, 2 * entry), LanguageModel(runner, 4, 1, 60, 12)
    a, b, c, ids = [3, 4, 5, 6, 7], [7, 8, 3], [4, 4, 5, 6], iter(range(100))

    def generated(lm, prompt, seed=5, prompt_logprobs=False) -> tuple[list[int], list[tuple[int, int]], bool]:
        """The tokens, the calls made over more than one token, whether the prompt was scored."""
        calls.clear()
        lm.start(b"f", Generate(next(ids), "lm", 1, prompt, 12, 1.0, 0, 1.0, seed, prompt_logprobs=prompt_logprobs))
        tokens, scored = [], False
        while lm.has_work():
            for _, message in lm.step():
                tokens += message.tokens if isinstance(message, Tokens) else []
                scored |= isinstance(message, PromptLogprobs)
        return tokens, [shape for shape in calls if shape[1] > 1], scored

    first, prefills, _ = generated(kept, a)
    assert prefills == [(1, len(a))] and len(first) == 12
    assert generated(kept, a) == (first, [], False)  # no prefill
    assert generated(none_kept, a) == (first, [(1, len(a))], False)
    assert generated(kept, a, prompt_logprobs=True) == (first, [(1, len(a))], True)
    other_seed, prefills, _ = generated(kept, a, seed=6)
    assert other_seed != first and prefills == []
    for prompt in (b, c):  # a is the least recently used of three
        assert generated(kept, prompt)[1] == [(1, len(prompt))]
    assert generated(kept, c)[1] == [] and generated(kept, b)[1] == []
    assert generated(kept, a) == (first, [(1, len(a))], False)
    assert len(kept.prompt_states) == 2 and not none_kept.prompt_states


def test_tokens_that_arrive_before_the_rest_is_read_all_count():
    """The engine may send the last tokens of a generation before the front-end reads past its
    first: the text has every token, not only the first."""
    codec = TextCodec(Tokenizer("char"), Vocab.build([list("abc")]), 12)
    stream, ids = Stream(1), codec.ids("abcab")
    stream.push(ids[0], last=False)
    first = asyncio.run(stream.next(1))  # what first_tokens took
    for i, token in enumerate(ids[1:], 1):  # the other four, arrived before the rest is read
        stream.push(token, last=i == 4)
    generation = Generation(codec, GenerateRequest(prompt="a", max_new_tokens=5), [1], 1)

    async def read():
        return [piece async for pieces in rest(None, None, stream, generation, first, 1, 0) for piece in pieces]
    assert "".join(asyncio.run(read())) == "abcab" and generation.tokens == 5 and generation.finish_reason == "length"


def test_sessions_expire_and_are_capped(folder):
    s = Server(folder / "repo", session_idle_s=0.2, max_sessions=1)
    try:
        sid = httpx.post(f"{s.url}/v1/models/lm/sessions").json()["session_id"]
        full = httpx.post(f"{s.url}/v1/models/lm/sessions")
        assert full.status_code == 503 and full.headers["retry-after"] == "1"
        time.sleep(0.3)
        assert httpx.post(f"{s.url}/v1/models/lm/sessions/{sid}:step", json={"text": "t"}).status_code == 404
        assert httpx.post(f"{s.url}/v1/models/lm/sessions").status_code == 200  # the expired one freed its place
    finally:
        s.stop()


@pytest.mark.parametrize("body,path", [
    ({"prompt": ""}, "lm:generate"),
    ({"prompt": "the", "max_new_tokens": -1}, "lm:generate"),
    ({"prompt": "the", "max_new_tokens": 10 ** 9}, "lm:generate"),
    ({"prompt": "the", "temperature": -0.5}, "lm:generate"),
    ({"prompt": "the", "top_k": -1}, "lm:generate"),
    ({"prompt": "the", "top_k": 1000}, "lm:generate"),
    ({"prompt": "the", "top_p": 0}, "lm:generate"),
    ({"prompt": "the", "top_p": 1.5}, "lm:generate"),
    ({"prompt": "the", "seed": -1}, "lm:generate"),  # found by the fuzzer (a 500 before)
    ({"prompt": "the"}, "clf:generate"),
    ({"text": ""}, "lm/sessions/nope:step"),
])
def test_bad_generation_input_gets_a_clear_4xx(server, body, path):
    r = httpx.post(f"{server.url}/v1/models/{path}", json=body)
    assert 400 <= r.status_code < 500 and r.json()["error"], r.text
    assert gen(server, max_new_tokens=3).status_code == 200


@pytest.mark.parametrize("field,value", [("max_new_tokens", True), ("max_new_tokens", "5"), ("max_new_tokens", 5.0),
                                         ("stream", "yes"), ("temperature", "0"), ("seed", "1"), ("top_k", "3"),
                                         ("stop", "x")])
def test_a_value_of_the_wrong_json_type_is_a_400_naming_it_never_coerced(server, field, value):
    """docs/api.md promises a 400 for wrong types: "5" or true is no integer, "yes" no boolean."""
    r = gen(server, **{field: value})
    assert r.status_code == 400 and f"body.{field}" in r.json()["error"], r.text


def test_an_integer_where_a_number_is_asked_is_that_number(server):
    """"temperature": 0 is JSON's integer 0, a number: greedy, as 0.0 is."""
    greedy = gen(server, temperature=0, max_new_tokens=5)
    assert greedy.status_code == 200 and greedy.json()["text"] == gen(server, temperature=0.0, max_new_tokens=5).json()["text"]


def test_a_steps_top_k_must_be_an_integer(server):
    sid = httpx.post(f"{server.url}/v1/models/lm/sessions").json()["session_id"]
    try:
        r = httpx.post(f"{server.url}/v1/models/lm/sessions/{sid}:step", json={"text": "the", "top_k": "3"})
        assert r.status_code == 400 and "body.top_k" in r.json()["error"], r.text
        assert len(httpx.post(f"{server.url}/v1/models/lm/sessions/{sid}:step",
                              json={"text": "the", "top_k": 3}).json()["next"]) == 3
    finally:
        httpx.delete(f"{server.url}/v1/models/lm/sessions/{sid}")


def test_a_tiny_temperature_is_greedy_not_a_crash(server):
    """Found by the fuzzer: logits / 1e-310 overflowed to inf and NaN probabilities (a 500)."""
    assert gen(server, temperature=1e-310, max_new_tokens=20).json()["text"] == gen(
        server, temperature=0, max_new_tokens=20).json()["text"]


def test_an_error_while_streaming_ends_the_stream_with_an_error_event(folder):
    """Once the first token is sent, so are the headers: a later error and the request id go in
    the stream (the fuzzer found streams that were cut without a word). An error before the first
    token is still a status: 500, with the request id."""
    s = Server(folder / "repo")
    runner = s.deployment("lm").runner
    advance, calls, good = runner.advance, [], [2]  # the first `good` steps of a generation run

    def failing(*args):
        calls.append(1)
        return advance(*args) if len(calls) <= good[0] else 1 / 0

    runner.advance = failing
    try:
        r = httpx.post(f"{s.url}/v1/models/lm:generate", json={"prompt": "the", "stream": True},
                       headers={"X-Request-ID": "stream-1"})
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
        assert r.status_code == 200 and [e.get("token") is not None for e in events] == [True, True, False], r.text
        assert events[-1]["request_id"] == "stream-1" and "ZeroDivisionError" in events[-1]["error"]
        calls.clear()
        good[0] = 0  # a prompt not seen before: its first token needs a call ("the"'s state is kept)
        r = httpx.post(f"{s.url}/v1/models/lm:generate", json={"prompt": "the time", "stream": True},
                       headers={"X-Request-ID": "first-1"})
        assert r.status_code == 500 and r.json()["request_id"] == "first-1" and "ZeroDivisionError" in r.json()["error"]
    finally:
        s.stop()


def test_unknown_session_is_404_and_unknown_characters_are_reported(server):
    assert httpx.post(f"{server.url}/v1/models/lm/sessions/nope:step", json={"text": "t"}).status_code == 404
    assert httpx.delete(f"{server.url}/v1/models/lm/sessions/nope").status_code == 404
    sid = httpx.post(f"{server.url}/v1/models/lm/sessions").json()["session_id"]
    assert httpx.delete(f"{server.url}/v1/models/lm/sessions/{sid}").status_code == 200
    gone = httpx.post(f"{server.url}/v1/models/lm/sessions/{sid}:step", json={"text": "t"})
    assert gone.status_code == 404 and f"no session '{sid}'" in gone.json()["error"], gone.text  # the id it was given
    r = gen(server, prompt="the ZQ time", max_new_tokens=2).json()
    assert r["unknown_prompt_tokens"] == 2 and r["prompt_tokens"] == 11


def test_generation_cap_answers_503(folder):
    s = Server(folder / "repo", max_generations=1)
    slowed_steps(s, "lm", 0.02)
    try:
        async def fire():
            async with httpx.AsyncClient(base_url=s.url, timeout=30) as client:
                first = asyncio.ensure_future(client.post("/v1/models/lm:generate", json={
                    "prompt": "the", "max_new_tokens": 20}))
                await asyncio.sleep(0.1)
                second = await client.post("/v1/models/lm:generate", json={"prompt": "the", "max_new_tokens": 2})
                return await first, second
        first, second = asyncio.run(fire())
        assert first.status_code == 200 and second.status_code == 503 and second.headers["retry-after"] == "1"
    finally:
        s.stop()


def test_a_client_that_disconnects_ends_its_generation(folder):
    s = Server(folder / "repo")
    slowed_steps(s, "lm", 0.005)

    def tokens_so_far() -> float:  # the registry is the process's, shared with other tests' servers
        return float(re.search(r'rnnserve_tokens_generated_total\{model="lm"\} (\S+)',
                               httpx.get(f"{s.url}/metrics").text)[1])

    try:
        before = tokens_so_far()
        with httpx.stream("POST", f"{s.url}/v1/models/lm:generate",
                          json={"prompt": "the", "max_new_tokens": 1000, "stream": True}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 10:
                    break
        time.sleep(0.3)
        assert s.deployment("lm").lm.streams == {}
        assert tokens_so_far() - before < 200  # it stopped long before its 1000 tokens
    finally:
        s.stop()
