"""Model control: index, load, unload, atomic swaps under load, refused versions, polling, the
bearer token, paths that try to leave the repository, and several workers following one call."""
import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from pydantic import ValidationError

from export.repository import export_run
from loadtest.servers import free_port
from serving.common.settings import Settings
from tests.serving_fixtures import (FRONT_END, Server, alone, by_front_end, client_of, raw_http, sample, serve,
                                    tiny_repository)
from tests.test_lifecycle import children
from tests.test_export import make_run

TEXTS = ["good film", "the plot was awful", "a", "great great good film the plot", "bad", "awful film the a"]


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory):
    """The tiny repository with a second version of clf: other weights, so other answers."""
    folder = tmp_path_factory.mktemp("control")
    repository = tiny_repository(folder)
    export_run(make_run(folder / "runs" / "clf2", "classifier", "bilstm", seed=1), repository, name="clf", cases=5)
    for text in TEXTS:
        assert np.abs(alone(repository, text, version=1) - alone(repository, text, version=2)).max() > 1e-3
    return repository


def copy_of(repository, tmp_path):
    shutil.copytree(repository, tmp_path / "repo")
    return tmp_path / "repo"


def probabilities(response) -> np.ndarray:
    return np.array([[p["probabilities"]["neg"], p["probabilities"]["pos"]] for p in response.json()["predictions"]])


def test_index_load_and_unload(two_versions):
    s = Server(two_versions, control="open")
    try:
        index = httpx.post(f"{s.url}/v2/repository/index").json()
        assert {(r["name"], r["version"], r["state"]) for r in index} == {
            ("clf", "1", "UNAVAILABLE"), ("clf", "2", "READY"), ("lm", "1", "READY")}
        assert httpx.post(f"{s.url}/v2/repository/index", json={"ready": True}).json() == [
            r for r in index if r["state"] == "READY"]

        r = httpx.post(f"{s.url}/v2/repository/models/clf/load", json={"parameters": {"version": "1"}})
        assert r.status_code == 200 and r.json() == {"name": "clf", "version": "1", "state": "READY"}
        answer = httpx.post(f"{s.url}/v1/models/clf:predict", json={"instances": TEXTS})
        assert np.abs(probabilities(answer) - [alone(two_versions, t, version=1) for t in TEXTS]).max() < 1e-5
        assert httpx.get(f"{s.url}/v2/models/clf").json()["versions"] == ["1"]
        assert httpx.get(f"{s.url}/v2/models/clf/versions/2/ready").status_code == 400  # not ready: Triton's answer

        assert httpx.post(f"{s.url}/v2/repository/models/clf/unload").json()["state"] == "UNAVAILABLE"
        assert httpx.post(f"{s.url}/v1/models/clf:predict", json={"instances": ["good"]}).status_code == 404
        assert httpx.post(f"{s.url}/v2/repository/models/clf/unload").status_code == 404  # not loaded
        assert httpx.post(f"{s.url}/v2/repository/models/clf/load").json()["version"] == "2"  # the latest
        answer = httpx.post(f"{s.url}/v1/models/clf:predict", json={"instances": TEXTS})
        assert np.abs(probabilities(answer) - [alone(two_versions, t, version=2) for t in TEXTS]).max() < 1e-5

        assert httpx.post(f"{s.url}/v2/repository/models/clf/load", json={"parameters": {"version": "7"}}).status_code == 404
        assert httpx.post(f"{s.url}/v2/repository/models/clf/load", json={"parameters": {"version": "x"}}).status_code == 400
        assert httpx.post(f"{s.url}/v2/repository/models/nope/load").status_code == 404
    finally:
        s.stop()


def answered(server, version, endpoint: str = "v1_predict", status: int = 200, model: str = "clf") -> float:
    """The requests /metrics counts as answered by that version of the model (the test process's servers' together)."""
    series = f'rnnserve_requests_total{{endpoint="{endpoint}",model="{model}",status="{status}",version="{version}"}}'
    return sample(httpx.get(f"{server.url}/metrics").text, series)


