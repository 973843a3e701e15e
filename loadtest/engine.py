"""What the engine's host work costs, and the whole stack's, when the model's compute is nothing.

    python -m loadtest engine [--model imdb-gru --repository model_repository] [--seconds 5]

1. The engine alone: the engine in a process of its own serving --model, its ONNX Runtime call
   replaced by one that returns zeros (no inference: what is left is the host's work: take,
   decode, queue, pad, split, answer), fed over its Unix socket by a driver here as fast as it
   answers: requests of 1 text (64 in flight) and of 32 texts (16 in flight), short and long IMDB
   texts encoded with the model's codec. Reported: the engine process's CPU (from /proc) per
   request and per row, with the server's default settings for the CPU.
2. The whole stack with a model of 8 GRU units (compute next to nothing; --model's vocabulary and
   tokenizer): python -m serving with one front-end and one engine, against a minimal FastAPI app
   with two workers that parses the same body, tokenizes, encodes and answers JSON with no model
   (loadtest/baselines/minimal_app.py); one load-generator process; 1 text at 64 users and 32 texts
   at 16 users. Reported: requests/s of each and the ratio.
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
from loadtest.bench import measure
from loadtest.servers import cpu_name, free_port, start
from loadtest.workloads import predict_body, texts
from loadtest.wire import Wire
from serving.common.messages import Catalog, Failed, Hello, Infer, Result, Results, Rows, decode_replies, encode
from serving.common.settings import Settings
from serving.engine.engine import Engine
from serving.engine.runner import Runner

TICK = 100  # os.sysconf("SC_CLK_TCK") on Linux
POINTS = [("short", 1, 64), ("short", 32, 16), ("long", 1, 64), ("long", 32, 16)]  # workload, texts, in flight


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
    """An untrained 8-unit GRU with the model's vocabulary, tokenizer and labels, exported."""
    import torch  # training-side code, only for making this model
    from export.repository import export_run
    from models.checkpoint import save_run
    from models.rnn import ModelConfig, build
    version = read_version(model_dir)
    torch.manual_seed(0)
    m = version.manifest
    model = build(ModelConfig("classifier", "gru", len(version.codec.vocab), len(m.labels), embed_dim=8, hidden_size=8))
    save_run(folder / "run", model, version.codec.tokenizer, version.codec.vocab, m.labels, m.max_len,
             {"note": "untrained: a model whose compute is negligible"}, {"data": "none"})
    return export_run(folder / "run", folder / "repo", name="tiny", cases=5)


def whole_stack(model_dir: Path, stream: dict[str, list[str]], seconds: float, out: Path) -> dict:
    tiny = tiny_model(model_dir, out / "tiny")
    servers = {"rnnserve": ([sys.executable, "-m", "serving", "--host", "127.0.0.1", "--workers", "1", "--engines", "1"],
                            {"RNNSERVE_REPOSITORY": str(tiny.parent.parent)}, "/v2/health/ready"),
               "minimal FastAPI app": ([sys.executable, "-m", "uvicorn", "loadtest.baselines.minimal_app:app",
                                       "--workers", "2", "--log-level", "warning"], {"MODEL_DIR": str(tiny)}, "/docs")}
    points = {}
    for name, (command, env, ready) in servers.items():
        port = free_port()
        server = start(name, command + ["--port", str(port)], env, port, ready)
        try:
            for per_request, users in ((1, 64), (32, 16)):
                texts_ = stream["short"]
                requests = [("/v1/models/tiny:predict", predict_body(*texts_[i: i + per_request]))
                            for i in range(0, len(texts_) - per_request + 1, per_request)]
                point = measure(server.pid, port, requests, users, seconds, 1, per_request)
                points[f"{name}|{per_request}"] = point
                print(f"{name:20s} {per_request:2d} texts, {users} users: {point['requests_per_s']:7.0f} req/s, "
                      f"p50 {point['p50_ms']:.1f} ms, p99 {point['p99_ms']:.1f} ms, {point['errors']} errors")
        finally:
            server.terminate()
            server.wait(30)
    return points


def engine(args) -> dict:
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = latest(args.repository, args.model)
    codec = read_version(model_dir).codec
    stream = {w: texts(w, 800, seed=5) for w in ("short", "long")}
    rows = {w: [codec.encode(t)[0] for t in stream[w]] for w in stream}
    results = {"machine": cpu_name(), "model": args.model, "date": time.strftime("%Y-%m-%d %H:%M"),
               "engine_alone": host_cost(model_dir, rows, args.seconds)}
    if args.stack:
        results["whole_stack"] = whole_stack(model_dir, stream, args.seconds, args.out)
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
        lines += ["", "| 8-unit GRU, one load process | rnnserve req/s | minimal FastAPI app req/s | ratio |",
                  "|---|---|---|---|"]
        for n, users in ((1, 64), (32, 16)):
            ours, theirs = s[f"rnnserve|{n}"], s[f"minimal FastAPI app|{n}"]
            lines.append(f"| {n} text(s) per request, {users} users | {ours['requests_per_s']:.0f} | "
                         f"{theirs['requests_per_s']:.0f} | {ours['requests_per_s'] / theirs['requests_per_s']:.2f}x |")
    return "\n".join(lines) + "\n"
