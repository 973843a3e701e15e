"""The OpenAI-compatible API (serving/frontend/routes/openai.py) spoken by the official `openai`
package, unchanged, against a real uvicorn over the tiny language model: each answer checked
against :generate's for the same generation."""
import asyncio
import json

import httpx
import numpy as np
import openai
import pytest

from core.repository import ChatTemplate, read_version
from tests.serving_fixtures import Server, sample, slowed_steps, streams_gone, tiny_repository

TEMPLATE = {"message": "<{role}> {content}\n", "reply": "<assistant> ", "stop": ["\n<"]}


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    repo = tiny_repository(tmp_path_factory.mktemp("openai"))
    (repo / "lm" / "config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    return repo


@pytest.fixture(scope="module")
def server(repository):
    s = Server(repository)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key="x", max_retries=0)


def ours(server, prompt: str, **body) -> dict:
    """What :generate answers for the same generation."""
    r = httpx.post(f"{server.url}/v1/models/lm:generate", json={"prompt": prompt, **body}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_the_models_are_the_language_models(client):
    assert [(m.id, m.object, m.owned_by) for m in client.models.list().data] == [("lm", "model", "rnnserve")]
    assert client.models.retrieve("lm").created > 0
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("nope")
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.BadRequestError):  # a classifier does not complete text
        client.models.retrieve("clf")


def test_a_greedy_completion_is_generates_text_with_its_usage(server, client):
    expected = ours(server, "the time", max_new_tokens=30, temperature=0)
    got = client.completions.create(model="lm", prompt="the time", max_tokens=30, temperature=0)
    assert got.object == "text_completion" and got.model == "lm" and got.id.startswith("cmpl-")
    assert [(c.index, c.text, c.finish_reason) for c in got.choices] == [(0, expected["text"], "length")]
    assert (got.usage.prompt_tokens, got.usage.completion_tokens, got.usage.total_tokens) == (
        expected["prompt_tokens"], 30, expected["prompt_tokens"] + 30)


def test_max_tokens_defaults_to_16_and_echo_puts_the_prompt_first(server, client):
    expected = ours(server, "the", max_new_tokens=16, temperature=0)["text"]
    got = client.completions.create(model="lm", prompt="the", temperature=0, echo=True)
    assert got.choices[0].text == "the" + expected and got.usage.completion_tokens == 16


def test_a_seeded_sampled_completion_is_generates_and_choice_i_takes_seed_plus_i(server, client):
    sampled = {"temperature": 0.8, "top_p": 0.9, "seed": 11}
    expected = [ours(server, "the time", max_new_tokens=40, top_k=5, **sampled | {"seed": 11 + i})["text"]
                for i in range(3)]
    got = client.completions.create(model="lm", prompt="the time", max_tokens=40, n=3, extra_body={"top_k": 5},
                                    **sampled)
    assert [c.text for c in got.choices] == expected and [c.index for c in got.choices] == [0, 1, 2]
    assert len(set(expected)) == 3 and got.usage.completion_tokens == 120


def test_a_list_of_prompts_answers_n_choices_for_each_in_order(server, client):
    prompts = ["the", "time m"]
    expected = [ours(server, p, max_new_tokens=10, temperature=0.5, seed=3 + i)["text"] for p in prompts for i in range(2)]
    got = client.completions.create(model="lm", prompt=prompts, max_tokens=10, temperature=0.5, seed=3, n=2)
    assert [c.text for c in got.choices] == expected
    assert got.usage.prompt_tokens == len("the") + len("time m")  # each prompt once, whatever n


