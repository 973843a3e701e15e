"""KServe V2 over gRPC, spoken by Triton's own client (tritonclient.grpc) unchanged: the same
answers as the graph alone, the same errors as status codes, the client's deadline, the token."""
import asyncio
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import service_pb2 as pb, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from loadtest.servers import free_port
from tests.serving_fixtures import Server, graph_logits, serve, slowed, tiny_repository

IDS, LENGTHS = np.array([[2, 3, 4], [5, 6, 0]], np.int64), np.array([3, 2], np.int64)


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    return tiny_repository(tmp_path_factory.mktemp("grpc"))


@pytest.fixture(scope="module")
def server(repository):
    s = Server(repository, grpc_port=free_port(), max_queue_delay_ms=2)
    s.client = triton.InferenceServerClient(f"127.0.0.1:{s.settings.grpc_port}")
    yield s
    s.stop()


def tensors(ids=IDS, lengths=LENGTHS, names=("input_ids", "lengths"), datatype="INT64", module=triton):
    inputs = [module.InferInput(names[0], list(ids.shape), datatype), module.InferInput(names[1], list(lengths.shape), "INT64")]
    inputs[0].set_data_from_numpy(ids)
    inputs[1].set_data_from_numpy(lengths)
    return inputs


def code_of(call) -> str:
    with pytest.raises(InferenceServerException) as raised:
        call()
    return raised.value.status()


@pytest.mark.parametrize("model", ["clf", "lm"])
def test_tritons_grpc_client_gets_the_graphs_logits(server, repository, model):
    client = server.client
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(model)
    assert "binary_tensor_data" in client.get_server_metadata().extensions
    meta = client.get_model_metadata(model)
    assert [t.name for t in meta.inputs] == ["input_ids", "lengths"] and meta.outputs[0].datatype == "FP32"
    result = client.infer(model, tensors(), request_id="r7")
    assert result.get_response().id == "r7" and result.get_response().model_version == "1"
    assert np.abs(result.as_numpy("logits") - graph_logits(repository, model, IDS, LENGTHS)).max() < 1e-5


def test_concurrent_grpc_calls_each_get_their_own_rows(server, repository):
    rng = np.random.default_rng(1)
    rows = [rng.integers(2, 10, rng.integers(1, 12)) for _ in range(64)]

    async def fire():
        async with triton_aio.InferenceServerClient(f"127.0.0.1:{server.settings.grpc_port}") as client:
            return await asyncio.gather(*(client.infer("clf", tensors(row[None], np.array([len(row)]), module=triton_aio))
                                          for row in rows))

    for row, result in zip(rows, asyncio.run(fire())):
        expected = graph_logits(repository, "clf", row[None], np.array([len(row)]))
        assert np.abs(result.as_numpy("logits") - expected).max() < 1e-5


BAD = {
    "unknown model": ("nope", {}, "StatusCode.NOT_FOUND"),
    "unknown version": ("clf", {"model_version": "9"}, "StatusCode.NOT_FOUND"),
    "wrong input name": ("clf", {"inputs": tensors(names=("tokens", "lengths"))}, "StatusCode.INVALID_ARGUMENT"),
    "wrong datatype": ("clf", {"inputs": tensors(ids=IDS.astype(np.float32), datatype="FP32")}, "StatusCode.INVALID_ARGUMENT"),
    "id out of the vocabulary": ("clf", {"inputs": tensors(ids=IDS + 100)}, "StatusCode.INVALID_ARGUMENT"),
    "length past the row": ("clf", {"inputs": tensors(lengths=np.array([3, 4]))}, "StatusCode.INVALID_ARGUMENT"),
    "unknown output": ("clf", {"outputs": [triton.InferRequestedOutput("probs")]}, "StatusCode.INVALID_ARGUMENT"),
    "too many rows": ("clf", {"inputs": tensors(np.ones((300, 2), np.int64), np.full(300, 2))}, "StatusCode.RESOURCE_EXHAUSTED"),
    "a row past max_len": ("clf", {"inputs": tensors(np.full((1, 13), 3, np.int64), np.array([13]))},
                           "StatusCode.INVALID_ARGUMENT"),  # the length rule of REST: never cut, refused
}


@pytest.mark.parametrize("case", BAD)
def test_bad_calls_get_the_status_rest_would_give_and_the_server_goes_on(server, case):
    model, changes, code = BAD[case]
    assert code_of(lambda: server.client.infer(model, **({"inputs": tensors()} | changes))) == code
    assert server.client.infer("clf", tensors()).as_numpy("logits").shape == (2, 2)