def test_requests_are_counted_under_the_version_that_answered_them(two_versions):
    """Three predictions by version 1, then two by version 2 (loaded in its place): each version's
    count moves by its own; a refusal before a version was chosen (an unloaded version, a bad
    body) is counted under version "none", and so is its latency. A language model's generation
    (its time to first token too) and session step are counted under its version."""
    s = Server(two_versions, control="open")
    try:
        before = {(v, status): answered(s, v, status=status) for v in ("1", "2", "none") for status in (200, 400)}
        latency = 'rnnserve_request_latency_seconds_count{endpoint="v2_infer",model="clf",version="none"}'
        v2_before, latency_before = answered(s, "none", "v2_infer", 404), sample(httpx.get(f"{s.url}/metrics").text, latency)
        load = lambda version: httpx.post(f"{s.url}/v2/repository/models/clf/load", json={"parameters": {"version": version}})
        assert load("1").status_code == 200
        for _ in range(3):
            assert httpx.post(f"{s.url}/v1/models/clf:predict", json={"instances": TEXTS}).status_code == 200
        assert httpx.post(f"{s.url}/v2/models/clf/versions/2/infer", json={"inputs": []}).status_code == 404  # not loaded
        assert load("2").status_code == 200
        for _ in range(2):
            assert httpx.post(f"{s.url}/v1/models/clf:predict", json={"instances": TEXTS}).status_code == 200
        assert httpx.post(f"{s.url}/v1/models/clf:predict", json={"instances": "good"}).status_code == 400
        after = {key: answered(s, key[0], status=key[1]) for key in before}
        assert {key: after[key] - before[key] for key in before} == {
            ("1", 200): 3, ("2", 200): 2, ("none", 200): 0, ("1", 400): 0, ("2", 400): 0, ("none", 400): 1}
        assert answered(s, "none", "v2_infer", 404) == v2_before + 1
        assert sample(httpx.get(f"{s.url}/metrics").text, latency) == latency_before + 1

        first_token = 'rnnserve_time_to_first_token_seconds_count{model="lm",version="1"}'
        lm_before = [answered(s, "1", endpoint, model="lm") for endpoint in ("generate", "session_step")]
        first_before = sample(httpx.get(f"{s.url}/metrics").text, first_token)
        assert httpx.post(f"{s.url}/v1/models/lm:generate", json={"prompt": "the", "max_new_tokens": 3}).status_code == 200
        sid = httpx.post(f"{s.url}/v1/models/lm/sessions").json()["session_id"]
        assert httpx.post(f"{s.url}/v1/models/lm/sessions/{sid}:step", json={"text": "the"}).status_code == 200
        assert [answered(s, "1", endpoint, model="lm") - n
                for endpoint, n in zip(("generate", "session_step"), lm_before)] == [1, 1]
        assert sample(httpx.get(f"{s.url}/metrics").text, first_token) == first_before + 1
    finally:
        s.stop()