def test_streamed_chunks_join_to_the_whole_then_usage_then_done(server, client):
    expected = ours(server, "the time", max_new_tokens=100, temperature=0.8, seed=5)
    chunks = list(client.completions.create(model="lm", prompt="the time", max_tokens=100, temperature=0.8, seed=5,
                                            stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) > 2 and "".join(texts) == expected["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 100
    assert chunks[-1].usage.prompt_tokens == expected["prompt_tokens"]
    raw = httpx.post(f"{server.url}/openai/v1/completions", json={"model": "lm", "prompt": "the", "max_tokens": 5,
                                                                  "stream": True}, timeout=30)
    assert raw.headers["content-type"].startswith("text/event-stream") and raw.text.endswith("data: [DONE]\n\n")


def test_a_stop_string_ends_the_text_before_it_streamed_or_not(server, client):
    full = ours(server, "the time", max_new_tokens=60, temperature=0)["text"]
    stop = full[20:24]
    got = client.completions.create(model="lm", prompt="the time", max_tokens=60, temperature=0, stop=[stop, "zzz"])
    assert (got.choices[0].text, got.choices[0].finish_reason) == (full[: full.index(stop)], "stop")
    streamed = client.completions.create(model="lm", prompt="the time", max_tokens=60, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[: full.index(stop)]


def test_a_chat_is_a_completion_of_its_messages_through_the_models_template(server, client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the time"}]
    prompt = ChatTemplate(**TEMPLATE).prompt([("system", "be brief"), ("user", "the time")])
    assert prompt == "<system> be brief\n<user> the time\n<assistant> "
    expected = client.completions.create(model="lm", prompt=prompt, max_tokens=50, temperature=0.9, seed=2,
                                         stop=TEMPLATE["stop"])
    got = client.chat.completions.create(model="lm", messages=messages, max_tokens=50, temperature=0.9, seed=2)
    assert got.object == "chat.completion" and got.id.startswith("chatcmpl-")
    assert got.choices[0].message.role == "assistant"
    assert (got.choices[0].message.content, got.choices[0].finish_reason) == (
        expected.choices[0].text, expected.choices[0].finish_reason)
    assert got.usage == expected.usage
    streamed = list(client.chat.completions.create(model="lm", messages=messages, max_completion_tokens=50,
                                                   temperature=0.9, seed=2, stream=True))
    assert streamed[0].object == "chat.completion.chunk" and streamed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == got.choices[0].message.content
    assert streamed[-1].choices[0].finish_reason == got.choices[0].finish_reason


def test_the_default_chat_template_is_role_colon_content_lines_then_the_assistants_turn():
    assert ChatTemplate().prompt([("user", "hi {role}"), ("assistant", "hello")]) == \
        "user: hi {role}\nassistant: hello\nassistant: "


def test_64_concurrent_streams_each_complete_with_their_own_text(server):
    prompts = [f"the time {chr(97 + i % 26)}" for i in range(64)]
    solo = {p: ours(server, p, max_new_tokens=40, temperature=0)["text"] for p in set(prompts)}

    async def one(client: openai.AsyncOpenAI, prompt: str) -> str:
        stream = await client.completions.create(model="lm", prompt=prompt, max_tokens=40, temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in stream])

    async def fire():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/openai/v1", api_key="x", max_retries=0,
                                      http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=64))) as c:
            return await asyncio.gather(*(one(c, p) for p in prompts))

    assert asyncio.run(fire()) == [solo[p] for p in prompts]


def test_a_stream_closed_midway_frees_its_slot(repository):
    s = Server(repository, max_generations=2)
    slowed_steps(s, "lm", 0.005)
    try:
        c = openai.OpenAI(base_url=f"{s.url}/openai/v1", api_key="x", max_retries=0)
        for _ in range(3):  # more than max_generations, one after another: each freed its slot
            stream = c.completions.create(model="lm", prompt="the", max_tokens=1000, stream=True)
            for i, _ in enumerate(stream):
                if i > 5:
                    break
            stream.close()
            print(f"the engine dropped the stream {streams_gone(s, 'lm'):.3f}s after the client closed it")
            assert s.deployment("lm").lm.streams == {}
        both = [c.completions.create(model="lm", prompt="the", max_tokens=5, stream=True) for _ in range(2)]
        assert [len([x for x in each if x.choices]) > 0 for each in both] == [True, True]
        with pytest.raises(httpx.ReadTimeout):  # a whole answer of two choices, its client gone first
            httpx.post(f"{s.url}/openai/v1/completions", json={"model": "lm", "prompt": "the", "max_tokens": 1000,
                                                               "n": 2}, timeout=0.5)
        print(f"the engine dropped both choices {streams_gone(s, 'lm'):.3f}s after the client left")
        assert s.deployment("lm").lm.streams == {}
    finally:
        s.stop()


