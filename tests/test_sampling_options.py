"""The sampling options every generation front reads the same way (penalties, min_tokens, logprobs,
prompt_logprobs), against a real server over the tiny LM: each checked against what V2 infer's
logits or a session step say, computed here with numpy, never against the server's own sampler."""
import asyncio
import json
from collections import Counter

import httpx
import numpy as np
import pytest

from core.codec import TextCodec
from core.repository import read_version
from core.tokenize import Tokenizer, Vocab
from loadtest.servers import free_port
from serving.frontend.core.generation import Generation
from serving.frontend.schemas import GenerateRequest
from tests.serving_fixtures import Server, tiny_repository
from tests.test_grpc_stream import Stream
from tests.test_sampling import penalized_alone, sampled_alone

PROMPT = "the time"


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    return tiny_repository(tmp_path_factory.mktemp("sampling-options"))


@pytest.fixture(scope="module")
def server(repository):
    s = Server(repository, grpc_port=free_port())
    yield s
    s.stop()


@pytest.fixture(scope="module")
def codec(repository):
    return read_version(repository / "lm" / "1").codec


def generate(server, **body) -> dict:
    r = httpx.post(f"{server.url}/v1/models/lm:generate", json={"prompt": PROMPT} | body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def v2_logits(server, ids: list[int]) -> np.ndarray:
    """(T, V): the logits V2 infer answers for this one row, from the zero state."""
    r = httpx.post(f"{server.url}/v2/models/lm/infer", json={"inputs": [
        {"name": "input_ids", "shape": [1, len(ids)], "datatype": "INT64", "data": ids},
        {"name": "lengths", "shape": [1], "datatype": "INT64", "data": [len(ids)]}]}, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    return np.array(out["data"], np.float32).reshape(out["shape"])[0]


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def expected_text(server, codec, n: int, penalties: dict, temperature: float = 0.0, seed: int | None = None,
                  top_k: int = 0, top_p: float = 1.0) -> str:
    """The reference: n tokens, each from V2 infer's logits of the whole text so far, penalized by
    their definition, then the argmax (or, for a seed, drawn as one stream alone draws)."""
    prompt = codec.ids(PROMPT)
    rng, generated = np.random.default_rng(seed), []
    for _ in range(n):
        z = penalized_alone(v2_logits(server, prompt + generated)[-1], prompt, generated, **penalties)
        generated.append(sampled_alone(z.astype(np.float32), temperature, top_k, top_p, rng))
    return "".join(codec.piece(t) for t in generated)


@pytest.mark.parametrize("penalties", [
    {"presence": 1.5, "frequency": 0.0, "repetition": 1.0},
    {"presence": 0.0, "frequency": 0.7, "repetition": 1.0},
    {"presence": 0.0, "frequency": 0.0, "repetition": 1.8},
    {"presence": -0.5, "frequency": 0.4, "repetition": 0.6},
])
def test_penalties_change_the_greedy_text_as_their_definition_says(server, codec, penalties):
    body = {"presence_penalty": penalties["presence"], "frequency_penalty": penalties["frequency"],
            "repetition_penalty": penalties["repetition"]}
    got = generate(server, max_new_tokens=30, temperature=0, **body)["text"]
    assert got == expected_text(server, codec, 30, penalties)
    assert got != generate(server, max_new_tokens=30, temperature=0)["text"]  # they did change it


def test_penalties_change_a_seeded_text_as_their_definition_says(server, codec):
    sampling = {"temperature": 0.9, "top_k": 6, "top_p": 0.95, "seed": 3}
    penalties = {"presence": 0.8, "frequency": 0.5, "repetition": 1.4}
    got = generate(server, max_new_tokens=30, presence_penalty=0.8, frequency_penalty=0.5, repetition_penalty=1.4,
                   **sampling)["text"]
    assert got == expected_text(server, codec, 30, penalties, **sampling)


def test_generations_with_and_without_the_options_share_steps_and_each_gets_its_solo_answer(server):
    """Penalized, logprobs, scoring and plain generations fired together (so they share steps and
    slots are reused): each answer is the one it gets alone."""
    bodies = [{"max_new_tokens": 20, "temperature": 0},
              {"max_new_tokens": 20, "temperature": 0, "repetition_penalty": 1.5, "frequency_penalty": 0.3},
              {"max_new_tokens": 20, "seed": 4, "presence_penalty": 1.0, "logprobs": 3},
              {"max_new_tokens": 0, "prompt_logprobs": True},
              {"max_new_tokens": 20, "seed": 9, "prompt_logprobs": True, "logprobs": 0}] * 4
    solo = [generate(server, **body) for body in bodies[:5]] * 4

    async def fire():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/models/lm:generate", json={"prompt": PROMPT} | body)
                                          for body in bodies))
    def scores(answer: dict) -> list[float]:  # a batch may move a log-probability by float rounding
        return [e["logprob"] for e in answer.get("logprobs", [])] + (answer.get("prompt_logprobs") or [None])[1:]

    for got, alone in zip((r.json() for r in asyncio.run(fire())), solo):
        assert got.keys() == alone.keys() and got["text"] == alone["text"] and got["tokens"] == alone["tokens"]
        assert np.allclose(scores(got), scores(alone), atol=1e-5)


