"""Faults and bad clients: SIGTERM drains, a model that raises, request ids, overload, slow and
oversized bodies. The server is real uvicorn on 127.0.0.1 (a subprocess where signals or its
memory are under test)."""
import asyncio
import hashlib
import json
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from loadtest.client import LoadResult, read_response
from loadtest.servers import free_port
from serving.common.settings import Settings
from serving.frontend.app import drain_on_sigterm
from tests.serving_fixtures import Server, alone, serve, tiny_repository

TEXTS = ["good film", "the plot was awful", "a", "great great good film the plot", "bad", "awful film the a"]


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    return tiny_repository(tmp_path_factory.mktemp("reliability"))


def start(repository, tmp_path, **settings) -> tuple[subprocess.Popen, str]:
    """python -m serving (one front-end) with RNNSERVE_* settings; its log in tmp_path/server.log."""
    return serve(repository, "--workers", "1", log=open(tmp_path / "server.log", "w"), **settings)


def in_flight(metrics) -> float:
    found = re.search(r'rnnserve_requests_in_flight\{model="clf"\} (\S+)', metrics.text)
    return float(found[1]) if found else 0.0


def test_sigterm_answers_every_accepted_request_then_exits(repository, tmp_path):
    """40 requests wait in a batch that closes 3 s after its first; SIGTERM comes once the server
    has taken all 40. Every one is answered, correctly; new connections are refused from then
    on; the process exits."""
    process, url = start(repository, tmp_path, max_queue_delay_ms=3000, max_batch_size=64, shutdown_grace_s=10)

    async def scenario():
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=40)) as client:
            sent = time.perf_counter()
            requests = [asyncio.create_task(client.post("/v1/models/clf:predict", json={"instances": [TEXTS[i % 6]]}))
                        for i in range(40)]
            async with httpx.AsyncClient(base_url=url) as probe:  # the other client's 40 connections are busy
                while in_flight(await probe.get("/metrics")) < 40:  # all 40 taken by the server
                    assert time.perf_counter() - sent < 10, "the server never held all 40"
                    await asyncio.sleep(0.02)
            process.send_signal(signal.SIGTERM)
            signalled = time.perf_counter()
            await asyncio.sleep(0.1)
            with pytest.raises(httpx.ConnectError):  # readiness, and all new work: refused at once
                await httpx.AsyncClient().get(f"{url}/v2/health/ready")
            responses = await asyncio.gather(*requests)
            return responses, signalled - sent, time.perf_counter() - sent

    try:
        responses, signalled_at, answered_at = asyncio.run(scenario())
        assert [r.status_code for r in responses] == [200] * 40
        assert answered_at > signalled_at  # they were in flight when the signal came
        for i, r in enumerate(responses):
            p = r.json()["predictions"][0]["probabilities"]
            assert np.abs([p["neg"], p["pos"]] - alone(repository, TEXTS[i % 6])).max() < 1e-5
        process.wait(10)
    finally:
        process.kill()
    log = (tmp_path / "server.log").read_text()
    assert "SIGTERM: not ready" in log and "Application shutdown complete" in log


