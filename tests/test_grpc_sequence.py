"""Triton's sequences on ModelStreamInfer (serving/frontend/grpc/sequence.py), spoken by
tritonclient.grpc unchanged: sequence_id / sequence_start / sequence_end step one state of the
language model, each answer the step of a REST session over the same text."""
import queue
import struct

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2 as pb, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from loadtest.servers import free_port
from tests.serving_fixtures import Server, serve, tiny_repository

TEXTS = ["the time traveller", " was expounding", " a recondite matter", " to us"]


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    return tiny_repository(tmp_path_factory.mktemp("grpc-sequence"))


@pytest.fixture(scope="module")
def server(repository):
    s = Server(repository, grpc_port=free_port())
    yield s
    s.stop()


def session_steps(url: str, texts: list[str], top_k: int = 5) -> list[tuple[list[str], list[float], int]]:
    """The REST session's answers to these steps: (tokens, probabilities, total tokens) each."""
    sid = httpx.post(f"{url}/v1/models/lm/sessions").json()["session_id"]
    answers = []
    for text in texts:
        r = httpx.post(f"{url}/v1/models/lm/sessions/{sid}:step", json={"text": text, "top_k": top_k})
        assert r.status_code == 200, r.text
        answers.append(([n["token"] for n in r.json()["next"]], [n["probability"] for n in r.json()["next"]],
                        r.json()["total_tokens"]))
    httpx.delete(f"{url}/v1/models/lm/sessions/{sid}")
    return answers


def text_input(text: str) -> list[triton.InferInput]:
    t = triton.InferInput("text_input", [1], "BYTES")
    t.set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
    return [t]


class Stream:
    """One tritonclient stream; its answers in the order they came."""

    def __init__(self, grpc_port: int):
        self.client = triton.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        self.responses: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))

    def send(self, rid: str, text: str, sequence_id, start=False, end=False, **parameters):
        self.client.async_stream_infer("lm", text_input(text), request_id=rid, sequence_id=sequence_id,
                                       sequence_start=start, sequence_end=end, parameters=parameters or None)

    def answers(self, count: int) -> dict[str, tuple | str]:
        """request id -> (tokens, probabilities, total tokens), or an error's message."""
        got = {}
        for _ in range(count):
            result, error = self.responses.get(timeout=60)
            if error is not None:
                got[f"error {len(got)}"] = error.message()
                continue
            got[result.get_response().id] = (
                [t.decode() for t in result.as_numpy("next_tokens")], result.as_numpy("next_probabilities").tolist(),
                int(result.as_numpy("total_tokens")[0]))
        return got

    def close(self):
        self.client.stop_stream(cancel_requests=True)
        self.client.close()


def close_to(got: tuple, expected: tuple) -> bool:
    return got[0] == expected[0] and np.allclose(got[1], expected[1], atol=1e-6) and got[2] == expected[2]


def test_a_sequence_sent_without_waiting_answers_each_step_of_a_rest_session(server):
    expected = session_steps(server.url, TEXTS)
    stream = Stream(server.settings.grpc_port)
    try:
        for i, text in enumerate(TEXTS):  # in flight together: the stream keeps their order
            stream.send(f"s{i}", text, 42, start=i == 0, end=i == len(TEXTS) - 1)
        got = stream.answers(len(TEXTS))
        assert all(close_to(got[f"s{i}"], expected[i]) for i in range(len(TEXTS))), (got, expected)
        assert [total for _, _, total in got.values()] == sorted(total for _, _, total in got.values())
        stream.send("after", "more", 42)
        assert "begin it with sequence_start" in stream.answers(1)["error 0"]  # it ended
    finally:
        stream.close()
    assert server.deployment("lm").lm.sessions == {}


def test_interleaved_sequences_keep_their_own_states_and_a_string_id_works(server):
    a, b = TEXTS, ["we sat", " and looked", " at him"]
    expected = {"a": session_steps(server.url, a, top_k=3), "b": session_steps(server.url, b, top_k=3)}
    stream = Stream(server.settings.grpc_port)
    try:
        for i in range(len(a)):
            stream.send(f"a{i}", a[i], 7, start=i == 0, end=i == len(a) - 1, top_k=3)
            if i < len(b):
                stream.send(f"b{i}", b[i], "chat-b", start=i == 0, end=i == len(b) - 1, top_k=3)
        got = stream.answers(len(a) + len(b))
        assert all(close_to(got[f"a{i}"], expected["a"][i]) for i in range(len(a))), got
        assert all(close_to(got[f"b{i}"], expected["b"][i]) for i in range(len(b))), got
    finally:
        stream.close()


def test_32_sequences_in_flight_on_one_stream_each_keep_their_own_state(server):
    words = ["time", "machine", "traveller", "medical man", "psychologist", "very young man", "morlocks", "eloi"]
    texts = {i: [f"the {words[i % 8]}", f" and the {words[(i * 3 + 1) % 8]}", f" of {words[(i + 5) % 8]}"] for i in range(32)}
    expected = {i: session_steps(server.url, t, top_k=4) for i, t in texts.items()}
    stream = Stream(server.settings.grpc_port)
    try:
        for step in range(3):  # every sequence's step, then the next: 32 sequences in flight at once
            for i in range(32):
                stream.send(f"{i}.{step}", texts[i][step], 1000 + i, start=step == 0, end=step == 2, top_k=4)
        got = stream.answers(96)
        wrong = [rid for rid in got if not close_to(got[rid], expected[int(rid.split(".")[0])][int(rid.split(".")[1])])]
        assert len(got) == 96 and not wrong, (len(got), wrong[:5])
    finally:
        stream.close()
    assert server.deployment("lm").lm.sessions == {}


