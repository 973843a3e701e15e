"""Lifecycle: several workers following model-control calls, batchers that stop, deadlines on
generation and sessions, stream holds, retiring that fails, files left behind, and the metrics
that count every answer. Each test here failed before its fix."""
import collections
import asyncio
import gc
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from loadtest.servers import free_port
from serving.common import heap, metrics
from serving.frontend.app import create_app
from tests.serving_fixtures import (FRONT_END, Server, alone, by_front_end, client_of, sample, serve, slowed_steps,
                                    tiny_repository, wait_ready)


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    return tiny_repository(tmp_path_factory.mktemp("lifecycle"))


def test_every_worker_serves_what_the_last_control_calls_asked_for(tmp_path):
    """2 front-ends and 2 engines, models g and h with two versions each: eight rounds of "load g
    version X, then load h version X", the two calls of a round on different front-ends (each
    call's answer says which). Then every answer of each front-end comes from the versions the
    last calls asked for. (With per-worker sessions and a control file, 25 of 80 answers once came
    from g's previous version.)"""
    from export.repository import export_run
    from tests.test_export import make_run
    repository = tmp_path / "repo"
    for name in ("g", "h"):
        for seed in (0, 1):
            export_run(make_run(tmp_path / "runs" / f"{name}{seed}", "classifier", "gru", seed=seed), repository,
                       name=name, cases=2)
    server, url = serve(repository, "--workers", "2", "--engines", "2", control="open")
    try:
        front_ends = sorted(by_front_end(url, "/v2/health/ready", answers_each=1))  # both take connections
        assert set(front_ends) <= {str(pid) for pid, _ in children(server.pid)}
        with client_of(url, front_ends[0]) as first, client_of(url, front_ends[1]) as second:
            callers = [(first, front_ends[0]), (second, front_ends[1])]
            for round_ in range(8):
                version = 1 if round_ % 2 else 2  # ends on 1: not the latest, which each worker starts on
                for name, (client, pid) in zip(("g", "h"), callers if round_ % 2 else callers[::-1]):
                    r = client.post(f"/v2/repository/models/{name}/load",
                                    json={"parameters": {"version": str(version)}})
                    assert r.status_code == 200 and r.headers[FRONT_END] == pid, r.text
        served = {name: {pid: {r.json()["versions"][0] for r in answers}
                         for pid, answers in by_front_end(url, f"/v2/models/{name}", answers_each=20).items()}
                  for name in ("g", "h")}
        print("versions served by front-end (20 answers or more each):", served)
        assert served == {"g": {pid: {"1"} for pid in front_ends}, "h": {pid: {"1"} for pid in front_ends}}
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)


def test_keep_alive_connections_opened_at_once_are_spread_over_the_front_ends(repository):
    """32 clients connect at once and keep their connections (a gateway's pool, a load test): each
    of the two front-ends serves a fair share. On one listening socket shared by the front-ends,
    the one awake first took the whole burst (all 16 of 16 in 7 of 12 tries): one core served
    while the other idled. Each front-end now has a socket of its own on the port (SO_REUSEPORT);
    fewer than 6 of 32 on either happens with probability 1e-4 under the kernel's hashing."""
    server, url = serve(repository, "--workers", "2", "--engines", "1")
    port = int(url.rsplit(":", 1)[1])
    by_front_end(url, "/v2/health/ready", answers_each=1)  # both listen (ready answers once the first does)

    async def connect() -> str:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /v2/health/ready HTTP/1.1\r\nhost: test\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(0.5)  # every connection open at once, none closed before the others are made
        writer.close()
        return re.search(rb"x-rnnserve-frontend: (\d+)", head)[1].decode()

    async def burst() -> list[str]:
        return await asyncio.gather(*(connect() for _ in range(32)))

    try:
        by_pid = collections.Counter(asyncio.run(burst()))
        print("connections per front-end:", dict(by_pid))
        assert len(by_pid) == 2 and min(by_pid.values()) >= 6, by_pid
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)


@pytest.mark.parametrize("shared", [False, True], ids=["plain", "SO_REUSEPORT"])
def test_a_port_in_use_is_refused_at_start_saying_so(repository, shared):
    """Another process listens on the port, even one that would share it (SO_REUSEPORT, as another
    rnnserve left running does): python -m serving with several front-ends exits at once with a
    message naming the address, not joining it."""
    taken = socket.socket()
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(shared))
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        done = subprocess.run([sys.executable, "-m", "serving", "--repository", str(repository), "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "2", "--engines", "1"],
                              capture_output=True, text=True, timeout=120)
    finally:
        taken.close()
    assert done.returncode != 0 and f"cannot listen on 127.0.0.1:{port}" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]