def test_a_front_end_drains_once_when_a_second_sigterm_interrupts_the_first():
    """A front-end under the supervisor gets two SIGTERMs at a process-group stop (`timeout`, kill
    -TERM -PGID, a process manager): the group's, then the supervisor's. A signal handler runs
    between any two lines of the code it interrupts: here the handler is called again at every
    line run inside a first call. It must neither deadlock (starting a timer thread takes a lock
    the interrupted start may hold) nor drain twice: uvicorn's own handler runs once, after the
    serve and drain windows."""
    front = types.SimpleNamespace(draining=False, ready=True)
    stopped = []
    before = signal.signal(signal.SIGTERM, lambda sig, frame: stopped.append(time.monotonic()))
    try:
        drain_on_sigterm(front, 0.05, 0.05)
        handler = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, before)
    interrupting = []

    def second_sigterm(frame, event, arg):
        if event == "line" and not interrupting:
            interrupting.append(frame.f_code.co_name)
            handler(signal.SIGTERM, None)
            interrupting.pop()
        return second_sigterm

    def first_sigterm():
        sys.settrace(lambda frame, event, arg: second_sigterm)  # every line of the handler and what it calls
        handler(signal.SIGTERM, None)
        sys.settrace(None)

    started = time.monotonic()
    thread = threading.Thread(target=first_sigterm, daemon=True)
    thread.start()
    thread.join(5)
    assert not thread.is_alive(), "the SIGTERM handler deadlocked when interrupted by itself"
    time.sleep(0.5)
    assert front.draining and not front.ready
    assert len(stopped) == 1 and stopped[0] - started >= 0.1, stopped


def test_sigterm_exits_within_the_grace_period_when_requests_take_longer(repository, tmp_path):
    """A request waits in a batch due in 20 s when SIGTERM comes: at the end of the 1 s grace
    period it is told 503 and the process exits, long before the batch was due."""
    process, url = start(repository, tmp_path, max_queue_delay_ms=20000, shutdown_grace_s=1)
    try:
        async def scenario():
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                waiting = asyncio.create_task(client.post("/v1/models/clf:predict", json={"instances": ["good"]}))
                async with httpx.AsyncClient(base_url=url) as probe:
                    deadline = time.time() + 10
                    while in_flight(await probe.get("/metrics")) < 1:  # taken by the server
                        assert time.time() < deadline, "the server never took the request"
                        await asyncio.sleep(0.02)
                process.send_signal(signal.SIGTERM)
                signalled = time.perf_counter()
                await asyncio.to_thread(process.wait, 15)
                r = await waiting  # cut off at the end of the grace period, and told so
                assert r.status_code == 503 and "shut down" in r.json()["error"], r.text
                return time.perf_counter() - signalled
        exited_s = asyncio.run(scenario())
        print(f"exited {exited_s:.2f}s after SIGTERM (grace 1 s, the batch due in 20 s)")
        assert 1 <= exited_s < 1 + 5  # the grace period kept, then out (its own exit bounded generously)
    finally:
        process.kill()


REVIEW = " ".join(["good", "bad", "film", "plot"][i % 4] for i in range(2000))  # a long review: 2,000 words
DRAIN_S = Settings.model_fields["drain_s"].default


def outcome(response: httpx.Response) -> str:
    """The status, and the headers that tell a client what to do next: e.g. '503 close retry-after'."""
    told = [word for word, said in (("close", response.headers.get("connection") == "close"),
                                    ("retry-after", "retry-after" in response.headers)) if said]
    return " ".join([str(response.status_code), *told])


def test_sigterm_under_load_answers_every_request_the_server_read(repository, tmp_path):
    """200 long reviews over httpx's default pool of 100 connections (so half of them wait for a
    connection, most of them to reuse one), SIGTERM to python -m serving (two front-ends) once the
    first is answered. Every request gets an HTTP answer: 200, or 503 with Retry-After and
    Connection: close; none is reset. The server exits within its drain window and grace period."""
    process, url = serve(repository, "--workers", "2", log=open(tmp_path / "server.log", "w"), drain_s=DRAIN_S)

    async def scenario():
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:  # httpx's default limits
            async def one():
                try:
                    return outcome(await client.post("/v1/models/clf:predict", json={"instances": [REVIEW]}))
                except httpx.HTTPError as e:
                    return type(e).__name__
            requests = [asyncio.create_task(one()) for _ in range(200)]
            await asyncio.wait(requests, return_when=asyncio.FIRST_COMPLETED)
            process.send_signal(signal.SIGTERM)
            signalled, waiting = time.perf_counter(), sum(not r.done() for r in requests)
            outcomes = await asyncio.gather(*requests)
            await asyncio.to_thread(process.wait, DRAIN_S + 30 + 10)
            return outcomes, waiting, time.perf_counter() - signalled

    try:
        outcomes, waiting, exited_s = asyncio.run(scenario())
    finally:
        process.kill()
    counts = {o: outcomes.count(o) for o in sorted(set(outcomes))}
    print(f"SIGTERM with {waiting} of 200 unanswered: {counts}; exited {exited_s:.1f} s after it")
    assert set(outcomes) <= {"200", "200 close", "503 close retry-after"}, counts
    assert exited_s < DRAIN_S + 30  # the drain window, then the grace period (RNNSERVE_SHUTDOWN_GRACE_S)


