"""The process layout of python -m serving: HTTP front-ends and inference engines, each engine
owning its sessions. Exactness across processes, engines that die with their server, and the
per-model serving config (config.json beside the versions)."""
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from core.codec import softmax
from core.repository import read_version
from export.repository import export_run
from serving.__main__ import Engines
from serving.common.messages import Deployed
from serving.common.settings import Settings
from serving.engine.engine import Engine
from serving.frontend.client import STREAM_WEIGHT, EngineClient
from tests.serving_fixtures import FRONT_END, Server, alone, by_front_end, sample, serve, tiny_repository
from tests.test_export import make_run
from tests.test_lifecycle import children


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    return tiny_repository(tmp_path_factory.mktemp("engines"))


def test_answers_across_front_ends_and_engines_equal_the_graph_alone(repository):
    """2 front-ends, 2 engines, 300 concurrent requests of 1 to 3 texts: both front-ends answer
    some, and every answer is the graph run on that text alone (1e-5), whichever processes served
    it, though rows of different requests shared ONNX Runtime calls (fewer calls than requests,
    some of more than 4 rows)."""
    server, url = serve(repository, "--workers", "2", "--engines", "2")
    rng = np.random.default_rng(0)
    words = ["good", "bad", "film", "plot", "great", "awful", "the", "a"]
    bodies = [[" ".join(rng.choice(words, rng.integers(1, 20))) for _ in range(rng.integers(1, 4))] for _ in range(300)]
    try:
        front_ends = set(by_front_end(url, "/v2/health/ready", answers_each=1))  # both take connections

        async def fire():
            async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=100)) as client:
                return await asyncio.gather(*(client.post("/v1/models/clf:predict", json={"instances": texts})
                                              for texts in bodies))
        responses = asyncio.run(fire())
        assert [r.status_code for r in responses] == [200] * 300
        answered_by = [r.headers[FRONT_END] for r in responses]
        print({pid: answered_by.count(pid) for pid in front_ends}, "answers by front-end")
        assert set(answered_by) == front_ends  # 100 connections: the kernel gave both some
        for texts, r in zip(bodies, responses):
            for text, p in zip(texts, r.json()["predictions"]):
                assert np.abs(np.array([p["probabilities"]["neg"], p["probabilities"]["pos"]]) - alone(repository, text)).max() < 1e-5
        metrics = httpx.get(f"{url}/metrics").text
        calls, rows = (sample(metrics, f'rnnserve_batch_size_{part}{{model="clf"}}') for part in ("count", "sum"))
        over_4 = calls - sample(metrics, 'rnnserve_batch_size_bucket{le="4.0",model="clf"}')
        requests = len(bodies)
        print(f"{rows:.0f} rows of {requests} requests in {calls:.0f} ONNX Runtime calls, {over_4:.0f} of them "
              f"over 4 rows: {rows / calls:.1f} rows per call")
        assert rows == sum(map(len, bodies))  # every text ran once (the warm-up does not count)
        assert calls < requests and over_4 > 0, (calls, over_4)  # requests of at most 3 rows shared calls
        engines = [p for p in children(server.pid) if "serving.engine" in p[1]]
        assert len(engines) == 2
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0


def test_engines_die_with_their_server(repository):
    """SIGKILL leaves the server no time to stop anything: its engines still exit (PDEATHSIG)."""
    server, _ = serve(repository, "--workers", "1", "--engines", "2")
    engines = [pid for pid, command in children(server.pid) if "serving.engine" in command]
    assert len(engines) == 2
    server.kill()
    server.wait(10)
    deadline = time.time() + 5
    while any(running(pid) for pid in engines) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(running(pid) for pid in engines)