def test_an_engine_that_dies_answers_its_requests_at_once_and_is_restarted(repository, tmp_path):
    """Ten requests wait in the engine (its batch waits 5 s for company; /metrics counts them) when
    it is killed: each gets 503 at once, not when the batch or their deadline was due; the engine
    is restarted and serves again."""
    log = open(tmp_path / "server.log", "w+")
    server, url = serve(repository, "--workers", "1", "--engines", "1", log=log, max_queue_delay_ms=5000,
                        request_timeout_s=20)
    try:
        engine = next(p for p in children(server.pid) if "serving.engine" in p[1])[0]

        async def scenario():
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                waiting = [asyncio.create_task(client.post("/v1/models/clf:predict", json={"instances": ["good"]}))
                           for _ in range(10)]
                deadline = time.time() + 30
                while sample((await client.get("/metrics")).text, 'rnnserve_queue_depth{model="clf"}') < 10:
                    assert time.time() < deadline, "the ten never reached the engine"
                    await asyncio.sleep(0.02)
                os.kill(engine, signal.SIGKILL)
                killed = time.perf_counter()
                responses = await asyncio.gather(*waiting)
                return responses, time.perf_counter() - killed

        responses, answered_s = asyncio.run(scenario())
        print(f"answered {answered_s:.3f}s after the kill (their batch was due 5 s after the first, the deadline 20 s)")
        assert [r.status_code for r in responses] == [503] * 10 and answered_s < 4, answered_s
        assert all("retry" in r.json()["error"] and r.headers["retry-after"] == "1" for r in responses)
        wait_ready(url)
        assert httpx.post(f"{url}/v1/models/clf:predict", json={"instances": ["good"]}, timeout=30).status_code == 200
        log.seek(0)
        assert "exited with -9: restarting it" in log.read()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)


def test_requests_of_an_engine_that_dies_are_answered_by_another_serving_the_model(repository, tmp_path):
    """Two engines; requests wait in both (their batches wait 2 s for company) when engine 0 is
    killed: those it held are sent to engine 1 at once, and every request is answered 200 with
    the model's own answer, not 503."""
    log = open(tmp_path / "server.log", "w+")
    server, url = serve(repository, "--workers", "1", "--engines", "2", log=log, max_queue_delay_ms=2000,
                        request_timeout_s=20)
    try:
        engine = next(pid for pid, command in children(server.pid) if "--index 0" in command)

        async def scenario():
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                waiting = [asyncio.create_task(client.post("/v1/models/clf:predict", json={"instances": ["good film"]}))
                           for _ in range(10)]
                await asyncio.sleep(0.5)  # sent, and waiting in their engines' queues for 1.5 s more
                os.kill(engine, signal.SIGKILL)
                return await asyncio.gather(*waiting)

        responses = asyncio.run(scenario())
        assert [r.status_code for r in responses] == [200] * 10, [r.text for r in responses]
        expected = alone(repository, "good film")
        for r in responses:
            assert np.abs(np.array(list(r.json()["predictions"][0]["probabilities"].values())) - expected).max() < 1e-5
        log.seek(0)
        moved = [int(line.split("is gone with ")[1].split()[0]) for line in log if "engine 0" in line and "is gone" in line]
        assert moved and moved[0] > 0, moved  # engine 0 held some of them when it died
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of a process's children."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[1] == str(pid):
                found.append((int(stat.parent.name), (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()))
        except OSError:
            pass
    return found


def test_generation_and_session_steps_keep_the_request_deadline(repository):
    """Each step of the language model takes 2 s; the deadline is 0.5 s: the generation (streamed
    or not) and the session step are told so at their deadline, while the step they wait on still
    runs, and the engine drops them."""
    s = Server(repository, request_timeout_s=0.5)
    runner = s.deployment("lm").runner
    advance, slow_steps_done = runner.advance, []

    def slow(*a):
        time.sleep(2)
        slow_steps_done.append(1)
        return advance(*a)

    def timed_504(path, body) -> float:
        done, started = len(slow_steps_done), time.perf_counter()
        r = httpx.post(f"{s.url}{path}", json=body, timeout=10)
        waited = time.perf_counter() - started
        print(f"{path}: {r.status_code} after {waited:.3f}s (deadline 0.5 s, a step 2 s)")
        assert r.status_code == 504 and "deadline" in r.json()["error"], r.text
        assert len(slow_steps_done) == done, "answered only once the step it waited on was over"
        return waited

    def wait_for(condition):
        deadline = time.time() + 10
        while not condition() and time.time() < deadline:
            time.sleep(0.05)
        assert condition()

    runner.advance = slow
    try:
        for stream in (False, True):
            timed_504("/v1/models/lm:generate", {"prompt": "the", "max_new_tokens": 3, "stream": stream})
        runner.advance = advance
        lm = s.deployment("lm").lm
        wait_for(lambda: lm.streams == {})  # the engine dropped both generations
        wait_for(lambda: slow_steps_done)  # out of the slow step it was in
        sid = httpx.post(f"{s.url}/v1/models/lm/sessions").json()["session_id"]
        runner.advance = slow
        timed_504(f"/v1/models/lm/sessions/{sid}:step", {"text": "the"})
        wait_for(lambda: not any(x.steps for x in lm.sessions.values()))
    finally:
        s.stop()


def raw_post(url: str, path: str, body: bytes) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (path.encode(), len(body), body))
    return sock


