import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.client import load
from loadtest.gpu import gpu_here
from loadtest.servers import free_port
from loadtest.workloads import predict_body
from tests.serving_fixtures import Server, tiny_repository

# The harnesses' rnnserve servers: one engine and one front-end, closing the port at SIGTERM
# without the drain's 5 + 5 s: what the tests check (every point measured, no errors, the tables
# written) on three processes a server instead of five.
ONE_OF_EACH = os.environ | {"RNNSERVE_ENGINES": "1", "RNNSERVE_WORKERS": "1", "RNNSERVE_DRAIN_SERVE_S": "0",
                            "RNNSERVE_DRAIN_S": "0"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tiny_repository(tmp_path_factory.mktemp("load")), grpc_port=free_port())
    yield s
    s.stop()


def locust(host: str, scenario: str, out, users=6, duration="5s", **env) -> tuple[subprocess.CompletedProcess, dict]:
    """python -m loadtest run on the tiny models; (the finished process, its summary.json)."""
    env = os.environ | {"RNNSERVE_LOADTEST_MODEL": "clf", "RNNSERVE_LOADTEST_LM": "lm", "RNNSERVE_LOADTEST_ROWS": "3", **env}
    done = subprocess.run([sys.executable, "-m", "loadtest", "run", "--host", host, "--users", str(users),
                           "--spawn-rate", str(users), "--duration", duration, "--scenario", scenario, "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=120)
    return done, json.loads((out / "summary.json").read_text())


def test_a_short_locust_run_of_every_scenario_ends_with_zero_failures(server, tmp_path):
    """Generation's rates are fields of the summary, not request entries with a rate in their
    millisecond columns."""
    done, summary = locust(server.url, "all", tmp_path, RNNSERVE_LOADTEST_GRPC=f"127.0.0.1:{server.settings.grpc_port}")
    assert done.returncode == 0, done.stdout + done.stderr
    endpoints = summary["endpoints"]
    assert set(endpoints) == {"v1 predict", "v1 model", "v2 infer", "v2 infer (binary)", "ModelInfer", "generate (stream)",
                              "Aggregated"}
    for name, endpoint in endpoints.items():
        assert endpoint["requests"] > 0 and endpoint["failures"] == 0, (name, endpoints)
    generation = summary["generation"]
    print("generation:", generation)
    assert generation["streams"] > 0 and generation["tokens"] >= 100 * generation["streams"] // 2
    assert generation["tokens_per_s"] > 0 and generation["stream_tokens_per_s_p50"] > 0
    assert 0 < generation["time_to_first_token_p50_ms"] <= generation["time_to_first_token_p95_ms"]
    assert summary["left_out"] == {} and summary["exceptions"] == 0
    assert "| tokens/s |" in (tmp_path / "summary.md").read_text() and (tmp_path / "report.html").exists()


def test_all_leaves_out_the_grpc_user_where_no_grpc_server_answers(server, tmp_path):
    """As against `make serve`, which opens no gRPC port: the run says so and has no failures."""
    nowhere = f"127.0.0.1:{free_port()}"
    done, summary = locust(server.url, "all", tmp_path, duration="4s", RNNSERVE_LOADTEST_GRPC=nowhere)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ModelInfer" not in summary["endpoints"] and summary["endpoints"]["Aggregated"]["failures"] == 0
    assert summary["exceptions"] == 0
    assert "no gRPC server answers" in summary["left_out"]["GrpcUser"]
    said = "the gRPC user is left out: no gRPC server answers at " + nowhere
    assert said in done.stdout and said in (tmp_path / "summary.md").read_text()


@pytest.mark.parametrize("scenario", ["predict", "grpc"])
def test_a_user_whose_connection_is_refused_backs_off_instead_of_spinning(server, tmp_path, scenario):
    """REST to a port nothing listens on, or gRPC where the server has none: in 6 s two users try a
    handful of times (backing off 0.1, 0.2, 0.4 ... s), not thousands. At least one try each run:
    on a box loaded many times over its cores, a user's start (gRPC's import, its channel) can take
    seconds of the run."""
    closed = free_port()
    if scenario == "predict":
        done, summary = locust(f"http://127.0.0.1:{closed}", scenario, tmp_path, users=2, duration="6s")
    else:
        nowhere = {"RNNSERVE_LOADTEST_GRPC": f"127.0.0.1:{closed}"}
        done, summary = locust(server.url, scenario, tmp_path, users=2, duration="6s", **nowhere)
    tries = summary["endpoints"]["Aggregated"]
    print(f"{scenario} against a closed port: {tries['requests']} tries, {tries['failures']} failed, in 6 s")
    assert tries["requests"] == tries["failures"] and 1 <= tries["requests"] <= 2 * 10, done.stderr[-3000:]
    assert summary["exceptions"] == 0  # each try is a failure counted, not a crash in the user's code


def test_the_asyncio_client_counts_every_answer(server):
    import asyncio
    requests = [("/v1/models/clf:predict", predict_body(t)) for t in ("good film", "bad plot", "the")]
    result = asyncio.run(load("127.0.0.1", int(server.url.rsplit(":", 1)[1]), requests, users=4, duration_s=1.0))
    assert result.errors == 0 and result.statuses == {200: len(result.latencies_s)} and len(result.latencies_s) > 10


def test_the_benchmark_harness_measures_every_stack_without_errors(tmp_path):
    """The harness end to end on tiny models and 0.3 s points, with requests of 1 and 3 texts from
    two load processes: a test of the plumbing, not of speed."""
    tiny_repository(tmp_path)
    done = subprocess.run([sys.executable, "-m", "loadtest", "bench", "--model", "clf", "--lm", "lm",
                           "--repository", str(tmp_path / "repo"), "--runs", str(tmp_path / "runs"),
                           "--texts", "1,3", "--client-procs", "2", "--ceiling-batches", "1,8",
                           "--seconds", "0.3", "--repeats", "1", "--out", str(tmp_path / "out")],
                          env=ONE_OF_EACH, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(results["points"]) == 2 * 2 * 6 + 3  # workloads x texts/request x stack points, + generation
    for key, point in results["points"].items():
        assert point["requests"] > 0 and point["errors"] == 0, (key, point)
    # CPU is read in clock ticks (10 ms): a 0.3 s point of a few requests on a loaded box may read 0,
    # a stack's points together not
    for stack in {key.split("|")[0] for key in results["points"]}:
        points = [point for key, point in results["points"].items() if key.split("|")[0] == stack]
        roles = ["cpu_server_s"] + (["frontend_cpu_ms_per_request", "engine_cpu_ms_per_request"] if stack == "rnnserve" else [])
        for role in roles:
            assert all(point[role] >= 0 for point in points) and sum(point[role] for point in points) > 0, (stack, role)
    three = results["points"]["rnnserve|short|3|64"]
    assert three["sequences_per_s"] == pytest.approx(3 * three["requests_per_s"])
    ceiling = results["ceiling"]["onnxruntime|short|1 threads"]
    assert set(ceiling) == {"run|1", "run|8", "iobinding|1", "iobinding|8"}
    assert set(results["ceiling"]["pytorch|long"]) == {"1", "8"}
    assert results["locust_check"]["locust_requests_per_s"] > 0
    assert (tmp_path / "out" / "latency_throughput.png").stat().st_size > 1000
    assert "rnnserve / naive-onnxruntime, 64 users" in (tmp_path / "out" / "results.md").read_text()


def test_the_transport_benchmark_measures_both_transports():
    """The Unix sockets the server speaks, then ZeroMQ, the transport before them, as the comparison."""
    done = subprocess.run([sys.executable, "-m", "loadtest", "ipc", "--messages", "512"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [tuple(line.split()[:2]) for line in done.stdout.splitlines()] == [
        (transport, n) for transport in ("unix", "zeromq") for n in ("1", "8", "64")]


def test_the_protocol_benchmark_measures_every_protocol_and_tracing_mode_without_errors(tmp_path):
    """python -m loadtest protocols end to end on tiny models and 0.3 s points: plumbing, not speed."""
    tiny_repository(tmp_path)
    done = subprocess.run([sys.executable, "-m", "loadtest", "protocols", "--model", "clf", "--repository",
                           str(tmp_path / "repo"), "--rows", "4", "--users", "4", "--seconds", "0.3", "--repeats", "1",
                           "--text-points", "4x1,2x8", "--out", str(tmp_path / "out")], env=ONE_OF_EACH,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["protocols"]) == {"v2 JSON", "v2 binary", "gRPC"}
    assert set(results["tracing"]) == {"off", "otlp, every request", "otlp, 1 in 10 sampled", "otlp, nothing sampled"}
    for point in [*results["protocols"].values(), *results["tracing"].values()]:
        assert point["requests"] > 0 and point["errors"] == 0, point
    assert results["protocols"]["gRPC"]["sequences_per_s"] == pytest.approx(4 * results["protocols"]["gRPC"]["requests_per_s"])
    assert results["spans_received"] > 0
    assert {point: set(by_name) for point, by_name in results["texts"].items()} == {
        point: {"V1 predict", "V2 ids JSON", "V2 text JSON", "V2 text binary", "V2 text gRPC"} for point in ("4x1", "2x8")}
    for per, by_name in ((1, results["texts"]["4x1"]), (8, results["texts"]["2x8"])):
        for point in by_name.values():
            assert point["requests"] > 0 and point["errors"] == 0, point
            assert point["sequences_per_s"] == pytest.approx(per * point["requests_per_s"]), point
    assert "| V2 text gRPC |" in (tmp_path / "out" / "results.md").read_text()


def test_the_tracing_benchmark_measures_a_baseline_checkout_in_the_same_rounds(tmp_path):
    """--baseline DIR: the tracing points of another checkout's server too (here this one's); --modes:
    only the points asked for besides off."""
    tiny_repository(tmp_path)
    done = subprocess.run([sys.executable, "-m", "loadtest", "protocols", "--model", "clf", "--repository",
                           str(tmp_path / "repo"), "--no-protocols", "--no-texts", "--users", "4", "--seconds", "0.3",
                           "--repeats", "1", "--modes", "nothing sampled",
                           "--baseline", str(Path(__file__).parents[1]), "--out", str(tmp_path / "out")],
                          env=ONE_OF_EACH, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["baseline"]) == set(results["tracing"]) == {"off", "otlp, nothing sampled"}
    assert all(p["requests"] > 0 and p["errors"] == 0 for p in [*results["tracing"].values(), *results["baseline"].values()])
    assert "| baseline: tracing otlp, nothing sampled |" in (tmp_path / "out" / "results.md").read_text()


def test_the_state_benchmark_measures_both_kinds_of_step_without_errors(tmp_path):
    """python -m loadtest state end to end on the tiny lm and 0.3 s points: tokens of every shape
    measured, steps by session id and by token answered; plumbing, not speed."""
    tiny_repository(tmp_path)
    done = subprocess.run([sys.executable, "-m", "loadtest", "state", "--lm", "lm", "--repository",
                           str(tmp_path / "repo"), "--users", "4", "--seconds", "0.3", "--repeats", "2",
                           "--out", str(tmp_path / "out")], env=ONE_OF_EACH, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["tokens"]["lm (2 x 12 x 1)"]["state_bytes"] == 96
    assert results["tokens"]["1-layer GRU, 256 units"] | {"seal_us": 0, "unseal_us": 0} == {
        "state_bytes": 1024, "token_chars": 1452, "seal_us": 0, "unseal_us": 0}
    assert set(results["steps"]) == {"session id", "token"} and len(results["round_ratios"]) == 2
    assert all(p["requests"] > 0 and p["errors"] == 0 for p in results["steps"].values())


def test_the_engine_benchmark_measures_the_host_cost_and_the_whole_stack(tmp_path):
    """python -m loadtest engine end to end on the tiny classifier and 0.3 s points: every point
    answered, the engine's CPU counted; plumbing, not speed."""
    tiny_repository(tmp_path)
    done = subprocess.run([sys.executable, "-m", "loadtest", "engine", "--model", "clf", "--repository",
                           str(tmp_path / "repo"), "--seconds", "0.3", "--repeats", "2",
                           "--out", str(tmp_path / "out")], env=ONE_OF_EACH, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["engine_alone"]) == {"short|1", "short|32", "long|1", "long|32"}
    for point in results["engine_alone"].values():
        assert point["requests"] > 0 and point["engine_us_per_request"] > 0, point
    servers = ["rnnserve, 1 front-end", "rnnserve, 2 front-ends", "minimal FastAPI app"]
    assert set(results["whole_stack"]) == {f"{s}|{n}" for s in servers for n in (1, 32)}
    for key, point in results["whole_stack"].items():
        assert point["repeats"] == 2 and point["requests"] > 0 and point["errors"] == 0, (key, point)


def test_the_mixed_benchmark_times_the_streams_alone_and_beside_classifier_users(tmp_path):
    """python -m loadtest mixed end to end on the tiny models and 0.5 s points: both conditions
    measured, the streams' chunk gaps read, the classifier answered beside them, nothing failed;
    plumbing, not speed."""
    tiny_repository(tmp_path)
    done = subprocess.run([sys.executable, "-m", "loadtest", "mixed", "--model", "clf", "--lm", "lm", "--repository",
                           str(tmp_path / "repo"), "--streams", "4", "--users", "4", "--seconds", "0.5", "--repeats", "1",
                           "--out", str(tmp_path / "out")], env=ONE_OF_EACH, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    points = json.loads((tmp_path / "out" / "results.json").read_text())["points"]
    alone, beside = points["streams alone"], points["streams beside the classifier users"]
    for p in (alone, beside):
        assert p["streams_per_s"] > 0 and p["gap_max_ms"] > 0 and p["errors"] == 0, p
    assert alone["classifier_requests_per_s"] == 0 and beside["classifier_requests_per_s"] > 0, points


def test_the_fronts_benchmark_streams_the_same_generations_through_generate_and_openai(tmp_path):
    """python -m loadtest fronts end to end on the tiny language model and 0.3 s points: every
    stream of both fronts answered whole; plumbing, not speed."""
    tiny_repository(tmp_path)
    done = subprocess.run([sys.executable, "-m", "loadtest", "fronts", "--lm", "lm", "--repository",
                           str(tmp_path / "repo"), "--streams", "4", "--seconds", "0.3", "--repeats", "2",
                           "--out", str(tmp_path / "out")], env=ONE_OF_EACH, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["points"]) == {"generate", "openai"} and results["openai_over_generate"] > 0
    for front, points in results["raw"].items():
        assert len(points) == 2 and all(p["requests"] > 0 and p["errors"] == 0 for p in points), (front, points)
    assert "| openai |" in (tmp_path / "out" / "results.md").read_text()


def test_the_gpu_check_says_why_it_cannot_run_and_rehearses_on_the_cpu(tmp_path):
    """python -m loadtest gpu: where no GPU is usable it refuses, saying why; --provider cpu runs
    the same points on tiny models and 0.3 s points (plumbing, not speed)."""
    tiny_repository(tmp_path)
    command = [sys.executable, "-m", "loadtest", "gpu", "--model", "clf", "--lm", "lm", "--repository",
               str(tmp_path / "repo"), "--seconds", "0.3", "--out", str(tmp_path / "out")]
    if (why := gpu_here()) is not None:  # no usable GPU here (on a GPU machine the check itself is the test)
        refused = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and why in refused.stderr and "`--provider cpu` rehearses it" in refused.stderr
    done = subprocess.run([*command, "--provider", "cpu", "--quick", "--no-tests"], env=ONE_OF_EACH,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["points"]) == {"1 text, 256 users", "32 texts, 256 users", "generation, 256 streams"}
    for label, point in results["points"].items():
        assert point["requests"] > 0 and point["errors"] == 0, (label, point)
    assert set(results["ceiling"]) == {"256", "1024"} and set(results["generation_ceiling"]) == {"256", "1024"}
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| 32 texts, 256 users | clf |" in table and "| generation, 256 streams | lm |" in table


def test_a_short_soak_loses_nothing_through_swaps_and_a_killed_engine(tmp_path):
    """python -m loadtest soak on tiny models for 18 s: predicts, streams and sessions at once,
    both models swapped between windows, engine 0 killed under load halfway: every request gets an answer."""
    tiny_repository(tmp_path)
    done = subprocess.run([sys.executable, "-m", "loadtest", "soak", "--model", "clf", "--lm", "lm", "--repository",
                           str(tmp_path / "repo"), "--minutes", "0.3", "--window-s", "4", "--users", "8",
                           "--reload-every-s", "6", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "soak.json").read_text())
    print(report["answered"], "answered,", report["lost"], "lost; swaps:", report["reloads"])
    assert report["lost"] == 0 and report["killed_engine_pid"] and report["reloads"] >= 2
    for w in report["windows"]:  # 503: in flight on the killed engine; 404: a session that lived there
        for kind, s in w["kinds"].items():
            assert s["answered"] > 0 and set(s["statuses"]) <= {"200", "503", "404"}, (kind, s)
            assert "404" not in s["statuses"] or (kind == "session" and w["engine_killed"]), (kind, s)


def test_the_swaps_benchmark_samples_the_engine_after_each_release(tmp_path):
    """python -m loadtest swaps on tiny models, 3 swaps under load: each swap's row is taken after
    the engine released the retired versions, every request answered 200; plumbing, not memory."""
    tiny_repository(tmp_path)
    done = subprocess.run([sys.executable, "-m", "loadtest", "swaps", "--model", "clf", "--lm", "lm", "--repository",
                           str(tmp_path / "repo"), "--swaps", "3", "--every-s", "1", "--users", "4",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "swaps.json").read_text())
    assert [row["swap"] for row in report["rows"]] == [0, 1, 2, 3]
    assert all(row["floor_mb"] > 0 for row in report["rows"]) and report["rows"][1]["floor_ratio"] == 1.0
    assert report["answered"] > 0 and report["lost"] == 0 and set(report["statuses"]) == {"200"}, report
    assert "| swap | engine RSS MB, lowest |" in (tmp_path / "out" / "swaps.md").read_text()


def test_the_profile_samples_the_front_end_and_the_engine_under_load(tmp_path):
    """python -m loadtest profile on the tiny classifier, one user for 2 s: py-spy's flame graph of
    each process shows its own serving code (the front-end's door, the engine's loop), titled with
    what was profiled, and the summary names where each process's own samples went."""
    tiny_repository(tmp_path)
    done = subprocess.run([sys.executable, "-m", "loadtest", "profile", "--model", "clf", "--repository",
                           str(tmp_path / "repo"), "--users", "1", "--seconds", "2", "--rate", "200",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for role, code in (("front-end", "FrontDoor.__call__"), ("engine", "Engine.run")):
        svg = (tmp_path / "out" / f"{role}-1users-1texts.svg").read_text()
        assert code in svg and f"rnnserve's {role}, 1 user(s)" in svg and str(tmp_path) not in svg
    assert done.stdout.count("own samples: ") == 2, done.stdout