def test_after_sigterm_readiness_fails_at_once_while_requests_are_served_for_the_window(repository, tmp_path):
    """RNNSERVE_DRAIN_SERVE_S: from SIGTERM readiness is 503 (gRPC ServerReady false, and a
    model's readiness 400 and false, as for a server not ready) while predict is still answered
    200, each answer closing its connection, for the window; then 503 for RNNSERVE_DRAIN_S; then
    the port closes."""
    import tritonclient.grpc as triton  # a user's gRPC client, unchanged
    grpc_port = free_port()
    process, url = serve(repository, "--workers", "1", log=open(tmp_path / "server.log", "w"), drain_serve_s=2,
                         drain_s=2, grpc_port=grpc_port)  # the port closes 4 s after SIGTERM: past the probes
    grpc = triton.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    try:
        assert grpc.is_server_ready()
        process.send_signal(signal.SIGTERM)
        signalled = time.perf_counter()
        time.sleep(0.2)
        seen = []  # (seconds after SIGTERM, readiness, predict, gRPC ServerReady)
        while time.perf_counter() - signalled < 2.8:
            with httpx.Client(base_url=url, timeout=5) as fresh:  # a new connection for each, as a balancer's
                ready = outcome(fresh.get("/v2/health/ready"))
            with httpx.Client(base_url=url, timeout=5) as fresh:
                model_ready = outcome(fresh.get("/v2/models/clf/ready"))
            with httpx.Client(base_url=url, timeout=5) as fresh:
                predicted = outcome(fresh.post("/v1/models/clf:predict", json={"instances": ["good"]}))
            seen.append((round(time.perf_counter() - signalled, 2), ready, predicted, grpc.is_server_ready(),
                         model_ready, grpc.is_model_ready("clf")))
            time.sleep(0.1)
        process.wait(15)
    finally:
        grpc.close()
        process.kill()
    print(f"after SIGTERM (s, readiness, predict, gRPC ready, model ready, gRPC model ready): {seen}")
    serving = [row for row in seen if row[0] < 1.9]
    refusing = [row for row in seen if row[0] > 2.1]
    assert serving and all(row[1:] == ("503 close retry-after", "200 close", False, "400 close", False)
                           for row in serving), seen
    assert all(row[4:] == ("400 close", False) for row in seen), seen
    assert refusing and all(row[1:3] == ("503 close retry-after",) * 2 for row in refusing), seen
    assert "SIGTERM: not ready; serving on for 2s" in (tmp_path / "server.log").read_text()