def test_mismatched_raw_contents_are_invalid(server):
    """raw bytes that are not shape x INT64 (the client checks sizes itself, so a raw stub)."""
    with grpc.insecure_channel(f"127.0.0.1:{server.settings.grpc_port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        tensor = pb.ModelInferRequest.InferInputTensor
        request = pb.ModelInferRequest(model_name="clf", inputs=[tensor(name="input_ids", datatype="INT64", shape=[2, 3]),
                                                                 tensor(name="lengths", datatype="INT64", shape=[2])])
        for raw in ([IDS.tobytes()[:-8], LENGTHS.tobytes()], [IDS.tobytes()]):
            del request.raw_input_contents[:]
            request.raw_input_contents.extend(raw)
            with pytest.raises(grpc.RpcError) as raised:
                stub.ModelInfer(request)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
        int64 = pb.InferTensorContents(int64_contents=IDS.ravel().tolist())
        typed = pb.ModelInferRequest(model_name="clf", inputs=[
            tensor(name="input_ids", datatype="INT64", shape=[2, 3], contents=int64),
            tensor(name="lengths", datatype="INT64", shape=[2], contents=pb.InferTensorContents(int64_contents=[3, 2]))])
        assert np.frombuffer(stub.ModelInfer(typed).raw_output_contents[0], "<f4").shape == (4,)


def test_the_clients_deadline_is_kept_and_its_rows_never_run(repository):
    """A request whose 0.2 s deadline passes while it waits behind a 1 s call: DEADLINE_EXCEEDED
    while that call still runs, and the engine passes over its row (a request sent after it runs)."""
    s = Server(repository, grpc_port=free_port(), max_batch_size=1)
    seen = slowed(s, "clf", 1.0)
    try:
        async def scenario():
            async with triton_aio.InferenceServerClient(f"127.0.0.1:{s.settings.grpc_port}") as client:
                busy = asyncio.ensure_future(client.infer("clf", tensors(IDS[:1], LENGTHS[:1], module=triton_aio)))
                while not seen:  # the model is busy with that one
                    await asyncio.sleep(0.01)
                started = time.perf_counter()
                with pytest.raises(InferenceServerException) as raised:  # this one's deadline passes in the queue
                    await client.infer("clf", tensors(IDS[1:], LENGTHS[1:], module=triton_aio), client_timeout=0.2)
                waited, model_still_busy = time.perf_counter() - started, not busy.done()
                print(f"DEADLINE_EXCEEDED after {waited:.3f}s (deadline 0.2 s, the call ahead 1 s)")
                assert raised.value.status() == "StatusCode.DEADLINE_EXCEEDED"
                assert model_still_busy  # answered at its deadline, not when the model was free
                first = await busy
                later = await client.infer("clf", tensors(IDS[1:], LENGTHS[1:], module=triton_aio))  # behind it
                return first, later
        first, later = asyncio.run(scenario())
        assert first.as_numpy("logits").shape == later.as_numpy("logits").shape == (1, 2)
        assert seen == [3, 2]  # the expired 2-token row never ran; the later one did
    finally:
        s.stop()


def test_the_control_token_is_asked_as_metadata(repository):
    s = Server(repository, grpc_port=free_port(), control_token="s3cret", token_for_inference=True)
    client, auth = triton.InferenceServerClient(f"127.0.0.1:{s.settings.grpc_port}"), {"authorization": "Bearer s3cret"}
    try:
        assert client.is_server_live()  # health stays open
        assert code_of(lambda: client.infer("clf", tensors())) == "StatusCode.UNAUTHENTICATED"
        assert code_of(lambda: client.infer("clf", tensors(), headers={"authorization": "Bearer wrong"})) == "StatusCode.UNAUTHENTICATED"
        assert client.infer("clf", tensors(), headers=auth).as_numpy("logits").shape == (2, 2)
        assert code_of(lambda: client.get_model_repository_index()) == "StatusCode.UNAUTHENTICATED"
        client.unload_model("lm", headers=auth)
        assert code_of(lambda: client.infer("lm", tensors(), headers=auth)) == "StatusCode.NOT_FOUND"
        client.load_model("lm", headers=auth)
        states = {m.name: m.state for m in client.get_model_repository_index(headers=auth).models}
        assert states == {"clf": "READY", "lm": "READY"}
        assert code_of(lambda: client.load_model("../etc", headers=auth)) == "StatusCode.NOT_FOUND"
    finally:
        s.stop()


def test_model_control_is_closed_without_a_token(server):
    assert code_of(lambda: server.client.get_model_repository_index()) == "StatusCode.PERMISSION_DENIED"
    assert code_of(lambda: server.client.unload_model("clf")) == "StatusCode.PERMISSION_DENIED"


def test_extensions_rnnserve_does_not_have_answer_unimplemented(server):
    assert code_of(lambda: server.client.get_inference_statistics("clf")) == "StatusCode.UNIMPLEMENTED"
    assert code_of(lambda: server.client.get_system_shared_memory_status()) == "StatusCode.UNIMPLEMENTED"
    assert server.client.is_server_ready()


def test_front_end_processes_share_the_grpc_port(repository):
    """python -m serving with two front-ends: both listen on the gRPC port (SO_REUSEPORT) and
    answer right; a request id starts with its process's random prefix (new connections until
    each of the two prefixes has answered five times)."""
    port = free_port()
    process, _ = serve(repository, "--workers", "2", "--engines", "1", grpc_port=port)
    expected = graph_logits(repository, "clf", IDS, LENGTHS)
    tensor = pb.ModelInferRequest.InferInputTensor
    request = pb.ModelInferRequest(model_name="clf", raw_input_contents=[IDS.tobytes(), LENGTHS.tobytes()],
                                   inputs=[tensor(name="input_ids", datatype="INT64", shape=[2, 3]),
                                           tensor(name="lengths", datatype="INT64", shape=[2])])
    answers, deadline = {}, time.time() + 60  # request-id prefix (one per front-end process) -> logits
    try:
        while len(answers) < 2 or min(map(len, answers.values())) < 5:
            assert time.time() < deadline, {prefix: len(a) for prefix, a in answers.items()}
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:  # a connection each: the kernel spreads them
                answer, call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer.with_call(request)
            prefix = dict(call.trailing_metadata())["x-request-id"][:16]
            answers.setdefault(prefix, []).append(np.frombuffer(answer.raw_output_contents[0], "<f4").reshape(2, 2))
        print({prefix: len(a) for prefix, a in answers.items()}, "answers by front-end")
        assert len(answers) == 2
        for logits in answers.values():
            assert np.abs(np.array(logits) - expected).max() < 1e-5
    finally:
        process.terminate()
        assert process.wait(30) == 0
