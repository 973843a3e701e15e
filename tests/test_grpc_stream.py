"""Triton's decoupled streaming over gRPC (serving/frontend/grpc/stream.py), spoken by
tritonclient.grpc unchanged: start_stream / async_stream_infer against a real server."""
import json
import queue
import re
import time

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton

from loadtest.servers import free_port
from tests.serving_fixtures import Server, graph_logits, slowed_steps, streams_gone, tiny_repository

SAMPLING = {"max_tokens": 100, "temperature": 0.8, "top_k": 5, "top_p": 0.9, "seed": 11}


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    return tiny_repository(tmp_path_factory.mktemp("grpc-stream"))


@pytest.fixture(scope="module")
def server(repository):
    s = Server(repository, grpc_port=free_port())
    yield s
    s.stop()


class Stream:
    """One tritonclient stream; the responses its callback got, by request id."""

    def __init__(self, server):
        self.client = triton.InferenceServerClient(f"127.0.0.1:{server.settings.grpc_port}")
        self.responses: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))

    def send(self, rid: str, text: str, stream: bool, model: str = "lm", empty_final: bool = True, **sampling):
        inputs = [triton.InferInput("text_input", [1], "BYTES"), triton.InferInput("stream", [1], "BOOL"),
                  triton.InferInput("sampling_parameters", [1], "BYTES")]
        inputs[0].set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
        inputs[1].set_data_from_numpy(np.array([stream]))
        inputs[2].set_data_from_numpy(np.array([json.dumps(sampling).encode()], dtype=np.object_))
        self.client.async_stream_infer(model, inputs, request_id=rid, enable_empty_final_response=empty_final)

    def until_final(self, count: int, timeout_s: float = 60) -> dict[str, list]:
        """Every response (text or error) of `count` requests, until each has ended."""
        got, ended, deadline = {}, set(), time.monotonic() + timeout_s
        while len(ended) < count:
            result, error = self.responses.get(timeout=max(0.0, deadline - time.monotonic()))
            if error is not None:
                got.setdefault(error.message(), []).append(error)
                ended.add(error.message())
                continue
            response = result.get_response()
            text = result.as_numpy("text_output")
            got.setdefault(response.id, []).append(text[0].decode() if text is not None else None)
            if response.parameters["triton_final_response"].bool_param:
                ended.add(response.id)
        return got

    def close(self):
        self.client.stop_stream(cancel_requests=True)
        self.client.close()


