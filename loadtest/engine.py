"""What the engine's host work costs, and the whole stack's, when the model's compute is nothing.

    python -m loadtest engine [--model imdb-gru --repository model_repository] [--seconds 5 --repeats 3]

1. The engine alone: the engine in a process of its own serving --model, its ONNX Runtime call
   replaced by one that returns zeros (no inference: what is left is the host's work: take,
   decode, queue, pad, split, answer), fed over its Unix socket by a driver here as fast as it
   answers: requests of 1 text (64 in flight) and of 32 texts (16 in flight), short and long IMDB
   texts encoded with the model's codec. Reported: the engine process's CPU (from /proc) per
   request and per row, with the server's default settings for the CPU.
2. The whole stack with a model whose compute is negligible: an untrained 8-unit GRU with --model's
   vocabulary, tokenizer and labels, reading the first TINY_MAX_LEN tokens of each text. rnnserve
   with one front-end and one engine, and with two front-ends (the minimal app's count of HTTP
   processes) and one engine, against a minimal FastAPI app with two workers that parses the same
   body, tokenizes and encodes with the same codec and answers JSON with no model
   (loadtest/baselines/minimal_app.py); one load-generator process; 1 text at 64 users and 32 texts
   at 16 users, the servers interleaved in --repeats rounds. Reported: the medians of requests/s,
   their ratio to the minimal app's, and the CPU each spent per request (front-ends + engine).
Writes results.json and results.md under --out.
"""
import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from core.repository import latest, read_version
from loadtest.bench import measure, median_point
from loadtest.servers import cpu_name, free_port, start
from loadtest.workloads import predict_body, texts
from loadtest.wire import Wire
from serving.common.messages import Catalog, Failed, Hello, Infer, Result, Results, Rows, decode_replies, encode
from serving.common.settings import Settings
from serving.engine.engine import Engine
from serving.engine.runner import Runner

TICK = 100  # os.sysconf("SC_CLK_TCK") on Linux
POINTS = [("short", 1, 64), ("short", 32, 16), ("long", 1, 64), ("long", 32, 16)]  # workload, texts, in flight
# Whole texts (82 tokens on average) cost ONNX Runtime ~15 us of CPU per row even with 8 units
# (measured on the 2-core AMD box): 0.5 ms of a 32-text request, more than the minimal app spends on
# all of it. 8 tokens cost it ~2 us per row: what is left to compare is the host path.
TINY_MAX_LEN = 8
LAYOUTS = {"rnnserve, 1 front-end": ("1", "1"), "rnnserve, 2 front-ends": ("2", "1")}  # --workers, --engines
STACK_POINTS = ((1, 64), (32, 16))  # texts per request, users
MINIMAL = "minimal FastAPI app"


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def request(rid: int, model: str, version: int, rows: list[list[int]]) -> Infer:
    """The message a front-end sends for these rows (serving/frontend/core/inference.py)."""
    rows = Rows.of(rows)
    return Infer(rid, model, version, rows.ids.data, rows.lengths.data, time.monotonic() + 60)


def answered(frame: bytes) -> int:
    """Requests a frame from the engine answers: a Results message answers several."""
    count = 0
    for m in decode_replies(frame):
        if isinstance(m, Failed):
            raise RuntimeError(f"the engine refused request {m.id}: {m.status} {m.error}")
        count += len(m.ids) if isinstance(m, Results) else isinstance(m, Result)
    return count


def zeros(runner: Runner, ids: np.ndarray, lengths: np.ndarray, state=None) -> list[np.ndarray]:
    """Runner.run with no inference: zeros of the shape a classifier answers."""
    return [np.zeros((len(lengths), len(runner.manifest.labels)), np.float32)]


def engine_without_inference(repository: Path, address: str):
    """The engine process: python -m serving.engine's engine, every ONNX Runtime call answered by zeros."""
    Runner.run = zeros
    Engine(Settings(repository=repository, engine_addresses=[address], providers=["CPUExecutionProvider"]), address).run()


def host_cost(model_dir: Path, rows: dict[str, list[list[int]]], seconds: float) -> dict:
    """The engine in a process of its own (so that the driver here does not share its GIL) fed as
    fast as it answers; the process's CPU per request and per row."""
    runtime = tempfile.mkdtemp(prefix="rnnserve-engine-")
    address, repository = f"{runtime}/engine-0.sock", Path(runtime) / "repo"
    repository.mkdir()
    name = model_dir.parent.name
    (repository / name).symlink_to(model_dir.parent.resolve())
    engine = multiprocessing.get_context("spawn").Process(target=engine_without_inference, args=(repository, address),
                                                          daemon=True)
    engine.start()
    wire = Wire(address)
    wire.send(encode([Hello()]))
    catalog = next(m for m in decode_replies(wire.recv()) if isinstance(m, Catalog))
    version, out = catalog.models[0].version, {}
    try:
        for workload, per_request, in_flight in POINTS:
            stream = rows[workload]
            texts_of = lambda i: stream[i * per_request % (len(stream) - per_request):][:per_request]
            sent = done = 0
            started, cpu0 = time.perf_counter(), process_cpu_s(engine.pid)
            while time.perf_counter() - started < seconds:
                more = in_flight - (sent - done)  # as many as were answered: one frame, as a front-end sends
                if more:
                    wire.send(encode([request(i, name, version, texts_of(i)) for i in range(sent, sent + more)]))
                    sent += more
                done += answered(wire.recv())
            while done < sent:
                done += answered(wire.recv())
            wall, cpu = time.perf_counter() - started, process_cpu_s(engine.pid) - cpu0
            out[f"{workload}|{per_request}"] = {
                "requests": done, "requests_per_s": done / wall,
                "engine_us_per_request": 1e6 * cpu / done, "engine_us_per_row": 1e6 * cpu / (done * per_request)}
            print(f"engine alone, {workload} texts, {per_request:2d} per request: {done / wall:8.0f} req/s, "
                  f"engine CPU {1e6 * cpu / done:7.1f} us per request, {1e6 * cpu / (done * per_request):6.2f} "
                  "us per row")
    finally:
        wire.close()
        engine.terminate()
        engine.join(10)
    return out