def test_a_session_step_whose_client_left_is_dropped_before_it_runs(repository):
    """While the engine is busy with another session's step, a client sends its step and leaves:
    its step never runs, so its session has read only what came after. The busy step is held until
    the front-end has counted the client as gone (499) and told the engine, however slow the box."""
    s = Server(repository)
    runner = s.deployment("lm").runner
    advance, inside, release = runner.advance, threading.Event(), threading.Event()

    def held(*a):
        inside.set()
        release.wait(30)
        return advance(*a)

    def gone() -> float:
        return sum(sample.value for metric in metrics.REQUESTS.collect() for sample in metric.samples
                   if sample.name.endswith("_total") and sample.labels["model"] == "lm"
                   and sample.labels["status"] == "499")

    try:
        busy, sid = (httpx.post(f"{s.url}/v1/models/lm/sessions").json()["session_id"] for _ in range(2))
        runner.advance = held
        other = threading.Thread(target=httpx.post, args=(f"{s.url}/v1/models/lm/sessions/{busy}:step",),
                                 kwargs={"json": {"text": "a"}, "timeout": 60})
        other.start()
        assert inside.wait(30), "the other session's step never ran"
        left_before = gone()
        sock = raw_post(s.url, f"/v1/models/lm/sessions/{sid}:step", b'{"text": "the time"}')
        time.sleep(0.3)  # read by the front-end and sent to the engine, which is held
        sock.close()
        deadline = time.monotonic() + 30
        while gone() == left_before and time.monotonic() < deadline:
            time.sleep(0.02)
        assert gone() == left_before + 1, "the front-end never counted the client that left"
        time.sleep(0.1)  # the engine's Cancel is on its socket before the held step ends
        runner.advance = advance
        release.set()
        other.join()
        r = httpx.post(f"{s.url}/v1/models/lm/sessions/{sid}:step", json={"text": "a"}, timeout=10)
        assert r.status_code == 200 and r.json()["total_tokens"] == 1, r.text
    finally:
        release.set()
        runner.advance = advance
        s.stop()


def test_a_stream_whose_client_left_before_it_started_releases_its_hold(repository):
    """The app called directly, as an ASGI 2.4 server calls it, with a client that is gone by the
    time the response would start (send raises OSError): the stream never runs, and the engine's
    generation is still ended (it would otherwise run to max_new_tokens)."""
    body = b'{"prompt": "the", "max_new_tokens": 1000, "stream": true}'
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/models/lm:generate", "raw_path": b"/v1/models/lm:generate",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 9), "server": ("127.0.0.1", 80),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}

    s = Server(repository)  # its engine; a front-end of our own below
    slowed_steps(s, "lm", 0.005)

    async def scenario():
        app = create_app(s.settings)
        async with app.app.router.lifespan_context(app.app):
            while not app.front.engines.ready:
                await asyncio.sleep(0.01)
            messages = [{"type": "http.request", "body": body, "more_body": False}]
            sent = []

            async def receive():
                return messages.pop(0) if messages else {"type": "http.disconnect"}

            async def send(message):
                sent.append(message["type"])
                if message["type"] == "http.response.start":
                    raise OSError("the client has gone")

            try:
                await app(scope, receive, send)
            except Exception:  # the disconnect, as the server would see it
                pass
            await asyncio.sleep(0.3)  # the cancel reaches the engine
            return len(s.deployment("lm").lm.streams), sent

    result = {}  # in a thread: the lifespan installs a SIGTERM handler only on the main thread
    thread = threading.Thread(target=lambda: result.update(answer=asyncio.run(scenario())))
    thread.start()
    thread.join(30)
    s.stop()
    streams, sent = result["answer"]
    assert sent == ["http.response.start"]  # the stream never ran
    assert streams == 0