def test_min_tokens_keeps_a_stop_string_from_ending_the_text_before_it(server):
    """A stop string met early ends the text there; with min_tokens m it ends at the first
    occurrence completed by the m-th token or later (as vLLM's stop checker)."""
    sampling = {"max_new_tokens": 60, "temperature": 0.8, "seed": 2}
    r = generate(server, logprobs=0, **sampling)
    full, ends = r["text"], np.cumsum([len(e["token"]) for e in r["logprobs"]])  # the text's length after each token
    stop, _ = Counter(full[i: i + 2] for i in range(len(full) - 1) if "<" not in full[i: i + 2]).most_common(1)[0]
    starts = [i for i in range(len(full)) if full.startswith(stop, i)]
    early = generate(server, stop=[stop], **sampling)
    assert early["finish_reason"] == "stop" and early["text"] == full[: starts[0]]
    m = int(np.searchsorted(ends, starts[0] + len(stop))) + 3  # the first one completes two tokens before the m-th
    later = [i for i in starts if i + len(stop) > ends[m - 2]]
    assert later and later[0] > starts[0]
    r = generate(server, stop=[stop], min_tokens=m, **sampling)
    assert r["finish_reason"] == "stop" and r["text"] == full[: later[0]]
    assert ends[r["tokens"] - 2] < later[0] + len(stop) <= ends[r["tokens"] - 1]  # its last token completed it


@pytest.mark.parametrize("min_tokens,text,tokens", [(0, "", 2), (2, "", 2), (3, "abc", 5), (6, "abcab", 5)])
def test_min_tokens_lets_a_stop_string_completed_before_it_stay_in_the_text(min_tokens, text, tokens):
    """"abcab" with the stop string "ab": it ends the text at the 2nd token unless min_tokens is
    past it; then the occurrence completed at the 5th does (vLLM's stop checker), or none."""
    codec = TextCodec(Tokenizer("char"), Vocab.build([list("abc")]), 12)
    generation = Generation(codec, GenerateRequest(prompt="a", max_new_tokens=10, stop=["ab"], min_tokens=min_tokens),
                            [1], 1)
    generation.add(codec.ids("abcab"), last=True)
    assert (generation.text, generation.tokens) == (text, tokens)
    assert generation.finish_reason == ("length" if min_tokens == 6 else "stop")


def test_logprobs_top_entries_are_a_session_steps_probabilities(server):
    """Each generated token's top 5 and its own log-probability: the log of what a session step
    after the same text answers, to 1e-5; the chosen token is the greedy one, the most likely."""
    r = generate(server, max_new_tokens=8, temperature=0, logprobs=5)
    assert len(r["logprobs"]) == 8 and "".join(e["token"] for e in r["logprobs"]) == r["text"]
    sid = httpx.post(f"{server.url}/v1/models/lm/sessions").json()["session_id"]
    try:
        fed = PROMPT
        for entry in r["logprobs"]:
            step = httpx.post(f"{server.url}/v1/models/lm/sessions/{sid}:step", json={"text": fed, "top_k": 5}).json()
            assert [t["token"] for t in step["next"]] == [t["token"] for t in entry["top"]]
            assert max(abs(np.log(t["probability"]) - e["logprob"]) for t, e in zip(step["next"], entry["top"])) < 1e-5
            assert entry["token"] == entry["top"][0]["token"] and entry["logprob"] == entry["top"][0]["logprob"]
            fed = entry["token"]
    finally:
        httpx.delete(f"{server.url}/v1/models/lm/sessions/{sid}")