def test_swaps_under_load_lose_nothing_and_each_answer_comes_from_one_version(two_versions):
    """16 clients predict without pause while the model swaps between versions 1 and 2 six times;
    /metrics counts each answer under the version that gave it."""
    s = Server(two_versions, max_queue_delay_ms=2, control="open")
    counted_before = {v: answered(s, v) for v in (1, 2)}
    expected = {v: np.array([alone(two_versions, t, version=v) for t in TEXTS]) for v in (1, 2)}
    answers, statuses = [], []

    async def client_loop(client, stop):
        while not stop.is_set():
            r = await client.post("/v1/models/clf:predict", json={"instances": TEXTS})
            statuses.append(r.status_code)
            if r.status_code == 200:
                answers.append(probabilities(r))

    async def scenario():
        stop = asyncio.Event()
        async with httpx.AsyncClient(base_url=s.url, timeout=30, limits=httpx.Limits(max_connections=32)) as client:
            clients = [asyncio.create_task(client_loop(client, stop)) for _ in range(16)]
            swaps = []
            for version in (1, 2, 1, 2, 1, 2):
                await asyncio.sleep(0.3)
                r = await client.post("/v2/repository/models/clf/load", json={"parameters": {"version": str(version)}})
                swaps.append((r.status_code, r.json()["version"]))
            await asyncio.sleep(0.3)
            stop.set()
            await asyncio.gather(*clients)
            return swaps

    try:
        swaps = asyncio.run(scenario())
        assert swaps == [(200, str(v)) for v in (1, 2, 1, 2, 1, 2)]
        assert statuses and set(statuses) == {200}, {code: statuses.count(code) for code in set(statuses)}
        came_from = [[v for v in (1, 2) if np.abs(a - expected[v]).max() < 1e-5] for a in answers]
        assert all(len(c) == 1 for c in came_from)  # every answer is wholly one version's
        assert {c[0] for c in came_from} == {1, 2} and len(answers) > 50
        by_version = {v: sum(c == [v] for c in came_from) for v in (1, 2)}
        assert {v: answered(s, v) - counted_before[v] for v in (1, 2)} == by_version
        assert released(s)  # old versions released
    finally:
        s.stop()


def released(server, timeout_s: float = 5) -> bool:
    """Every retired version released: after its quiet second, at the next housekeeping."""
    deadline = time.time() + timeout_s
    while server.engine.deployments.retiring and time.time() < deadline:
        time.sleep(0.05)
    return server.engine.deployments.retiring == []