def test_after_the_drain_window_new_connections_are_refused_at_once(repository, tmp_path):
    """A request held in its batch for 4 s outlasts a 1 s drain window. New connections, one after
    another: answered (readiness 503, Connection: close) within the window; after it refused at
    once, not accepted by the kernel and reset when the last process lets go of the port. One
    opened in the instant the port closes may be closed unanswered, at once (its request unread);
    the held request is answered."""
    process, url = serve(repository, "--workers", "2", log=open(tmp_path / "server.log", "w"), drain_s=1,
                         max_queue_delay_ms=4000)

    async def probe(signalled: float) -> tuple[float, float, str]:
        """A readiness request on a new connection: (sent, done) in seconds after SIGTERM, and what came back."""
        sent = time.perf_counter() - signalled
        async with httpx.AsyncClient(base_url=url, timeout=2) as fresh:
            try:
                what = outcome(await fresh.get("/v2/health/ready"))
            except httpx.HTTPError as e:
                what = type(e).__name__
        return sent, time.perf_counter() - signalled, what

    async def scenario():
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            held = asyncio.create_task(client.post("/v1/models/clf:predict", json={"instances": ["good"]}))
            async with httpx.AsyncClient(base_url=url) as metrics:
                while in_flight(await metrics.get("/metrics")) < 1:
                    await asyncio.sleep(0.02)
            process.send_signal(signal.SIGTERM)
            signalled, seen = time.perf_counter(), []
            while not seen or seen[-1][2] != "ConnectError":
                seen.append(await probe(signalled))
                await asyncio.sleep(0.05)
            still_held = not held.done()
            return seen, still_held, outcome(await held)

    try:
        seen, still_held, held = asyncio.run(scenario())
        process.wait(30)
    finally:
        process.kill()
    shown = [(round(sent, 2), round(done, 2), what) for sent, done, what in seen]
    print(f"new connections after SIGTERM (sent s, done s, outcome): {shown}; the held request: {held}")
    answered = [what for _, _, what in seen[:-1] if what[0].isdigit()]
    unanswered = [(sent, done, what) for sent, done, what in seen[:-1] if not what[0].isdigit()]
    draining = "503 close retry-after"  # readiness's 503 says when to retry, as every 503 does
    assert set(answered) <= {"200", draining} and draining in answered, seen  # ready, then draining
    assert len(unanswered) <= 1 and all(done - sent < 0.5 for sent, done, _ in unanswered), seen  # as the port closed
    assert seen[-1][1] < 1 + 2 and still_held and held == "200 close", (seen, still_held, held)  # refused at once


def faulty_repository(repository, folder):
    """clf whose graph looks its first token up in a 5-row table: ids 5.. (film, good, great,
    plot, the) make ONNX Runtime raise; the warm-up's ids (1) pass."""
    shutil.copytree(repository / "clf", folder / "faulty")
    version = folder / "faulty" / "1"
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    lengths = helper.make_tensor_value_info("lengths", TensorProto.INT64, ["batch"])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])
    table = helper.make_tensor("table", TensorProto.FLOAT, [5, 2], np.arange(10, dtype=np.float32).tolist())
    zero = helper.make_tensor("zero", TensorProto.INT64, [], [0])
    nodes = [helper.make_node("Gather", ["input_ids", "zero"], ["first"], axis=1),
             helper.make_node("Gather", ["table", "first"], ["logits"], axis=0)]
    graph = helper.make_graph(nodes, "faulty", [ids, lengths], [logits], initializer=[table, zero])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), version / "model.onnx")
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["graphs"]["fp32"]["sha256"] = hashlib.sha256((version / "model.onnx").read_bytes()).hexdigest()
    (version / "manifest.json").write_text(json.dumps(manifest))
    shutil.copytree(repository / "clf", folder / "clf")
    return folder


