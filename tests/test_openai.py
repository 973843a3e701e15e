"""The OpenAI-compatible API (serving/frontend/routes/openai.py) spoken by the official `openai`
package, unchanged, against a real uvicorn over the tiny language model: each answer checked
against :generate's for the same generation."""
import asyncio
import json

import httpx
import openai
import pytest

from core.repository import ChatTemplate
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
    series = 'rnnserve_requests_total{endpoint="%s",model="lm",status="%s"}'
    before = httpx.get(f"{server.url}/metrics").text
    client.completions.create(model="lm", prompt="the", max_tokens=3)
    list(client.chat.completions.create(model="lm", messages=[{"role": "user", "content": "a"}], max_tokens=3,
                                        stream=True))
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="lm", prompt="the", temperature=9)
    after = httpx.get(f"{server.url}/metrics").text
    for endpoint, status in (("openai_completions", 200), ("openai_chat_stream", 200), ("openai_completions", 400)):
        assert sample(after, series % (endpoint, status)) == sample(before, series % (endpoint, status)) + 1