def test_logprobs_are_of_the_penalized_logits_before_the_temperature(server, codec):
    """A seeded, penalized generation: each token's log-probability is the log-softmax of V2
    infer's logits after the penalties, at temperature 1 whatever the temperature (1e-5)."""
    r = generate(server, max_new_tokens=6, temperature=0.7, seed=5, repetition_penalty=1.5, logprobs=0)
    prompt, generated = codec.ids(PROMPT), []
    for entry in r["logprobs"]:
        token = codec.vocab.encode([entry["token"]])[0]
        z = penalized_alone(v2_logits(server, prompt + generated)[-1], prompt, generated, 0.0, 0.0, 1.5)
        assert abs(log_softmax(z.astype(np.float32))[token] - entry["logprob"]) < 1e-5 and entry["top"] == []
        generated.append(token)


def test_a_scored_text_sums_to_its_log_likelihood_from_v2_infer(server, codec):
    """prompt_logprobs with max_new_tokens 0: no tokens, finish_reason length, and each prompt
    token's log-probability given those before it, which sum to the text's log-likelihood under
    V2 infer's logits (B, T, V) to 1e-4."""
    text = "the time traveller"
    r = generate(server, prompt=text, max_new_tokens=0, prompt_logprobs=True)
    ids = codec.ids(text)
    assert (r["text"], r["tokens"], r["finish_reason"], r["prompt_tokens"]) == ("", 0, "length", len(ids))
    scores = r["prompt_logprobs"]
    assert len(scores) == len(ids) and scores[0] is None and "logprobs" not in r
    logp = log_softmax(v2_logits(server, ids))  # (T, V)
    expected = logp[np.arange(len(ids) - 1), ids[1:]]
    assert np.abs(np.array(scores[1:]) - expected).max() < 1e-5
    assert abs(sum(scores[1:]) - expected.sum()) < 1e-4


def test_prompt_logprobs_come_with_a_generation_too(server):
    scored = generate(server, max_new_tokens=0, prompt_logprobs=True)["prompt_logprobs"]
    r = generate(server, max_new_tokens=5, temperature=0, prompt_logprobs=True, logprobs=2)
    assert r["prompt_logprobs"] == scored and len(r["logprobs"]) == 5 and r["tokens"] == 5
    assert r["text"] == generate(server, max_new_tokens=5, temperature=0)["text"]


def events(text: str) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: ")]


def test_a_generate_stream_sends_each_tokens_logprobs_in_its_event(server):
    whole = generate(server, max_new_tokens=12, temperature=0, logprobs=3, prompt_logprobs=True)
    r = httpx.post(f"{server.url}/v1/models/lm:generate", json={
        "prompt": PROMPT, "max_new_tokens": 12, "temperature": 0, "logprobs": 3, "prompt_logprobs": True,
        "stream": True}, timeout=30)
    got = events(r.text)
    assert got[:-1] == whole["logprobs"] and got[-1] == whole


def test_the_generate_extension_answers_the_same_logprobs(server):
    ours = generate(server, max_new_tokens=12, temperature=0, logprobs=2, prompt_logprobs=True, min_tokens=3,
                    presence_penalty=0.5)
    parameters = {"max_tokens": 12, "temperature": 0, "logprobs": 2, "prompt_logprobs": True, "min_tokens": 3,
                  "presence_penalty": 0.5}
    r = httpx.post(f"{server.url}/v2/models/lm/generate", json={"text_input": PROMPT, "parameters": parameters})
    assert r.status_code == 200, r.text
    assert r.json() == {"model_name": "lm", "model_version": "1", "text_output": PROMPT + ours["text"],
                        "logprobs": ours["logprobs"], "prompt_logprobs": ours["prompt_logprobs"]}
    r = httpx.post(f"{server.url}/v2/models/lm/generate_stream", json={"text_input": PROMPT, "parameters": parameters})
    got = events(r.text)
    assert "".join(e["text_output"] for e in got) == ours["text"]
    assert [x for e in got for x in e.get("logprobs", [])] == ours["logprobs"]
    assert got[0]["prompt_logprobs"] == ours["prompt_logprobs"] and all("prompt_logprobs" not in e for e in got[1:])
    scored = httpx.post(f"{server.url}/v2/models/lm/generate", json={
        "text_input": PROMPT, "parameters": {"max_tokens": 0, "prompt_logprobs": True}}).json()
    assert scored["text_output"] == PROMPT and scored["prompt_logprobs"] == ours["prompt_logprobs"]