def test_a_failing_release_is_logged_and_never_stops_the_engine(repository, caplog, monkeypatch):
    from serving.engine.deployments import Deployment

    def broken(self):
        raise RuntimeError("release broke")

    s = Server(repository, control="open")
    monkeypatch.setattr(Deployment, "release", broken)
    try:
        assert httpx.post(f"{s.url}/v2/repository/models/clf/load").status_code == 200  # retires the old one
        deadline = time.time() + 5
        while s.engine.deployments.retiring and time.time() < deadline:
            time.sleep(0.05)
        assert s.engine.deployments.retiring == [] and s.engine_thread.is_alive()
        assert httpx.post(f"{s.url}/v1/models/clf:predict", json={"instances": ["good"]}).status_code == 200
        assert any("releasing clf v1 failed" in r.getMessage() for r in caplog.records)
    finally:
        started = time.perf_counter()
        s.stop()
        stopped_s = time.perf_counter() - started
        print(f"stopped in {stopped_s:.3f}s")
        assert stopped_s < 8 and not s.engine_thread.is_alive()  # not the 10 s join timeout


@pytest.mark.parametrize("workers", [1, 2])
def test_the_server_removes_the_folders_it_created_when_it_exits(repository, workers):
    """SIGTERM: a clean exit (0) and no folder left behind, with one front-end (in the server's own
    process: before, uvicorn's re-raised SIGTERM killed it before its clean-up) or several."""
    scratch = Path(tempfile.mkdtemp(prefix="t", dir="/tmp"))  # short: the engines' socket paths must fit AF_UNIX's 107 bytes
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    server = subprocess.Popen([sys.executable, "-m", "serving", "--repository", str(repository), "--host", "127.0.0.1",
                               "--port", str(port), "--workers", str(workers)], stderr=subprocess.DEVNULL,
                              env=env | {"TMPDIR": str(scratch), "RNNSERVE_DRAIN_SERVE_S": "0", "RNNSERVE_DRAIN_S": "0"})
    ours = lambda: sorted(p.name.rsplit("-", 1)[0] for p in scratch.glob("rnnserve-*"))  # (ONNX Runtime writes .ses)
    try:
        wait_ready(f"http://127.0.0.1:{port}")
        assert ours() == ["rnnserve"]  # the engines' sockets and the metrics files, while it runs
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(30)
    assert code == 0 and ours() == []
    shutil.rmtree(scratch)  # what ONNX Runtime left there


def test_a_sigterm_to_the_servers_process_group_drains_before_the_engines_stop(repository, tmp_path):
    """SIGTERM to the whole process group (Ctrl-C's way, `timeout`'s, a process manager's): the
    server serves on through its drain window and then stops its engines. Before, the engines got
    the signal too, stopped at once and were restarted mid-drain ("exited with 0: restarting it"),
    the requests meanwhile answered 503."""
    log = open(tmp_path / "server.log", "w+")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "serving", "--repository", str(repository), "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1", "--engines", "1"], stderr=log,
                              env=os.environ | {"RNNSERVE_DRAIN_SERVE_S": "2", "RNNSERVE_DRAIN_S": "0"},
                              start_new_session=True)  # a group of its own, to signal as a whole
    signalled = False
    try:
        wait_ready(f"http://127.0.0.1:{port}")
        os.killpg(server.pid, signal.SIGTERM)
        signalled = True
        statuses = []
        deadline = time.time() + 1.5  # inside the 2 s serving window
        while time.time() < deadline:
            statuses.append(httpx.post(f"http://127.0.0.1:{port}/v1/models/clf:predict",
                                       json={"instances": ["good film"]}, timeout=10).status_code)
        assert statuses and set(statuses) == {200}, statuses
    finally:
        if not signalled:
            server.terminate()
        code = server.wait(30)
    log.seek(0)
    assert code == 0 and "exited with" not in log.read()


def test_model_control_is_closed_unless_a_token_or_open_is_set(repository):
    s = Server(repository)
    try:
        for path in ("/v2/repository/index", "/v2/repository/models/clf/load", "/v2/repository/models/clf/unload"):
            r = httpx.post(s.url + path)
            assert r.status_code == 403 and "RNNSERVE_CONTROL_TOKEN" in r.json()["error"], r.text
        assert "clf" in s.engine.deployments.current
    finally:
        s.stop()
    s = Server(repository, control="open")
    try:
        assert httpx.post(f"{s.url}/v2/repository/index").status_code == 200
    finally:
        s.stop()