def spoil(version_folder, how: str):
    manifest_path = version_folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if how == "corrupt file":
        with open(version_folder / "model.onnx", "r+b") as f:
            f.seek(100)
            f.write(b"\xff" * 64)
    elif how == "wrong checksum":
        manifest["graphs"]["fp32"]["sha256"] = "0" * 64
    elif how == "bad manifest":
        manifest_path.write_text("{not json")
        return
    elif how == "graph that does not run":  # a valid ONNX graph, its checksum right, its input named otherwise
        x = helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "seq"])
        y = helper.make_tensor_value_info("logits", TensorProto.INT64, ["batch", "seq"])
        graph = helper.make_graph([helper.make_node("Identity", ["tokens"], ["logits"])], "broken", [x], [y])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), version_folder / "model.onnx")
        import hashlib
        manifest["graphs"]["fp32"]["sha256"] = hashlib.sha256((version_folder / "model.onnx").read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("how", ["corrupt file", "wrong checksum", "bad manifest", "graph that does not run"])
def test_a_bad_version_is_refused_and_the_old_one_keeps_serving(two_versions, tmp_path, how):
    repository = copy_of(two_versions, tmp_path)
    s = Server(repository, model_versions={"clf": 1}, control="open")
    try:
        spoil(repository / "clf" / "2", how)
        r = httpx.post(f"{s.url}/v2/repository/models/clf/load")
        assert r.status_code == 400 and "load refused" in r.json()["error"], r.text
        answer = httpx.post(f"{s.url}/v1/models/clf:predict", json={"instances": TEXTS})
        assert np.abs(probabilities(answer) - [alone(two_versions, t, version=1) for t in TEXTS]).max() < 1e-5
        index = {r["version"]: r for r in httpx.post(f"{s.url}/v2/repository/index").json() if r["name"] == "clf"}
        assert index["1"]["state"] == "READY" and index["2"]["state"] == "UNAVAILABLE"
        assert index["2"]["reason"] and index["2"]["reason"] != "not loaded"
    finally:
        s.stop()


@pytest.fixture(scope="module")
def guarded(two_versions, tmp_path_factory):
    """A server over a repository (clf, lm) whose parent folder would load as a model (it holds a
    version folder) and holds a good model (outside/) and the run folders: what a path that left
    the repository would reach. In the repository, links to what is not a model (NOT_MODELS)."""
    folder = tmp_path_factory.mktemp("guarded")
    shutil.copytree(two_versions, folder / "repo")
    shutil.copytree(two_versions / "clf" / "1", folder / "1")
    shutil.copytree(two_versions / "clf", folder / "outside")
    shutil.copytree(two_versions.parent / "runs", folder / "runs")
    for link, target in NOT_MODELS.items():
        (folder / "repo" / link).symlink_to(target)
    s = Server(folder / "repo", control="open")
    yield s
    s.stop()


# link in the repository -> its target (relative to the repository)
NOT_MODELS = {"root": "/", "run-folders": "../runs", "run": "../runs/clf", "version": "clf/2",
              "manifest": "clf/2/manifest.json", "loop": "loop", "gone": "../nowhere"}
LOAD, ERROR = "/v2/repository/models/{}/load", 404
LEAVING = [  # request targets sent byte for byte, and the status each gets
    *[(LOAD.format(name), ERROR) for name in [
        "..", "...", "%2e%2e", "%2E%2E", "..%2Foutside", "%2e%2e%2foutside", "%2e%2e/outside", "..%5Coutside",
        "%252e%252e%252foutside", "%C0%AE%C0%AE%2Foutside", "%2Fetc", "clf%2F..%2F..%2Foutside",
        "clf%2F..%2F..%2Fruns%2Fclf", ".hidden", "clf%00", "..%00", "runs", "outside"]],
    ("/v2/repository/models/../outside/load", ERROR), ("/v2/repository/models/./../outside/load", ERROR),
    ("/v2/repository/models/clf/../../outside/load", ERROR), ("/v2/repository/models//etc/load", ERROR),
    ("/v2/repository/models/..%2Fclf/unload", ERROR), ("/v1/models/..%2F..%2Fetc:predict", ERROR),
    ("/v1/models/..%2Foutside:predict", ERROR), ("/v1/models/../outside:predict", ERROR),
    ("/v2/models/..%2Foutside/infer", ERROR), ("/v2/models/../outside/infer", ERROR),
    ("/v2/models/%2e%2e%2foutside", ERROR),
    # refused by the HTTP parser before the app: a NUL or a space in the request line
    ("/v2/repository/models/clf\x00/load", 400), ("/v2/repository/models/../outside\x00/load", 400),
    ("/v2/repository/models/.. /outside/load", 400)]


@pytest.mark.parametrize("target,status", LEAVING, ids=[repr(t)[1:-1] for t, _ in LEAVING])
def test_request_paths_cannot_leave_the_repository(guarded, target, status):
    """Raw request lines (httpx would normalise `..` and send none of these as written): each is
    refused, with a JSON error where the app answered, and nothing is loaded, though one folder up
    sits a good model and that parent folder would itself load as one."""
    got, body = raw_http(guarded.url, "POST", target.encode("latin-1"))
    assert got == status, (got, body)
    if status == ERROR:
        assert json.loads(body)["error"], body
    assert set(guarded.engine.deployments.current) == {"clf", "lm"}
    assert {r["name"] for r in httpx.post(f"{guarded.url}/v2/repository/index").json()} == {"clf", "lm"}


@pytest.mark.parametrize("version", ["../1", "01", "1.0", "0"])
def test_a_version_cannot_leave_its_model_and_follows_the_repositorys_rule(guarded, version):
    """A version is a folder's name as the repository contract has it (1, 2, ...: no "01", which
    was loaded as 1 while GET .../versions/01 answered 404)."""
    body = json.dumps({"parameters": {"version": version}}).encode()
    got, answer = raw_http(guarded.url, "POST", LOAD.format("clf").encode(), body)
    assert got == 400 and "version folder's name" in json.loads(answer)["error"], answer
    assert guarded.deployment("clf").version == 2


@pytest.mark.parametrize("link", NOT_MODELS)
def test_a_link_to_what_is_not_a_model_is_not_served(guarded, link):
    """Links in the repository to /, to the run folders, to one run, to a version folder, to a
    file, to themselves and to nothing: not listed, and a load answers 404 with nothing loaded
    (before, a folder without versions failed the load with a 500: IndexError)."""
    got, body = raw_http(guarded.url, "POST", LOAD.format(link).encode())
    assert got == 404 and link in json.loads(body)["error"], (got, body)
    assert set(guarded.engine.deployments.current) == {"clf", "lm"}
    assert {r["name"] for r in httpx.post(f"{guarded.url}/v2/repository/index").json()} == {"clf", "lm"}


BADLY_NAMED = [".outside", "-outside", "out side", "outsid\u00e9", "outside~"]


def test_a_link_whose_name_is_not_a_model_name_is_ignored(two_versions, tmp_path):
    """Links to a good model under names no model has (hidden, a leading dash, a space, a letter
    outside [A-Za-z0-9], a tilde): never deployed, at start or by polling, nor listed, nor
    loadable; the same model linked in under a good name meanwhile is deployed by the next poll."""
    repository = copy_of(two_versions, tmp_path)
    shutil.copytree(two_versions / "clf", tmp_path / "outside")
    for name in BADLY_NAMED:
        (repository / name).symlink_to(tmp_path / "outside")
    s = Server(repository, control="open", repository_poll_s=0.05, control_sync_s=0.05)
    try:
        assert set(s.engine.deployments.current) == {"clf", "lm"}
        (repository / "fresh").symlink_to(tmp_path / "outside")
        deadline = time.time() + 30
        while "fresh" not in s.engine.deployments.current and time.time() < deadline:  # the polls have run
            time.sleep(0.05)
        assert set(s.engine.deployments.current) == {"clf", "lm", "fresh"}
        assert {r["name"] for r in httpx.post(f"{s.url}/v2/repository/index").json()} == {"clf", "lm", "fresh"}
        for name in BADLY_NAMED:
            got, body = raw_http(s.url, "POST", LOAD.format(quote(name)).encode())
            assert got == 404 and json.loads(body)["error"], (name, got, body)
        assert set(s.engine.deployments.current) == {"clf", "lm", "fresh"}
    finally:
        s.stop()


def test_the_control_token_guards_model_control_and_leaves_inference_open(two_versions):
    s = Server(two_versions, control_token="s3cret")
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.post(f"{s.url}/v2/repository/models/clf/unload", headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and r.json()["error"]
        assert httpx.post(f"{s.url}/v1/models/clf:predict", json={"instances": ["good"]}).status_code == 200
        ok = httpx.post(f"{s.url}/v2/repository/index", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and len(ok.json()) == 3
    finally:
        s.stop()
    s = Server(two_versions, control_token="s3cret", token_for_inference=True)
    try:
        assert httpx.post(f"{s.url}/v1/models/clf:predict", json={"instances": ["good"]}).status_code == 401
        assert httpx.post(f"{s.url}/v1/models/clf:predict", json={"instances": ["good"]},
                          headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(f"{s.url}/v2/health/ready").status_code == 200
        assert httpx.get(f"{s.url}/metrics").status_code == 200
    finally:
        s.stop()


def test_polling_deploys_a_new_version_when_it_appears(two_versions, tmp_path):
    repository = copy_of(two_versions, tmp_path)
    shutil.rmtree(repository / "clf" / "2")
    s = Server(repository, repository_poll_s=0.2, control_sync_s=0.1, control="open")
    try:
        assert httpx.get(f"{s.url}/v1/models/clf").json()["version"] == "1"
        shutil.copytree(two_versions / "clf" / "2", repository / "clf" / ".2.partial")  # as export publishes
        (repository / "clf" / ".2.partial").rename(repository / "clf" / "2")
        deadline = time.time() + 10
        while httpx.get(f"{s.url}/v1/models/clf").json()["version"] != "2" and time.time() < deadline:
            time.sleep(0.1)
        assert httpx.get(f"{s.url}/v1/models/clf").json()["version"] == "2"
        answer = httpx.post(f"{s.url}/v1/models/clf:predict", json={"instances": TEXTS})
        assert np.abs(probabilities(answer) - [alone(two_versions, t, version=2) for t in TEXTS]).max() < 1e-5
    finally:
        s.stop()


def test_every_front_end_and_engine_follows_a_load_call(two_versions, tmp_path):
    """python -m serving --workers 2 --engines 2: the call reaches one front-end; both engines
    swap (their pids in the log), and each front-end (its pid in X-Rnnserve-Frontend) serves
    version 1 at once after it."""
    log = open(tmp_path / "server.log", "w+")
    server, url = serve(two_versions, "--workers", "2", "--engines", "2", log=log, control="open")
    try:
        def versions_by_front_end() -> dict[str, set[str]]:
            return {pid: {r.json()["version"] for r in answers}
                    for pid, answers in by_front_end(url, "/v1/models/clf").items()}

        before = versions_by_front_end()
        caller, other = sorted(before)
        assert before == {caller: {"2"}, other: {"2"}}
        with client_of(url, caller) as client:
            r = client.post("/v2/repository/models/clf/load", json={"parameters": {"version": "1"}})
        assert r.status_code == 200 and r.headers[FRONT_END] == caller, r.text
        after = versions_by_front_end()
        print(f"front-end {caller} took the call; versions by front-end before {before}, after {after}")
        assert after == {caller: {"1"}, other: {"1"}}  # at once: every engine answered the call before it returned
        log.seek(0)
        swapped = {line.split()[3] for line in log if "serving clf version 1 (was 2)" in line}
        engines = {str(pid) for pid, command in children(server.pid) if "serving.engine" in command}
        assert swapped == engines and len(engines) == 2, (swapped, engines)  # each engine (by pid) swapped
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)


class Planted:
    """Unpickling this would create the marker file: it must never happen."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_model_folder_cannot_make_the_server_run_code(two_versions, tmp_path):
    """A version whose graph is a pickle (checksum right) and that carries Python files: the load
    is refused as not ONNX, and nothing in the folder ran. A model.pkl beside a good graph is
    never opened: that version serves, and nothing ran."""
    import hashlib
    import pickle
    repository = copy_of(two_versions, tmp_path)
    shutil.copytree(repository / "clf" / "1", repository / "evil" / "1")
    marker = tmp_path / "ran"
    (repository / "evil" / "1" / "model.onnx").write_bytes(pickle.dumps(Planted(marker)))
    (repository / "evil" / "1" / "__init__.py").write_text(f"open({str(marker)!r}, 'w')")
    manifest = json.loads((repository / "evil" / "1" / "manifest.json").read_text())
    manifest["graphs"]["fp32"]["sha256"] = hashlib.sha256((repository / "evil" / "1" / "model.onnx").read_bytes()).hexdigest()
    (repository / "evil" / "1" / "manifest.json").write_text(json.dumps(manifest))
    shutil.move(repository / "evil", tmp_path / "evil")  # the server starts without it
    s = Server(repository, control="open")
    try:
        shutil.move(tmp_path / "evil", repository / "evil")
        r = httpx.post(f"{s.url}/v2/repository/models/evil/load")
        assert r.status_code == 400 and "ONNX Runtime cannot load" in r.json()["error"], r.text
        assert not marker.exists()
        assert "evil" not in s.engine.deployments.current
        shutil.copytree(repository / "clf" / "1", repository / "pickled" / "1")
        (repository / "pickled" / "1" / "model.pkl").write_bytes(pickle.dumps(Planted(marker)))
        assert httpx.post(f"{s.url}/v2/repository/models/pickled/load").status_code == 200
        assert httpx.post(f"{s.url}/v1/models/pickled:predict", json={"instances": ["good"]}).status_code == 200
        assert not marker.exists()
    finally:
        s.stop()


def test_a_swap_lets_running_streams_finish_and_ends_the_old_versions_sessions(two_versions):
    s = Server(two_versions, control="open")
    try:
        sid = httpx.post(f"{s.url}/v1/models/lm/sessions").json()["session_id"]
        assert httpx.post(f"{s.url}/v1/models/lm/sessions/{sid}:step", json={"text": "the"}).status_code == 200

        async def scenario():
            async with httpx.AsyncClient(base_url=s.url, timeout=30) as client:
                body = {"prompt": "the time", "max_new_tokens": 400, "temperature": 0, "stream": True}
                async with client.stream("POST", "/v1/models/lm:generate", json=body) as stream:
                    lines = stream.aiter_lines()
                    first = await anext(lines)
                    reload = await client.post("/v2/repository/models/lm/load")  # the same version, reloaded
                    rest = [line async for line in lines]
                return first, reload, rest

        first, reload, rest = asyncio.run(scenario())
        events = [json.loads(line[6:]) for line in [first, *rest] if line.startswith("data: ")]
        assert reload.status_code == 200 and events[-1]["tokens"] == 400 and len(events) == 401
        r = httpx.post(f"{s.url}/v1/models/lm/sessions/{sid}:step", json={"text": "the"})
        assert r.status_code == 404 and "replaced" in r.json()["error"]
    finally:
        s.stop()


def test_a_swapped_out_version_is_released(two_versions):
    """Nothing keeps a retired deployment alive: its model (and ONNX Runtime session) is freed."""
    import gc
    import weakref
    s = Server(two_versions, control="open")
    try:
        gone = []
        for version in (1, 2, 1):
            gone.append(weakref.ref(s.deployment("clf").runner))
            httpx.post(f"{s.url}/v1/models/clf:predict", json={"instances": TEXTS})
            assert httpx.post(f"{s.url}/v2/repository/models/clf/load",
                              json={"parameters": {"version": str(version)}}).status_code == 200
        deadline = time.time() + 5  # each after its quiet second, at the next housekeeping
        while any(ref() is not None for ref in gone) and time.time() < deadline:
            gc.collect()
            time.sleep(0.05)
        assert [ref() is None for ref in gone] == [True, True, True]
    finally:
        s.stop()


FREED_AFTER_A_LARGER_ONE = """
import sys
import numpy as np
from serving.common.settings import Settings
from serving.engine.deployments import Deployments

def rss_kb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1])

if sys.argv[1] == "engine":
    Deployments(Settings(repository=sys.argv[2]))
big = np.ones(8 << 17)  # 8 MiB, mapped, then freed: glibc would raise its mmap threshold to 8 MiB
del big
buffer = np.ones(4 << 17)  # 4 MiB, as the next version's arena chunk or pool
before = rss_kb()
del buffer
print(before - rss_kb())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc thresholds: the fix is for glibc")
def test_an_engine_gives_back_a_freed_buffer_after_a_larger_one(tmp_path):
    """The engine's RSS grew 1.25-1.35x over 10 swaps: once a released version's large buffer was
    freed, glibc raised its mmap threshold and the next version's buffers came from the heap,
    which kept them. An engine fixes the threshold (map_large_buffers), so a freed 4 MiB buffer
    goes back to the OS at once; the same in a plain process shows glibc keeping it."""
    def returned_kb(process: str) -> int:
        done = subprocess.run([sys.executable, "-c", FREED_AFTER_A_LARGER_ONE, process, str(tmp_path)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
        return int(done.stdout.split()[-1])

    assert returned_kb("engine") >= 3 * 1024
    assert returned_kb("plain") < 1024  # what the engine did before: the buffer stayed resident


@pytest.mark.parametrize("token", ["", "   "], ids=["empty", "blank"])
def test_an_empty_control_token_refuses_to_start(two_versions, token):
    """An empty RNNSERVE_CONTROL_TOKEN (a Kubernetes secret marked optional can give one) asked for
    no token and did not close control either: model control was open to anyone. Now the server
    refuses to start, saying why."""
    with pytest.raises(ValidationError, match="RNNSERVE_CONTROL_TOKEN is empty"):
        Settings(control_token=token)
    done = subprocess.run([sys.executable, "-m", "serving", "--repository", str(two_versions), "--host", "127.0.0.1",
                           "--port", str(free_port())], env=os.environ | {"RNNSERVE_CONTROL_TOKEN": token},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "RNNSERVE_CONTROL_TOKEN is empty" in done.stderr, done.stderr[-2000:]


def linked_repository(two_versions, tmp_path) -> Path:
    """A repository holding lm, with clf kept elsewhere (as on a mounted volume)."""
    elsewhere, repository = tmp_path / "mnt", tmp_path / "repo"
    shutil.copytree(two_versions / "clf", elsewhere / "clf")
    shutil.copytree(two_versions / "lm", repository / "lm")
    return repository


def test_a_model_folder_linked_into_the_repository_is_served(two_versions, tmp_path):
    """Operators link models in (model_repository/imdb -> /mnt/models/imdb): served like any other.
    Before, every engine raised UnknownModel for the link and the server never became ready."""
    repository = linked_repository(two_versions, tmp_path)
    (repository / "clf").symlink_to(tmp_path / "mnt" / "clf")
    s = Server(repository, control="open")
    try:
        answer = httpx.post(f"{s.url}/v1/models/clf:predict", json={"instances": TEXTS})
        assert answer.status_code == 200, answer.text
        assert np.abs(probabilities(answer) - [alone(two_versions, t, version=2) for t in TEXTS]).max() < 1e-5
        assert httpx.post(f"{s.url}/v2/repository/models/clf/load", json={"parameters": {"version": "1"}}).status_code == 200
    finally:
        s.stop()


def test_a_link_added_while_polling_is_deployed_once_and_the_engine_goes_on(two_versions, tmp_path, caplog):
    """A link that appears while the engine polls is loaded once (never a second load while the
    first is in flight), and a model folder that fails is logged once and leaves the rest serving."""
    repository = linked_repository(two_versions, tmp_path)
    s = Server(repository, repository_poll_s=0.05, control_sync_s=0.05, control="open")
    loads = []
    load = s.engine.deployments.load

    def counted(name, version, pin):
        loads.append((name, version))
        return load(name, version, pin)

    s.engine.deployments.load = counted
    try:
        (repository / "broken").mkdir()
        (repository / "broken" / "1").mkdir()  # a version folder without its files
        (repository / "clf").symlink_to(tmp_path / "mnt" / "clf")
        deadline = time.time() + 20
        while time.time() < deadline and httpx.post(f"{s.url}/v1/models/clf:predict",
                                                    json={"instances": ["good"]}).status_code != 200:
            time.sleep(0.05)
        time.sleep(0.5)  # ten more polls
        assert s.engine_thread.is_alive()
        assert httpx.get(f"{s.url}/v1/models/clf").json()["version"] == "2"
        assert loads.count(("clf", 2)) == 1 and loads.count(("broken", 1)) == 1, loads
        assert caplog.text.count("broken/1") == 1, caplog.text[-3000:]
        index = {(r["name"], r["version"]): r for r in httpx.post(f"{s.url}/v2/repository/index").json()}
        assert index["broken", "1"]["state"] == "UNAVAILABLE" and "manifest.json" in index["broken", "1"]["reason"]
    finally:
        s.stop()