def test_the_grpc_stream_answers_the_same_logprobs(server):
    ours = generate(server, max_new_tokens=10, temperature=0, logprobs=1, prompt_logprobs=True)
    stream = Stream(server)
    try:
        got = []
        stream.send("whole", PROMPT, False, empty_final=False, max_tokens=10, temperature=0, logprobs=1,
                    prompt_logprobs=True)
        stream.send("parts", PROMPT, True, empty_final=True, max_tokens=10, temperature=0, logprobs=1,
                    prompt_logprobs=True)
        ended = set()
        while len(ended) < 2:
            result, error = stream.responses.get(timeout=30)
            assert error is None, error
            got.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                ended.add(result.get_response().id)
    finally:
        stream.close()

    def outputs(rid):
        return [{o.name: r.as_numpy(o.name)[0].decode() for o in r.get_response().outputs}
                for r in got if r.get_response().id == rid and r.get_response().outputs]
    [whole] = outputs("whole")
    assert whole["text_output"] == PROMPT + ours["text"]
    assert json.loads(whole["logprobs"]) == ours["logprobs"]
    assert json.loads(whole["prompt_logprobs"]) == ours["prompt_logprobs"]
    parts = outputs("parts")
    assert "".join(p["text_output"] for p in parts) == ours["text"]
    assert [x for p in parts for x in json.loads(p.get("logprobs", "[]"))] == ours["logprobs"]
    assert json.loads(parts[0]["prompt_logprobs"]) == ours["prompt_logprobs"]


BAD = [  # (field as :generate names it, a value out of its bounds, as the generate extension names it)
    ("presence_penalty", 2.5, "presence_penalty"),
    ("presence_penalty", -2.1, "presence_penalty"),
    ("frequency_penalty", 3, "frequency_penalty"),
    ("repetition_penalty", 0, "repetition_penalty"),
    ("repetition_penalty", -1.0, "repetition_penalty"),
    ("min_tokens", -1, "min_tokens"),
    ("logprobs", 21, "logprobs"),
    ("logprobs", -1, "logprobs"),
    ("prompt_logprobs", "yes", "prompt_logprobs"),
    ("min_tokens", 50, "min_tokens"),  # past max_new_tokens (20)
    ("max_new_tokens", 0, "max_tokens"),  # 0 without prompt_logprobs
]


@pytest.mark.parametrize("field,value,triton_name", BAD)
def test_a_bad_value_is_a_400_naming_the_field_on_generate(server, field, value, triton_name):
    r = httpx.post(f"{server.url}/v1/models/lm:generate", json={"prompt": PROMPT, "max_new_tokens": 20, field: value})
    assert r.status_code == 400 and field in r.json()["error"], r.text


@pytest.mark.parametrize("field,value,triton_name", BAD)
def test_a_bad_value_is_a_400_naming_the_field_on_the_generate_extension(server, field, value, triton_name):
    parameters = {"max_tokens": 20} | {triton_name: value}
    r = httpx.post(f"{server.url}/v2/models/lm/generate", json={"text_input": PROMPT, "parameters": parameters})
    error = r.json()["error"]
    assert r.status_code == 400 and triton_name in error and "max_new_tokens" not in error, r.text


def test_a_bad_value_is_an_error_naming_the_field_on_the_grpc_stream(server):
    """Each an error response on the stream naming the field as sampling_parameters named it."""
    stream = Stream(server)
    try:
        for i, (_, value, name) in enumerate(BAD):
            stream.send(f"bad{i}", PROMPT, True, **{"max_tokens": 20, name: value})
        errors = [stream.responses.get(timeout=30) for _ in BAD]
    finally:
        stream.close()
    assert all(result is None and error is not None for result, error in errors), errors
    messages = [error.message() for _, error in errors]
    for _, _, name in BAD:
        assert any(name in m for m in messages), (name, messages)
    assert not any("max_new_tokens" in m for m in messages), messages