def test_a_sequence_goes_on_over_another_stream_and_start_begins_it_again(server):
    expected = session_steps(server.url, TEXTS)
    first, second = Stream(server.settings.grpc_port), Stream(server.settings.grpc_port)
    try:
        first.send("s0", TEXTS[0], 9, start=True)
        assert close_to(first.answers(1)["s0"], expected[0])
        second.send("s1", TEXTS[1], 9)
        assert close_to(second.answers(1)["s1"], expected[1])
        first.send("again", TEXTS[0], 9, start=True)  # the zero state again, not a third step
        assert close_to(first.answers(1)["again"], expected[0])
        second.send("end", "x", 9, end=True)
        second.answers(1)
    finally:
        first.close()
        second.close()
    assert server.deployment("lm").lm.sessions == {}


def one_step(port: int, i: int, text: str, start: bool, end: bool) -> tuple[str, tuple]:
    """A step of sequence 5 on a stream of its own over a new connection: the front-end's request-id
    prefix (one per process) and the answer."""
    data = text.encode()
    request = pb.ModelInferRequest(
        model_name="lm", id=f"s{i}", raw_input_contents=[struct.pack("<I", len(data)) + data],
        inputs=[pb.ModelInferRequest.InferInputTensor(name="text_input", datatype="BYTES", shape=[1])],
        parameters={"sequence_id": pb.InferParameter(int64_param=5), "sequence_start": pb.InferParameter(bool_param=start),
                    "sequence_end": pb.InferParameter(bool_param=end)})
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter([request]))
        (response,) = list(call)
        prefix = dict(call.trailing_metadata())["x-request-id"][:16]
    assert not response.error_message, response.error_message
    tokens_raw, probabilities, total = response.infer_response.raw_output_contents
    tokens, at = [], 0
    while at < len(tokens_raw):
        size = struct.unpack_from("<I", tokens_raw, at)[0]
        tokens.append(tokens_raw[at + 4: at + 4 + size].decode())
        at += 4 + size
    return prefix, (tokens, np.frombuffer(probabilities, "<f4").tolist(), int(np.frombuffer(total, "<i8")[0]))


def test_a_sequence_is_the_same_through_whichever_front_end_a_connection_reaches(repository):
    port = free_port()
    process, url = serve(repository, "--workers", "2", "--engines", "1", grpc_port=port)
    try:
        texts = TEXTS * 8
        expected, steps = session_steps(url, texts), {}  # front-end prefix -> steps it answered
        for i, text in enumerate(texts):
            last = i == len(texts) - 1 or (len(steps) == 2 and min(map(len, steps.values())) >= 3)
            prefix, got = one_step(port, i, text, start=i == 0, end=last)
            assert close_to(got, expected[i]), (i, got, expected[i])
            steps.setdefault(prefix, []).append(i)
            if last:
                break
        print(f"steps answered by each front-end: {steps}")
        assert len(steps) == 2
    finally:
        process.terminate()
        process.wait(30)


@pytest.mark.parametrize("parameters, error", [
    ({"max_tokens": 5}, "does not generate"),
    ({"top_k": 0}, "top_k must be an integer from 1 to 100"),
])
def test_a_bad_sequence_request_is_an_error_on_the_stream_and_the_stream_goes_on(server, parameters, error):
    stream = Stream(server.settings.grpc_port)
    try:
        stream.send("bad", "the", 3, start=True, **parameters)
        assert error in stream.answers(1)["error 0"]
        stream.send("unstarted", "the", 4)
        assert "no sequence '4' of model 'lm': begin it with sequence_start" in stream.answers(1)["error 0"]
        stream.send("good", "the", 3, start=True, end=True)
        assert "good" in stream.answers(1)
    finally:
        stream.close()


def test_a_stateless_call_with_a_sequence_id_is_refused_not_answered_without_its_state(server):
    ids, lengths = triton.InferInput("input_ids", [1, 2], "INT64"), triton.InferInput("lengths", [1], "INT64")
    ids.set_data_from_numpy(np.array([[2, 3]], np.int64))
    lengths.set_data_from_numpy(np.array([2], np.int64))
    client = triton.InferenceServerClient(f"127.0.0.1:{server.settings.grpc_port}")
    with pytest.raises(InferenceServerException) as refused:
        client.infer("lm", [ids, lengths], sequence_id=8, sequence_start=True)
    assert refused.value.status() == str(grpc.StatusCode.INVALID_ARGUMENT) and "keeps no state" in refused.value.message()
    body = {"parameters": {"sequence_id": 8}, "inputs": [
        {"name": "input_ids", "shape": [1, 2], "datatype": "INT64", "data": [2, 3]},
        {"name": "lengths", "shape": [1], "datatype": "INT64", "data": [2]}]}
    r = httpx.post(f"{server.url}/v2/models/lm/infer", json=body)
    assert r.status_code == 400 and "keeps no state" in r.json()["error"]