def tiny_model(model_dir: Path, folder: Path) -> Path:
    """An untrained 8-unit GRU with the model's vocabulary, tokenizer and labels, reading the first
    TINY_MAX_LEN tokens, exported."""
    import torch  # training-side code, only for making this model
    from export.repository import export_run
    from models.checkpoint import save_run
    from models.rnn import ModelConfig, build
    version = read_version(model_dir)
    torch.manual_seed(0)
    m = version.manifest
    model = build(ModelConfig("classifier", "gru", len(version.codec.vocab), len(m.labels), embed_dim=8, hidden_size=8))
    save_run(folder / "run", model, version.codec.tokenizer, version.codec.vocab, m.labels, TINY_MAX_LEN,
             {"note": "untrained: a model whose compute is negligible"}, {"data": "none"})
    return export_run(folder / "run", folder / "repo", name="tiny", cases=5)


def whole_stack(model_dir: Path, stream: dict[str, list[str]], seconds: float, repeats: int, out: Path) -> dict:
    """Each server started once; every point measured on each in turn, --repeats times; the medians."""
    tiny = tiny_model(model_dir, out / "tiny")
    serve = [sys.executable, "-m", "serving", "--host", "127.0.0.1"]
    commands = {name: (serve + ["--workers", workers, "--engines", engines],
                       {"RNNSERVE_REPOSITORY": str(tiny.parent.parent)}, "/v2/health/ready")
                for name, (workers, engines) in LAYOUTS.items()}
    commands[MINIMAL] = ([sys.executable, "-m", "uvicorn", "loadtest.baselines.minimal_app:app", "--workers", "2",
                          "--log-level", "warning"], {"MODEL_DIR": str(tiny)}, "/docs")
    servers = {}
    try:
        for name, (command, env, ready) in commands.items():
            port = free_port()
            servers[name] = start(name, command + ["--port", str(port)], env, port, ready), port
        rounds = {}
        for _ in range(repeats):
            for per_request, users in STACK_POINTS:
                requests = [("/v1/models/tiny:predict", predict_body(*stream["short"][i: i + per_request]))
                            for i in range(0, len(stream["short"]) - per_request + 1, per_request)]
                for name, (server, port) in servers.items():
                    point = measure(server.pid, port, requests, users, seconds, 1, per_request)
                    rounds.setdefault(f"{name}|{per_request}", []).append(point)
                    print(f"{name:22s} {per_request:2d} texts, {users} users: {point['requests_per_s']:7.0f} req/s, "
                          f"p50 {point['p50_ms']:.1f} ms, CPU {1000 * point['server_cpu_s_per_1000']:.0f} us/request, "
                          f"{point['errors']} errors")
    finally:
        for server, _ in servers.values():
            server.terminate()
            server.wait(30)
    return {key: median_point(points) for key, points in rounds.items()}


def engine(args) -> dict:
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = latest(args.repository, args.model)
    codec = read_version(model_dir).codec
    stream = {w: texts(w, 800, seed=5) for w in ("short", "long")}
    rows = {w: [codec.encode(t)[0] for t in stream[w]] for w in stream}
    results = {"machine": cpu_name(), "model": args.model, "date": time.strftime("%Y-%m-%d %H:%M"),
               "engine_alone": host_cost(model_dir, rows, args.seconds)}
    if args.stack:
        results["whole_stack"] = whole_stack(model_dir, stream, args.seconds, args.repeats, args.out)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(markdown(results))
    print(markdown(results))
    return results


def markdown(r: dict) -> str:
    lines = [f"{r['machine']}; {r['date']}; --model {r['model']} (its codec; the engine's call returns zeros).", "",
             "| engine alone | req/s | engine CPU us per request | us per row |", "|---|---|---|---|"]
    for key, p in r["engine_alone"].items():
        workload, n = key.split("|")
        lines.append(f"| {workload} texts, {n} per request | {p['requests_per_s']:.0f} | "
                     f"{p['engine_us_per_request']:.1f} | {p['engine_us_per_row']:.2f} |")
    if "whole_stack" in r:
        s = r["whole_stack"]
        lines += ["", f"An 8-unit GRU over {TINY_MAX_LEN} tokens, one load process; medians of "
                  f"{s[MINIMAL + '|1']['repeats']} interleaved rounds:", "",
                  "| texts per request, users | server | req/s | ratio to the minimal app | CPU us per request | p50 ms |",
                  "|---|---|---|---|---|---|"]
        for n, users in STACK_POINTS:
            theirs = s[f"{MINIMAL}|{n}"]["requests_per_s"]
            for name in [*LAYOUTS, MINIMAL]:
                p = s[f"{name}|{n}"]
                lines.append(f"| {n}, {users} | {name} | {p['requests_per_s']:.0f} | {p['requests_per_s'] / theirs:.2f}x | "
                             f"{1000 * p['server_cpu_s_per_1000']:.0f} | {p['p50_ms']:.1f} |")
    return "\n".join(lines) + "\n"