def test_a_model_that_raises_fails_only_its_batch_with_a_500_and_a_request_id(repository, tmp_path, caplog):
    s = Server(faulty_repository(repository, tmp_path / "repo"), max_batch_size=1)  # a batch per request
    try:
        r = httpx.post(f"{s.url}/v1/models/faulty:predict", json={"instances": ["good"]},
                       headers={"X-Request-ID": "poisoned-1"})
        assert r.status_code == 500 and r.headers["x-request-id"] == "poisoned-1"
        assert r.json()["request_id"] == "poisoned-1" and "inference failed" in r.json()["error"]
        assert any(getattr(rec, "request_id", None) == "poisoned-1" and rec.levelname == "ERROR" for rec in caplog.records)
        assert httpx.post(f"{s.url}/v1/models/faulty:predict", json={"instances": ["a bad"]}).status_code == 200

        async def mixed():  # bad ones among good ones, on the same model and on another
            async with httpx.AsyncClient(base_url=s.url, timeout=30) as client:
                def post(model, text):
                    return client.post(f"/v1/models/{model}:predict", json={"instances": [text]})
                return await asyncio.gather(*(post("faulty", "the" if i % 10 == 0 else "a") for i in range(100)),
                                            *(post("clf", t) for t in TEXTS * 5))
        responses = asyncio.run(mixed())
        faulty, clf = responses[:100], responses[100:]
        assert [r.status_code for r in faulty] == [500 if i % 10 == 0 else 200 for i in range(100)]
        assert all(r.json()["predictions"][0]["label"] == "pos" for r in faulty[1::10])  # table row 2: [4, 5]
        assert [r.status_code for r in clf] == [200] * 30  # the other model never noticed
        assert httpx.post(f"{s.url}/v1/models/faulty:predict", json={"instances": ["a"]}).status_code == 200
    finally:
        s.stop()


