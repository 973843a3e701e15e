"""KServe V2 over gRPC, spoken by Triton's own client (tritonclient.grpc) unchanged: the same
answers as the graph alone, the same errors as status codes, the client's deadline, the token."""
import asyncio
import socket
import time

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import service_pb2 as pb, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from loadtest.servers import free_port
from serving.frontend.grpc import v2 as grpc_v2
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
    assert [t.name for t in meta.inputs][:2] == ["input_ids", "lengths"] and meta.outputs[0].datatype == "FP32"
    assert [t.name for t in meta.inputs][2:] == (["text_input"] if model == "clf" else [])  # tests/test_v2_text.py
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


def test_an_oversized_message_is_refused_with_its_request_id_as_every_refusal(server):
    """A message over RNNSERVE_MAX_BODY_BYTES: RESOURCE_EXHAUSTED, its details and trailing metadata
    naming the request's id (gRPC's own refusal named none); the server goes on."""
    limit = server.settings.max_body_bytes
    with grpc.insecure_channel(f"127.0.0.1:{server.settings.grpc_port}",
                               options=[("grpc.max_send_message_length", 4 * limit)]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        tensor = pb.ModelInferRequest.InferInputTensor
        request = pb.ModelInferRequest(model_name="clf", inputs=[tensor(name="input_ids", datatype="INT64", shape=[1, 1]),
                                                                 tensor(name="lengths", datatype="INT64", shape=[1])],
                                       raw_input_contents=[b"\0" * (limit + 1), b"\0" * 8])
        with pytest.raises(grpc.RpcError) as raised:
            stub.ModelInfer(request, metadata=[("x-request-id", "big-1")])
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, raised.value.details()
        assert "(request big-1)" in raised.value.details() and f"at most {limit}" in raised.value.details()
        assert ("x-request-id", "big-1") in raised.value.trailing_metadata()
    assert server.client.infer("clf", tensors()).as_numpy("logits").shape == (2, 2)


def test_model_ready_answers_as_rest_does(server):
    """Triton's answer on both: a model or version not served is not ready (gRPC ready: false, REST
    400 saying why), a served one is."""
    assert server.client.is_model_ready("clf") and server.client.is_model_ready("clf", "1")
    assert not server.client.is_model_ready("nope") and not server.client.is_model_ready("clf", "9")
    for path in ("/v2/models/nope/ready", "/v2/models/clf/versions/9/ready"):
        r = httpx.get(server.url + path)
        assert r.status_code == 400 and "not ready" in r.json()["error"], r.text
    assert httpx.get(server.url + "/v2/models/clf/ready").json() == {"name": "clf", "ready": True}


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
    assert code_of(lambda: server.client.get_trace_settings()) == "StatusCode.UNIMPLEMENTED"
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


# Connections and limits: what a gRPC client's transport meets under its calls.

SETTINGS, PING, GOAWAY, ACK = 4, 6, 7, 1  # HTTP/2 frame types, and the ACK flag (RFC 9113)
ENHANCE_YOUR_CALM = 0xB


def frame(kind: int, flags: int, payload: bytes = b"") -> bytes:
    """An HTTP/2 frame on stream 0."""
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + bytes(4) + payload


class Http2Peer:
    """A bare HTTP/2 (h2c) connection that speaks in frames and answers only the server's SETTINGS:
    what lies under a gRPC client's calls, so that the server's pings and GOAWAY can be seen, and a
    peer that stops answering can be played."""

    def __init__(self, port: int):
        self.sock, self.buffer = socket.create_connection(("127.0.0.1", port), timeout=5), b""
        self.sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        self.send(SETTINGS, 0)

    def send(self, kind: int, flags: int, payload: bytes = b""):
        self.sock.sendall(frame(kind, flags, payload))

    def next(self, within_s: float) -> tuple[int, int, bytes] | None:
        """The next PING or GOAWAY frame (kind, flags, payload); None once the server closed the
        connection; TimeoutError if neither came within `within_s`."""
        deadline = time.monotonic() + within_s
        while True:
            while len(self.buffer) < 9 or len(self.buffer) < 9 + int.from_bytes(self.buffer[:3], "big"):
                self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
                try:
                    chunk = self.sock.recv(65536)
                except socket.timeout:
                    raise TimeoutError(f"no PING or GOAWAY within {within_s}s") from None
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    return None
                self.buffer += chunk
            length = int.from_bytes(self.buffer[:3], "big")
            kind, flags, payload = self.buffer[3], self.buffer[4], self.buffer[9:9 + length]
            self.buffer = self.buffer[9 + length:]
            if kind == SETTINGS and not flags & ACK:
                self.send(SETTINGS, ACK)
            elif kind in (PING, GOAWAY):
                return kind, flags, payload

    def close(self):
        self.sock.close()


def infer_request(ids=IDS, lengths=LENGTHS) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor
    return pb.ModelInferRequest(model_name="clf", raw_input_contents=[ids.tobytes(), lengths.tobytes()],
                                inputs=[tensor(name="input_ids", datatype="INT64", shape=list(ids.shape)),
                                        tensor(name="lengths", datatype="INT64", shape=list(lengths.shape))])


def test_calls_beyond_the_cap_get_resource_exhausted_at_once_and_the_server_goes_on(repository):
    """grpc_max_concurrent_rpcs: with two calls taking a second each at the model, the others sent
    with them are refused at once; the next call after them is served."""
    s = Server(repository, grpc_port=free_port(), grpc_max_concurrent_rpcs=2, max_batch_size=1)
    slowed(s, "clf", 0.5)
    try:
        async def scenario():
            async with grpc.aio.insecure_channel(f"127.0.0.1:{s.settings.grpc_port}") as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

                async def call():
                    started = time.perf_counter()
                    try:
                        await stub.ModelInfer(infer_request(), timeout=30)
                        return grpc.StatusCode.OK, "", time.perf_counter() - started
                    except grpc.aio.AioRpcError as e:
                        return e.code(), e.details(), time.perf_counter() - started

                answers = await asyncio.gather(*(call() for _ in range(6)))
                return answers, await call()

        answers, after = asyncio.run(scenario())
        print("6 calls at once, cap 2:", [(code.name, details, f"{took:.2f}s") for code, details, took in answers])
        codes = [code for code, _, _ in answers]
        assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, answers
        assert codes.count(grpc.StatusCode.OK) >= 2 and codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 2, answers
        refused = [took for code, _, took in answers if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
        served = [took for code, _, took in answers if code == grpc.StatusCode.OK]
        assert max(refused) < min(served)  # refused at once, not when a model call ended
        assert after[0] == grpc.StatusCode.OK, after
    finally:
        s.stop()


def test_a_quiet_connection_is_pinged_and_dropped_when_the_peer_stops_answering(repository):
    """Keepalive from the server, on a connection with no call on it: a peer that answers its pings
    keeps the connection; one that does not is dropped after grpc_keepalive_timeout_ms."""
    s = Server(repository, grpc_port=free_port(), grpc_keepalive_time_ms=300, grpc_keepalive_timeout_ms=500)
    try:
        answering, pings, started = Http2Peer(s.settings.grpc_port), 0, time.monotonic()
        while time.monotonic() - started < 2:
            kind, flags, payload = answering.next(within_s=5)
            assert kind == PING and not flags & ACK, (kind, flags, payload)
            answering.send(PING, ACK, payload)
            pings += 1
        print(f"an answering peer was pinged {pings} times in {time.monotonic() - started:.2f}s and kept")
        assert pings >= 2
        answering.close()
        silent, started = Http2Peer(s.settings.grpc_port), time.monotonic()
        assert silent.next(within_s=5)[0] == PING
        pinged = time.monotonic() - started
        while silent.next(within_s=10) is not None:  # frames until the server closes it
            pass
        closed = time.monotonic() - started
        print(f"a silent peer was pinged after {pinged:.2f}s and closed after {closed:.2f}s")
        assert closed - pinged >= 0.4  # not before the ping's timeout (500 ms)
    finally:
        s.stop()


def test_a_clients_keepalive_pings_are_answered_and_a_ping_flood_is_sent_away(repository):
    """A client behind a load balancer keeps its idle connection open with pings: each is answered,
    with no call on the connection; pings faster than grpc_min_client_ping_interval_ms get GOAWAY."""
    s = Server(repository, grpc_port=free_port(), grpc_min_client_ping_interval_ms=200)
    try:
        client = Http2Peer(s.settings.grpc_port)
        for i in range(6):
            time.sleep(0.3)
            client.send(PING, 0, i.to_bytes(8, "big"))
            assert client.next(within_s=5) == (PING, ACK, i.to_bytes(8, "big")), f"ping {i}"
        flood, frames = Http2Peer(s.settings.grpc_port), []
        flood.sock.sendall(b"".join(frame(PING, 0, i.to_bytes(8, "big")) for i in range(10)))  # at once
        while (last := flood.next(within_s=5)) is not None and last[0] != GOAWAY:
            frames.append(last)
        print(f"a flood of 10 pings: {len(frames)} answered, then {last}")
        assert last is not None and last[0] == GOAWAY, frames
        assert int.from_bytes(last[2][4:8], "big") == ENHANCE_YOUR_CALM and b"too_many_pings" in last[2][8:]
    finally:
        s.stop()


def test_a_connection_past_its_age_gets_goaway_and_the_client_reconnects_unharmed(repository, monkeypatch):
    """grpc_max_connection_age_ms: GOAWAY (NO_ERROR, max_age) once a connection is that old; its
    client's next calls go on a new connection and the call in flight is answered on the old one
    (grpc_max_connection_age_grace_ms). The server tells the connections apart by their peers."""
    peers, live = [], grpc_v2.Service.ServerLive

    async def recording(self, request, context):
        peers.append(context.peer())
        return await live(self, request, context)

    monkeypatch.setattr(grpc_v2.Service, "ServerLive", recording)
    s = Server(repository, grpc_port=free_port(), grpc_max_connection_age_ms=500,
               grpc_max_connection_age_grace_ms=5000)
    slowed(s, "clf", 1.0)
    try:
        raw, started = Http2Peer(s.settings.grpc_port), time.monotonic()
        goaway = raw.next(within_s=10)
        aged = time.monotonic() - started
        print(f"a bare connection got {goaway} after {aged:.2f}s")
        assert goaway is not None and goaway[0] == GOAWAY and aged >= 0.4
        assert int.from_bytes(goaway[2][4:8], "big") == 0 and b"max_age" in goaway[2][8:]
        with grpc.insecure_channel(f"127.0.0.1:{s.settings.grpc_port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            started, lives = time.monotonic(), 0
            slow = stub.ModelInfer.future(infer_request(), timeout=30)  # 1 s on a connection that ages at 0.5 s
            while time.monotonic() - started < 3:
                assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
                lives += 1
                time.sleep(0.05)
            answer = slow.result()
        print(f"{lives} calls in 3 s over {len(set(peers))} connections; the slow call answered")
        assert np.frombuffer(answer.raw_output_contents[0], "<f4").shape == (4,)
        assert len(set(peers)) >= 3, peers
    finally:
        s.stop()
