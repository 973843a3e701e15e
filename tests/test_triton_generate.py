"""Triton's generate extension over HTTP (serving/frontend/routes/v2_generate.py), spoken as
Triton's clients speak it: plain JSON and server-sent events against a real uvicorn."""
import asyncio
import json

import httpx
import pytest

from tests.serving_fixtures import Server, slowed_steps, streams_gone, tiny_repository

SAMPLED = {"max_tokens": 100, "temperature": 0.8, "top_k": 5, "top_p": 0.9, "seed": 11}


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    return tiny_repository(tmp_path_factory.mktemp("triton"))


@pytest.fixture(scope="module")
def server(repository):
    s = Server(repository)
    yield s
    s.stop()


def ours(server, prompt: str, **body) -> dict:
    """What :generate answers for the same generation."""
    r = httpx.post(f"{server.url}/v1/models/lm:generate", json={"prompt": prompt, **body}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def as_v1(p: dict) -> dict:
    return {"max_new_tokens": p["max_tokens"]} | {k: v for k, v in p.items() if k != "max_tokens"}


def events(text: str) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: ")]


def test_generate_answers_the_text_of_generate_with_the_prompt_unless_excluded(server):
    expected = ours(server, "the time", **as_v1(SAMPLED))["text"]
    r = httpx.post(f"{server.url}/v2/models/lm/generate", json={"text_input": "the time", "parameters": SAMPLED}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json() == {"model_name": "lm", "model_version": "1", "text_output": "the time" + expected}
    excluded = httpx.post(f"{server.url}/v2/models/lm/versions/1/generate", timeout=30, json={
        "text_input": "the time", "parameters": SAMPLED | {"exclude_input_in_output": True}})
    assert excluded.json()["text_output"] == expected
    top_level = httpx.post(f"{server.url}/v2/models/lm/generate", json={"text_input": "the time", **SAMPLED}, timeout=30)
    assert top_level.json() == r.json()  # Triton passes a body's other keys on as parameters


def test_a_stream_of_100_tokens_adds_up_to_the_text_of_generate(server):
    expected = ours(server, "the time", **as_v1(SAMPLED))
    assert expected["tokens"] == 100
    r = httpx.post(f"{server.url}/v2/models/lm/generate_stream", json={"text_input": "the time", "parameters": SAMPLED},
                   timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    got = events(r.text)
    assert len(got) > 1 and {(e["model_name"], e["model_version"]) for e in got} == {("lm", "1")}
    assert "".join(e["text_output"] for e in got) == expected["text"]  # the prompt is never repeated


def test_a_stream_with_a_stop_string_sends_no_text_the_stop_takes_back(server):
    full = ours(server, "the time", max_new_tokens=60, temperature=0)["text"]
    stop = full[20:24]
    expected = ours(server, "the time", max_new_tokens=60, temperature=0, stop=[stop])
    assert expected["finish_reason"] == "stop"
    r = httpx.post(f"{server.url}/v2/models/lm/generate_stream", timeout=30, json={
        "text_input": "the time", "parameters": {"max_tokens": 60, "temperature": 0, "stop": stop}})
    assert "".join(e["text_output"] for e in events(r.text)) == expected["text"] == full[: full.index(stop)]


def test_stream_false_on_generate_stream_is_one_event_with_the_whole_answer(server):
    body = {"text_input": "the", "parameters": {"max_tokens": 20, "temperature": 0, "stream": False}}
    whole = httpx.post(f"{server.url}/v2/models/lm/generate", json=body, timeout=30).json()
    assert events(httpx.post(f"{server.url}/v2/models/lm/generate_stream", json=body, timeout=30).text) == [whole]


def test_64_concurrent_streams_each_complete_with_their_own_text(server):
    prompts = [f"the time {chr(97 + i % 26)}" for i in range(64)]
    solo = {p: ours(server, p, max_new_tokens=40, temperature=0)["text"] for p in set(prompts)}

    async def fire():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v2/models/lm/generate_stream", json={
                "text_input": p, "max_tokens": 40, "temperature": 0}) for p in prompts))

    responses = asyncio.run(fire())
    assert [r.status_code for r in responses] == [200] * 64
    assert ["".join(e["text_output"] for e in events(r.text)) for r in responses] == [solo[p] for p in prompts]


def test_a_stream_closed_midway_frees_its_slot_at_once(repository):
    s = Server(repository)
    slowed_steps(s, "lm", 0.005)
    try:
        with httpx.stream("POST", f"{s.url}/v2/models/lm/generate_stream",
                          json={"text_input": "the", "max_tokens": 1000}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 10:
                    break
        print(f"the engine dropped the stream {streams_gone(s, 'lm'):.3f}s after the client closed it")
        assert s.deployment("lm").lm.streams == {}
    finally:
        s.stop()


@pytest.mark.parametrize("body,says", [
    ({"text_input": "the", "parameters": {"max_tokens": "3"}}, "parameters.max_tokens"),
    ({"text_input": "the", "max_tokens": "3"}, "parameters.max_tokens"),  # at the top level too
    ({"text_input": "the", "parameters": {"exclude_input_in_output": "true"}}, "parameters.exclude_input_in_output"),
    ({"text_input": "the", "parameters": {"temperature": "0"}}, "parameters.temperature"),
    ({"text_input": "the", "parameters": {"max_tokens": 10 ** 9}}, "max_tokens is at most"),  # its own name
])
def test_a_bad_value_is_refused_naming_the_field_as_the_client_sent_it(server, body, says):
    r = httpx.post(f"{server.url}/v2/models/lm/generate", json=body, timeout=30)
    assert r.status_code == 400 and says in r.json()["error"] and "max_new_tokens" not in r.json()["error"], r.text


@pytest.mark.parametrize("path,body,status", [
    ("lm/generate", {"text_input": ""}, 400),
    ("lm/generate", {"parameters": {"max_tokens": 5}}, 400),
    ("lm/generate", {"text_input": "the", "parameters": {"max_tokens": 0}}, 400),
    ("lm/generate", {"text_input": "the", "parameters": {"max_tokens": 10 ** 9}}, 400),
    ("lm/generate", {"text_input": "the", "parameters": {"beam_width": 2}}, 400),  # a parameter it does not have
    ("lm/generate", {"text_input": "the", "max_tokens": 5, "parameters": {"max_tokens": 6}}, 400),
    ("lm/generate", {"text_input": "the", "parameters": {"stream": True}}, 400),
    ("lm/generate", {"text_input": "the", "parameters": {"top_p": 0}}, 400),
    ("clf/generate", {"text_input": "the"}, 400),
    ("lm/versions/7/generate", {"text_input": "the"}, 404),
    ("nope/generate_stream", {"text_input": "the"}, 404),
])
def test_a_bad_request_is_a_json_error_before_any_event(server, path, body, status):
    r = httpx.post(f"{server.url}/v2/models/{path}", json=body, timeout=30)
    assert r.status_code == status and r.headers["content-type"] == "application/json" and r.json()["error"], r.text