@pytest.mark.parametrize("fields,param", [
    ({"temperature": 5}, "temperature"),
    ({"max_tokens": 10 ** 9}, "max_tokens"),
    ({"n": 100}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"top_p": 0}, "top_p"),
    ({"prompt": [1, 2, 3]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"suffix": "end"}, "suffix"),
])
def test_a_bad_value_is_a_bad_request_naming_its_param(client, fields, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**{"model": "lm", "prompt": "the"} | fields)
    assert e.value.status_code == 400 and e.value.param == param and e.value.type == "invalid_request_error"
    assert e.value.body["message"]


def test_a_value_of_the_wrong_type_is_a_400_in_openais_shape_and_the_rest_keeps_its_own(server):
    r = httpx.post(f"{server.url}/openai/v1/completions", json={"model": "lm", "prompt": "the", "max_tokens": "5"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(f"{server.url}/openai/v1/chat/completions", json={"model": "lm", "messages": [{"role": "bot"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    r = httpx.get(f"{server.url}/openai/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] is None
    r = httpx.post(f"{server.url}/v1/models/lm:generate", json={"prompt": "the", "max_new_tokens": "5"})
    assert r.status_code == 400 and isinstance(r.json()["error"], str)


def test_fields_that_do_not_apply_are_ignored(server, client):
    expected = ours(server, "the", max_new_tokens=8, temperature=0)["text"]
    got = client.completions.create(model="lm", prompt="the", max_tokens=8, temperature=0, user="me",
                                    extra_body={"guided_json": None, "whatever": [1]})
    assert got.choices[0].text == expected
    chat = client.chat.completions.create(model="lm", messages=[{"role": "user", "content": [{"type": "text",
                                                                                              "text": "the"}]}],
                                          max_tokens=8, temperature=0, user="me", tools=[], store=False,
                                          response_format={"type": "text"})
    assert chat.choices[0].finish_reason in ("stop", "length")


def test_an_unknown_model_is_not_found_and_a_classifier_a_bad_request(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="the")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="clf", messages=[{"role": "user", "content": "the"}])
    assert e.value.param == "model"


def test_a_full_generation_pool_is_a_503_with_retry_after(repository):
    s = Server(repository, max_generations=1)
    slowed_steps(s, "lm", 0.01)
    try:
        c = openai.OpenAI(base_url=f"{s.url}/openai/v1", api_key="x", max_retries=0)
        with c.completions.create(model="lm", prompt="the", max_tokens=1000, stream=True) as holding:
            next(iter(holding))
            r = httpx.post(f"{s.url}/openai/v1/completions", json={"model": "lm", "prompt": "the"}, timeout=30)
            assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "server_error"
    finally:
        s.stop()


def test_requests_are_counted_under_the_model_and_the_openai_endpoints(server, client):
    series = 'rnnserve_requests_total{endpoint="%s",model="lm",status="%s",version="%s"}'
    before = httpx.get(f"{server.url}/metrics").text
    client.completions.create(model="lm", prompt="the", max_tokens=3)
    list(client.chat.completions.create(model="lm", messages=[{"role": "user", "content": "a"}], max_tokens=3,
                                        stream=True))
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="lm", prompt="the", temperature=9)
    after = httpx.get(f"{server.url}/metrics").text
    for labels in (("openai_completions", 200, 1), ("openai_chat_stream", 200, 1), ("openai_completions", 400, "none")):
        assert sample(after, series % labels) == sample(before, series % labels) + 1


def v2_log_softmax(server, ids: list[int]) -> np.ndarray:
    """(T, V): the log-softmax of the logits V2 infer answers for this one row, from the zero state."""
    r = httpx.post(f"{server.url}/v2/models/lm/infer", json={"inputs": [
        {"name": "input_ids", "shape": [1, len(ids)], "datatype": "INT64", "data": ids},
        {"name": "lengths", "shape": [1], "datatype": "INT64", "data": [len(ids)]}]}, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    z = np.array(out["data"], np.float64).reshape(out["shape"])[0]
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def test_logprobs_top_entries_are_a_session_steps_probabilities(server, client):
    """Each generated token's top 5: the log of what a session step after the same text answers,
    to 1e-5, in the completions' shape (tokens, token_logprobs, top_logprobs, text_offset)."""
    got = client.completions.create(model="lm", prompt="the time", max_tokens=6, temperature=0, logprobs=5).choices[0]
    lp = got.logprobs
    assert "".join(lp.tokens) == got.text and lp.text_offset == list(range(6)) and len(lp.top_logprobs) == 6
    sid = httpx.post(f"{server.url}/v1/models/lm/sessions").json()["session_id"]
    try:
        fed = "the time"
        for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
            step = httpx.post(f"{server.url}/v1/models/lm/sessions/{sid}:step", json={"text": fed, "top_k": 5}).json()
            assert list(top) == [t["token"] for t in step["next"]]
            assert max(abs(np.log(t["probability"]) - top[t["token"]]) for t in step["next"]) < 1e-5
            assert top[token] == logprob == max(top.values())  # greedy: the most likely
            fed = token
    finally:
        httpx.delete(f"{server.url}/v1/models/lm/sessions/{sid}")


def test_a_scored_text_sums_to_its_log_likelihood_from_v2_infer(server, client, repository):
    """echo, max_tokens 0 and logprobs: each prompt token's log-probability given those before it
    (the first null), summing to the text's log-likelihood under V2 infer's logits to 1e-4."""
    text = "the time traveller"
    got = client.completions.create(model="lm", prompt=text, max_tokens=0, echo=True, logprobs=0)
    choice, ids = got.choices[0], read_version(repository / "lm" / "1").codec.ids(text)
    assert (choice.text, choice.finish_reason, got.usage.completion_tokens, got.usage.prompt_tokens) == (
        text, "length", 0, len(ids))
    lp = choice.logprobs
    assert "".join(lp.tokens) == text and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == list(range(len(text)))
    logp = v2_log_softmax(server, ids)
    expected = logp[np.arange(len(ids) - 1), ids[1:]]
    assert abs(sum(lp.token_logprobs[1:]) - expected.sum()) < 1e-4
    print(f"perplexity of {text!r}: {np.exp(-expected.mean()):.3f}")
    streamed = list(client.completions.create(model="lm", prompt=text, max_tokens=0, echo=True, logprobs=0,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == text
    assert sum((c.choices[0].logprobs.token_logprobs for c in streamed if c.choices[0].logprobs), []) == lp.token_logprobs


def test_echoed_logprobs_come_before_the_generated_ones_and_streamed_they_add_up(client):
    whole = client.completions.create(model="lm", prompt="the", max_tokens=20, temperature=0.9, seed=4, echo=True,
                                      logprobs=2).choices[0]
    lp = whole.logprobs
    assert "".join(lp.tokens) == whole.text and lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    assert lp.token_logprobs[0] is None and all(len(t) == 2 for t in lp.top_logprobs[3:])
    chunks = list(client.completions.create(model="lm", prompt="the", max_tokens=20, temperature=0.9, seed=4, echo=True,
                                            logprobs=2, stream=True))
    parts = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    assert sum((p.tokens for p in parts), []) == lp.tokens and sum((p.text_offset for p in parts), []) == lp.text_offset
    assert sum((p.top_logprobs for p in parts), []) == lp.top_logprobs


def test_chat_logprobs_are_in_the_chats_shape(client):
    messages = [{"role": "user", "content": "the time"}]
    got = client.chat.completions.create(model="lm", messages=messages, max_tokens=10, temperature=0, logprobs=True,
                                         top_logprobs=3).choices[0]
    content = got.logprobs.content
    assert "".join(t.token for t in content) == got.message.content and len(content) == 10
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == t.logprob and t.bytes == list(t.token.encode())
               for t in content)
    streamed = list(client.chat.completions.create(model="lm", messages=messages, max_tokens=10, temperature=0,
                                                   logprobs=True, top_logprobs=3, stream=True))
    assert sum((c.choices[0].logprobs.content for c in streamed if c.choices[0].logprobs), []) == content
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="lm", messages=messages, top_logprobs=3)
    assert e.value.param == "top_logprobs"


@pytest.mark.parametrize("fields", [
    {"presence_penalty": 1.5, "frequency_penalty": 0.5},
    {"extra_body": {"repetition_penalty": 1.8, "top_k": 4}},
    {"extra_body": {"min_tokens": 30}, "stop": "e"},
])
def test_penalties_and_min_tokens_are_generates(server, client, fields):
    generate = {k: v for k, v in fields.items() if k != "extra_body"} | fields.get("extra_body", {})
    generate["stop"] = [generate["stop"]] if "stop" in generate else []
    expected = ours(server, "the time", max_new_tokens=40, temperature=0.7, seed=9, **generate)
    got = client.completions.create(model="lm", prompt="the time", max_tokens=40, temperature=0.7, seed=9, **fields)
    assert (got.choices[0].text, got.choices[0].finish_reason) == (expected["text"], expected["finish_reason"])
    if "min_tokens" in generate:
        assert got.usage.completion_tokens >= 30


@pytest.mark.parametrize("fields,param", [
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"logprobs": 21}, "logprobs"),
    ({"max_tokens": 0}, "max_tokens"),  # without echo and logprobs: nothing to answer
    ({"max_tokens": 5, "extra_body": {"min_tokens": 6}}, "min_tokens"),
    ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias"),
])
def test_a_bad_sampling_value_is_a_bad_request_naming_its_param(client, fields, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**{"model": "lm", "prompt": "the"} | fields)
    assert e.value.param == param, e.value.body


def test_an_engine_failure_is_openais_error_before_the_first_token_and_a_chunk_after(repository):
    s = Server(repository)
    runner = s.deployment("lm").runner
    advance, calls, good = runner.advance, [], [2]  # the first `good` steps of a generation run

    def failing(*args):
        calls.append(1)
        return advance(*args) if len(calls) <= good[0] else 1 / 0

    runner.advance = failing
    try:
        c = openai.OpenAI(base_url=f"{s.url}/openai/v1", api_key="x", max_retries=0)
        received = []
        with pytest.raises(openai.APIError) as e:
            for chunk in c.completions.create(model="lm", prompt="the", max_tokens=50, stream=True):
                received.append(chunk.choices[0].text)
        assert 1 <= len(received) <= 2 and "ZeroDivisionError" in e.value.message  # 2 tokens, in 1 or 2 chunks
        calls.clear()
        raw = httpx.post(f"{s.url}/openai/v1/completions", json={"model": "lm", "prompt": "the", "stream": True})
        assert raw.status_code == 200 and raw.text.endswith("data: [DONE]\n\n") and '"server_error"' in raw.text
        calls.clear()
        good[0] = 0
        with pytest.raises(openai.InternalServerError) as e:
            c.completions.create(model="lm", prompt="the", max_tokens=50)
        assert e.value.status_code == 500 and e.value.type == "server_error"
    finally:
        s.stop()