def test_request_ids_are_taken_or_made_and_always_returned(repository):
    s = Server(repository)
    try:
        given = httpx.post(f"{s.url}/v1/models/clf:predict", json={"instances": ["good"]}, headers={"X-Request-ID": "abc-123"})
        assert given.headers["x-request-id"] == "abc-123"
        made = httpx.get(f"{s.url}/v2/health/live").headers["x-request-id"]
        assert len(made) == 32 and int(made, 16) >= 0
        odd = httpx.get(f"{s.url}/v2/health/live", headers={"X-Request-ID": "x" * 500}).headers["x-request-id"]
        assert len(odd) == 32  # not echoed: too long, or characters a log should not carry
        error = httpx.post(f"{s.url}/v1/models/nope:predict", json={"instances": ["good"]}, headers={"X-Request-ID": "e-1"})
        assert error.status_code == 404 and error.json()["request_id"] == "e-1" == error.headers["x-request-id"]
    finally:
        s.stop()


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def test_overload_answers_503_fast_and_memory_stays_bounded(repository, tmp_path):
    """300 connections send at once, four times, to a queue of 8: the rest get 503 without
    waiting for the queue (the median refusal comes before the slowest acceptance); accepted
    requests are answered right and within the deadline; the server's memory does not grow. Raw
    sockets with the request bytes ready, so the clients are not what is slow."""
    process, url = start(repository, tmp_path, max_queue_size=8, max_batch_size=1, request_timeout_s=10)
    body = json.dumps({"instances": ["good film"] * 128}).encode()  # 128 calls: about 15 ms of work
    request = (b"POST /v1/models/clf:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    async def one(reader, writer):
        sent = time.perf_counter()
        writer.write(request)
        status, answer, _ = await read_response(reader, sent, LoadResult())
        return status, time.perf_counter() - sent, answer

    async def scenario():
        port = int(url.rsplit(":", 1)[1])
        connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(300)]
        await asyncio.gather(*(one(*c) for c in connections))  # warm
        before = rss_mb(process.pid)
        results = [x for _ in range(4) for x in await asyncio.gather(*(one(*c) for c in connections))]
        for _, writer in connections:
            writer.close()
        return results, before, rss_mb(process.pid)

    try:
        results, before, after = asyncio.run(scenario())
        statuses = [status for status, _, _ in results]
        assert set(statuses) == {200, 503} and statuses.count(503) > len(statuses) // 2, \
            {code: statuses.count(code) for code in set(statuses)}
        rejected = sorted(t for status, t, _ in results if status == 503)
        accepted = [(t, answer) for status, t, answer in results if status == 200]
        median_accepted = sorted(t for t, _ in accepted)[len(accepted) // 2]
        print(f"{len(rejected)} rejected, median {rejected[len(rejected) // 2] * 1000:.0f} ms; {len(accepted)} "
              f"accepted, median {median_accepted * 1000:.0f} ms, slowest {max(t for t, _ in accepted):.2f} s; "
              f"RSS {before:.0f} -> {after:.0f} MB")
        # a refusal does not wait for the work in the queue, as the slowest acceptance did
        assert rejected[len(rejected) // 2] < max(t for t, _ in accepted)
        assert max(t for t, _ in accepted) < 10  # within the deadline: no 504s either
        expected = alone(repository, "good film")
        for _, answer in accepted:
            p = json.loads(answer)["predictions"][-1]["probabilities"]
            assert np.abs([p["neg"], p["pos"]] - expected).max() < 1e-5
        assert after - before < 30, (before, after)  # MB, over 1,200 requests
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(15)


def test_the_least_max_connections_serves_one_connection_at_a_time(repository, tmp_path):
    """RNNSERVE_MAX_CONNECTIONS=1, the least it accepts: the one open connection is served (uvicorn
    counts the connection asking among its limit, so it once refused every request); a second one
    open at the same time is refused with 503."""
    process, url = start(repository, tmp_path, max_connections=1)
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.post("/v1/models/clf:predict", json={"instances": ["good"]}).status_code == 200
            assert client.get("/v2/health/ready").status_code == 200  # the same connection, again
            with httpx.Client(base_url=url, timeout=30) as other:  # while the first is still open
                assert other.get("/v2/health/live").status_code == 503
    finally:
        process.kill()


def test_slow_bodies_time_out_alone_and_oversized_bodies_are_refused(repository):
    """50 connections send headers and a little body, then nothing: meanwhile everyone else is
    served as usual, while the 50 are still unanswered; each then gets 408 at the body timeout."""
    s = Server(repository, body_timeout_s=3.0, max_body_bytes=10_000)
    port = int(s.url.rsplit(":", 1)[1])
    slow = []
    try:
        for _ in range(50):  # slowloris: headers, a little body, then silence
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"POST /v1/models/clf:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"instances\": [")
            slow.append(sock)
        started = time.perf_counter()
        for text in TEXTS:  # meanwhile everyone else is served as usual
            r = httpx.post(f"{s.url}/v1/models/clf:predict", json={"instances": [text]})
            assert r.status_code == 200
        served_s = time.perf_counter() - started
        answered_slow = select.select(slow, [], [], 0)[0]
        print(f"{len(TEXTS)} requests served in {served_s:.3f}s beside {len(slow)} slow bodies "
              f"({len(answered_slow)} of them answered by then)")
        assert answered_slow == []  # served before the slow bodies timed out
        for sock in slow:
            sock.settimeout(5)
            head = sock.recv(4096)
            assert head.startswith(b"HTTP/1.1 408"), head[:100]
            sock.close()
        chunks = (b"x" * 1000 for _ in range(20))  # chunked, no Content-Length: counted as it arrives
        r = httpx.post(f"{s.url}/v1/models/clf:predict", content=chunks, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "body over" in r.json()["error"]
        r = httpx.post(f"{s.url}/v1/models/clf:predict", content=b"x" * 20_000)
        assert r.status_code == 413
        assert httpx.post(f"{s.url}/v1/models/clf:predict", json={"instances": ["good"]}).status_code == 200
    finally:
        for sock in slow:
            sock.close()
        s.stop()


def test_text_length_is_limited(repository):
    s = Server(repository, max_text_chars=100)
    try:
        for path, body in [("/v1/models/clf:predict", {"instances": ["good", "a" * 101]}),
                           ("/v1/models/lm:generate", {"prompt": "t" * 101})]:
            r = httpx.post(f"{s.url}{path}", json=body)
            assert r.status_code == 413 and "at most 100" in r.json()["error"], r.text
        assert httpx.post(f"{s.url}/v1/models/clf:predict", json={"instances": ["a" * 100]}).status_code == 200
    finally:
        s.stop()