def ours(server, prompt: str, **sampling) -> str:
    body = {"prompt": prompt, "max_new_tokens": sampling.pop("max_tokens")} | sampling
    r = httpx.post(f"{server.url}/v1/models/lm:generate", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["text"]


def test_a_streamed_generation_of_100_tokens_is_the_text_of_generate(server):
    expected = ours(server, "the time", **SAMPLING)
    stream = Stream(server)
    try:
        stream.send("r1", "the time", True, **SAMPLING)
        parts = stream.until_final(1)["r1"]
        assert len(parts) > 2 and parts[-1] is None  # the empty final response that was asked for
        assert "".join(parts[:-1]) == expected
        stream.send("r2", "the time", False, empty_final=False, **SAMPLING)
        assert stream.until_final(1)["r2"] == ["the time" + expected]  # one response, with the prompt
    finally:
        stream.close()


def test_64_requests_on_one_stream_each_complete_with_their_own_text(server):
    prompts = {f"r{i}": f"the time {chr(97 + i % 26)}" for i in range(64)}
    solo = {p: ours(server, p, max_tokens=30, temperature=0) for p in set(prompts.values())}
    stream = Stream(server)
    try:
        for rid, prompt in prompts.items():
            stream.send(rid, prompt, True, max_tokens=30, temperature=0)
        got = stream.until_final(64)
        assert {rid: "".join(parts[:-1]) for rid, parts in got.items()} == {r: solo[p] for r, p in prompts.items()}
    finally:
        stream.close()


def counted(server, status: int) -> float:
    """The stream's generations counted with `status` in /metrics so far (every server of the
    test process shares the counters)."""
    found = re.findall(r'rnnserve_requests_total\{endpoint="grpc_stream_generate",model="lm",status="%d",version="[^"]+"\} '
                       r'(\S+)' % status, httpx.get(server.url + "/metrics").text)
    return sum(map(float, found))  # every version's


def left_once(server, before: dict, timeout_s: float = 10) -> bool:
    """Whether one more generation is counted 499 (a client that left) and none more 504, within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while counted(server, 499) < before[499] + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    return counted(server, 499) == before[499] + 1 and counted(server, 504) == before[504]


def test_closing_the_stream_midway_frees_the_engines_slot_at_once(repository):
    s = Server(repository, grpc_port=free_port())
    slowed_steps(s, "lm", 0.005)
    stream = Stream(s)
    try:
        before = {status: counted(s, status) for status in (499, 504)}
        stream.send("long", "the", True, max_tokens=1000)
        for _ in range(10):
            result, error = stream.responses.get(timeout=30)
            assert error is None
        lm = s.deployment("lm").lm
        assert len(lm.streams) == 1
        stream.close()
        print(f"the engine dropped the generation {streams_gone(s, 'lm'):.3f}s after the client closed the stream")
        assert lm.streams == {}
        assert left_once(s, before)  # counted once the stream's task has ended: as a client that left
    finally:
        s.stop()


def test_a_stream_closed_before_the_first_token_is_counted_as_a_client_that_left(repository):
    """Closing the stream while a generation waits for its first token cancels it: counted 499, as a
    client that left, never as a deadline (it was counted 504 when the wait turned the
    cancellation into a status)."""
    s = Server(repository, grpc_port=free_port())
    slowed_steps(s, "lm", 1.0)  # the first token comes after a second
    stream = Stream(s)
    try:
        before = {status: counted(s, status) for status in (499, 504)}
        stream.send("slow", "the", True, max_tokens=5)
        time.sleep(0.3)
        stream.close()
        assert left_once(s, before)
    finally:
        s.stop()


def test_a_bad_request_is_an_error_on_the_stream_and_the_stream_goes_on(server, repository):
    stream = Stream(server)
    try:
        stream.send("bad", "the", True, max_tokens=0)
        stream.send("beam", "the", True, beam_width=2)
        stream.send("clf", "the", True, model="clf")
        stream.send("typed", "the", True, max_tokens="3")  # strict types, as REST's
        errors = stream.until_final(4)
        assert any("max_tokens" in e for e in errors) and any("beam_width" in e for e in errors), errors
        assert any("parameters.max_tokens: Input should be a valid integer" in e for e in errors), errors
        assert any("only language models generate" in e for e in errors), errors
        stream.send("good", "the", False, empty_final=False, max_tokens=5, temperature=0)
        assert stream.until_final(1)["good"] == ["the" + ours(server, "the", max_tokens=5, temperature=0)]
    finally:
        stream.close()


def test_a_classifier_request_on_the_stream_is_one_modelinfer_answer(server, repository):
    ids, lengths = np.array([[2, 3, 4], [5, 6, 0]], np.int64), np.array([3, 2], np.int64)
    stream = Stream(server)
    try:
        inputs = [triton.InferInput("input_ids", [2, 3], "INT64"), triton.InferInput("lengths", [2], "INT64")]
        inputs[0].set_data_from_numpy(ids)
        inputs[1].set_data_from_numpy(lengths)
        stream.client.async_stream_infer("clf", inputs, request_id="c1")
        result, error = stream.responses.get(timeout=30)
        assert error is None and result.get_response().parameters["triton_final_response"].bool_param
        assert np.abs(result.as_numpy("logits") - graph_logits(repository, "clf", ids, lengths)).max() < 1e-5
    finally:
        stream.close()