def counts(server) -> dict[tuple[str, str, str], float]:
    """Every rnnserve_requests_total series, and the generation histograms' counts."""
    text = httpx.get(f"{server.url}/metrics").text
    found = re.findall(r'rnnserve_requests_total\{endpoint="([^"]+)",model="([^"]+)",status="([^"]+)",version="[^"]+"\} (\S+)',
                       text)
    series = collections.Counter()
    for endpoint, model, status, n in found:  # every version's together
        series[model, endpoint, status] += float(n)
    for name, pattern in (("ttft", r'rnnserve_time_to_first_token_seconds_count\{model="lm",version="[^"]+"\} (\S+)'),
                          ("stream", r'rnnserve_request_latency_seconds_count\{endpoint="generate_stream",model="lm",version="[^"]+"\} (\S+)')):
        series[name, "", ""] = sum(float(n) for n in re.findall(pattern, text))
    return series


def test_metrics_count_every_answer_once(repository):
    """Good, bad, unknown-model, shed and streamed requests: each counted once, under its status."""
    s = Server(repository, max_queue_size=1, max_batch_size=1, session_idle_s=0.2)
    try:
        runner = s.deployment("clf").runner
        run_call = runner.run_call
        runner.run_call = lambda ids, lengths: time.sleep(0.3) or run_call(ids, lengths)  # a slow model: the queue fills
        before = counts(s)
        post = lambda path, body: httpx.post(s.url + path, json=body, timeout=30)
        assert post("/v1/models/clf:predict", {"instances": ["good film"]}).status_code == 200
        assert post("/v1/models/clf:predict", {"instances": []}).status_code == 400
        assert post("/v1/models/nope:predict", {"instances": ["a"]}).status_code == 404
        assert post("/v2/models/clf/infer", {"inputs": []}).status_code == 400
        assert post("/v1/models/lm:generate", {"prompt": "the", "max_new_tokens": 5, "stream": True}).status_code == 200
        assert post("/v1/models/lm:generate", {"prompt": "the", "max_new_tokens": 5}).status_code == 200

        async def overload():  # one running, one queued, the rest shed with 503
            async with httpx.AsyncClient(base_url=s.url, timeout=30) as client:
                return await asyncio.gather(*(client.post("/v1/models/clf:predict", json={"instances": ["a"]})
                                              for _ in range(20)))
        statuses = [r.status_code for r in asyncio.run(overload())]
        shed = statuses.count(503)
        assert shed > 0 and statuses.count(200) + shed == 20
        live = 'rnnserve_live_sessions{model="lm"}'  # the gauge is this process's: other in-process servers' too
        alive = sample(httpx.get(f"{s.url}/metrics").text, live)
        sid = post("/v1/models/lm/sessions", {}).json()["session_id"]
        assert sample(httpx.get(f"{s.url}/metrics").text, live) == alive + 1
        time.sleep(0.3 + s.app.state.settings.control_sync_s)  # idle past session_idle_s: the watcher expires it
        assert sample(httpx.get(f"{s.url}/metrics").text, live) == alive
        assert httpx.post(f"{s.url}/v1/models/lm/sessions/{sid}:step", json={"text": "a"}).status_code == 404

        after = counts(s)
        new = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
        assert new == {("clf", "v1_predict", "200"): 1 + statuses.count(200), ("clf", "v1_predict", "400"): 1,
                       ("_not_deployed", "v1_predict", "404"): 1, ("clf", "v2_infer", "400"): 1,
                       ("lm", "generate_stream", "200"): 1, ("lm", "generate", "200"): 1,
                       ("clf", "v1_predict", "503"): shed, ("lm", "session_create", "200"): 1,
                       ("lm", "session_step", "404"): 1, ("ttft", "", ""): 2, ("stream", "", ""): 1}, new
    finally:
        s.stop()


def test_a_ready_server_has_frozen_its_start_up_heap(repository):
    """Once ready, the start-up heap is out of the collector's way (serving/common/heap.py): frozen,
    and young collections every THRESHOLDS[0] allocations, in the front-end's and the engine's
    process (here one process: the fixture's in-process server)."""
    s = Server(repository)
    try:
        assert gc.get_freeze_count() > 10_000 and gc.get_threshold() == heap.THRESHOLDS
    finally:
        s.stop()