def running(pid: int) -> bool:
    """Alive: not gone and not a zombie. An engine orphaned by its server's SIGKILL is reaped by
    whoever adopts it, when it gets to it: on a loaded box its /proc entry outlived the 5 s above
    while it had exited within 30 ms of its SIGTERM (strace, 2026-12-06)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_classifier_request_keeps_off_the_engine_running_this_front_ends_streams(tmp_path):
    """Two engines serve the classifier; this front-end has generations streaming on the first. A
    classifier request goes to the second, until the second has STREAM_WEIGHT times as many
    requests waiting as the first has streams (the first's steps wait behind its classifier calls)."""
    engines = EngineClient(["engine-0.sock", "engine-1.sock"], tmp_path)
    deployed = Deployed("clf", 1, "classifier", "CPUExecutionProvider", "fp32", "cpu", 64)
    for link in engines.links:
        engines.catalogued(link, {"clf": deployed})
    generating, other = engines.links
    generating.streams = {i: None for i in range(2)}
    other.waiting = {i: None for i in range(3)}
    assert engines.pick("clf")[0] is other  # 3 waiting there against 2 streams here
    other.waiting = {i: None for i in range(2 * STREAM_WEIGHT + 1)}
    assert engines.pick("clf")[0] is generating


def test_an_engine_stops_when_a_second_sigterm_interrupts_the_first(tmp_path):
    """A signal handler runs between any two lines of the code it interrupts, in the same thread:
    here stop() is called again at every line run inside a first stop(), as a second SIGTERM's
    handler would be (a restarted engine gets two at the server's stop). Before, stop() set a
    threading.Event, whose lock the interrupted set() held: the nested call waited on it forever
    and the engine never stopped (issue 30: 1 run in 3-5 under load, the supervisor's stack dump)."""
    engine = Engine(Settings(repository=tmp_path), str(tmp_path / "engine.sock"))
    interrupting = []

    def second_sigterm(frame, event, arg):
        if event == "line" and not interrupting:
            interrupting.append(frame.f_code.co_name)
            engine.stop()
            interrupting.pop()
        return second_sigterm

    def first_sigterm():
        sys.settrace(lambda frame, event, arg: second_sigterm)  # every line of stop() and of what it calls
        engine.stop()
        sys.settrace(None)

    handler = threading.Thread(target=first_sigterm, daemon=True)
    handler.start()
    handler.join(5)
    assert not handler.is_alive(), "stop() deadlocked when interrupted by itself"
    assert engine.stopping


def test_an_engine_restarted_as_the_server_stops_is_stopped_too(monkeypatch):
    """An engine dies and the watcher thread restarts it just as the server stops: the new one gets
    the SIGTERM too (before, stop() could signal the dead one, wait on it, and leave the new one to
    run; here the restart is held until stop() has begun). Engines are `sleep` processes here."""
    engines = Engines(["engine-0.sock"], [0])
    restarting = threading.Event()

    def spawn(i):
        if engines.processes[i] is not None:  # the watcher's restart, held until the stop has begun
            restarting.set()
            engines.stopping.wait(10)
            time.sleep(0.3)
        engines.processes[i] = subprocess.Popen(["sleep", "60"])

    monkeypatch.setattr(engines, "spawn", spawn)
    engines.start()
    first = engines.processes[0]
    first.kill()
    first.wait()
    assert restarting.wait(10)
    engines.stop(grace_s=10)
    engines.watcher.join(10)  # before, still restarting as stop() returned
    restarted = engines.processes[0]
    try:
        assert restarted is not first and restarted.wait(5) == -signal.SIGTERM
    finally:
        restarted.kill()
        restarted.wait()


def test_a_model_is_served_as_its_config_says(repository, tmp_path):
    """config.json beside the versions: its int8 variant, one row per call; the other model keeps
    the server's settings. A config that does not fit the schema keeps the model out, with the
    file and field named."""
    rows = [(" ".join(np.random.default_rng(i).choice(["good", "bad", "film", "plot"], 5)), "pos" if i % 2 else "neg")
            for i in range(60)]
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    repo = tmp_path / "repo"
    shutil.copytree(repository / "lm", repo / "lm")
    export_run(make_run(tmp_path / "run", "classifier", "lstm", data=tmp_path / "d.csv"), repo, name="q",
               quantize="int8", cases=3)
    (repo / "q" / "config.json").write_text(json.dumps({"variant": "int8", "max_batch_size": 1}))
    s = Server(repo, max_queue_delay_ms=50)
    try:
        assert s.deployment("q").runner.variant == "int8" and s.deployment("q").runner.limits.max_batch_size == 1
        assert httpx.get(f"{s.url}/v1/models/q").json()["variant"] == "int8"
        texts = ["good film", "bad plot the", "film"]
        answer = httpx.post(f"{s.url}/v1/models/q:predict", json={"instances": texts}).json()["predictions"]
        version = read_version(repo / "q" / "1")
        int8 = ort.InferenceSession(version.graph_bytes("int8"), providers=["CPUExecutionProvider"])
        for text, p in zip(texts, answer):
            ids, _ = version.codec.encode(text)
            expected = softmax(int8.run(None, {"input_ids": np.array([ids]), "lengths": np.array([len(ids)])})[0][0])
            assert np.abs(np.array(list(p["probabilities"].values())) - expected).max() < 1e-5
        sizes = httpx.get(f"{s.url}/metrics").text
        assert 'rnnserve_batch_size_bucket{le="1.0",model="q"} 3.0' in sizes  # three calls of one row each
    finally:
        s.stop()
    (repo / "q" / "config.json").write_text(json.dumps({"max_batch_size": 0, "varient": "int8"}))
    s = Server(repo, control="open")
    try:
        assert "q" not in s.engine.deployments.current
        index = {r["name"]: r for r in httpx.post(f"{s.url}/v2/repository/index").json()}
        assert "config.json: max_batch_size: Input should be greater than 0" in index["q"]["reason"]
    finally:
        s.stop()


def engine_pids(server) -> dict[int, int]:
    """Engine index -> pid, among the server's children."""
    return {int(command.split("--index ")[1].split()[0]): pid for pid, command in children(server.pid)
            if "serving.engine" in command}


def two_versions(folder) -> Path:
    """The tiny repository with a second version of clf (other weights)."""
    repository = tiny_repository(folder)
    export_run(make_run(folder / "runs" / "clf2", "classifier", "bilstm", seed=1), repository, name="clf", cases=5)
    return repository


def test_a_restarted_engine_serves_what_it_served_and_the_others_answer_meanwhile(tmp_path):
    """clf serves version 1, pinned by a load call, and a version that cannot load appears beside
    it. Engine 0 is killed: while it restarts every request is answered by engine 1 (before: all
    503, "not ready"); restarted, it serves version 1 again (before: it tried the newest, refused
    it and served no clf, so predict answered 404)."""
    repository = two_versions(tmp_path)
    log = open(tmp_path / "server.log", "w+")
    server, url = serve(repository, "--workers", "1", "--engines", "2", log=log, control="open")
    try:
        assert httpx.post(f"{url}/v2/repository/models/clf/load", json={"parameters": {"version": "1"}}).status_code == 200
        shutil.copytree(repository / "clf" / "1", repository / "clf" / "3")
        (repository / "clf" / "3" / "manifest.json").write_text("{not json")
        before = engine_pids(server)
        os.kill(before[0], signal.SIGKILL)
        statuses = [httpx.post(f"{url}/v1/models/clf:predict", json={"instances": ["good film"]}).status_code
                    for _ in range(8)]  # at once, while engine 0 is gone or loading
        deadline = time.time() + 60
        while httpx.get(f"{url}/v2/health/ready").status_code != 200 and time.time() < deadline:
            time.sleep(0.1)
        assert engine_pids(server)[0] != before[0]
        assert statuses == [200] * 8, statuses
        index = {(r["name"], r["version"]): r["state"] for r in httpx.post(f"{url}/v2/repository/index").json()}
        assert index["clf", "1"] == "READY" and index["clf", "3"] == "UNAVAILABLE", index
        served = {httpx.get(f"{url}/v1/models/clf").json()["version"] for _ in range(20)}
        assert served == {"1"}
        answer = httpx.post(f"{url}/v1/models/clf:predict", json={"instances": ["good film"]} ).json()["predictions"][0]
        assert np.abs(np.array(list(answer["probabilities"].values())) - alone(repository, "good film", version=1)).max() < 1e-5
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)


def test_with_no_model_loadable_the_server_stays_up_unready_and_says_why(repository, tmp_path):
    """Every version broken: no engine exits (before: "no model ... could be loaded", and 23
    restarts in 10 s), the server is live and unready, and the index names each model's problem."""
    broken = tmp_path / "repo"
    shutil.copytree(repository, broken)
    for name in ("clf", "lm"):
        (broken / name / "1" / "manifest.json").write_text("{not json")
    log = open(tmp_path / "server.log", "w+")
    server, url = serve(broken, "--workers", "1", "--engines", "2", log=log, wait_for="/v2/health/live", control="open")
    try:
        index = httpx.post(f"{url}/v2/repository/index")
        assert index.status_code == 200, index.text
        assert {r["name"]: r["state"] for r in index.json()} == {"clf": "UNAVAILABLE", "lm": "UNAVAILABLE"}
        assert all("manifest.json" in r["reason"] for r in index.json()), index.json()
        assert httpx.get(f"{url}/v2/health/ready").status_code == 503
        time.sleep(1)  # an engine that exits is restarted within 0.2 s: it would show by now
        log.seek(0)
        assert "exited with" not in log.read()
        assert len(engine_pids(server)) == 2
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
