"""The benchmark harness: rnnserve against its in-process ceiling and two naive baselines.

    python -m loadtest bench --model imdb-bilstm --lm timemachine-gru    # or: make bench
        [--provider cpu|cuda] [--users 1,16,64] [--texts 1,32] [--client-procs N]
        [--seconds 6] [--repeats 2] [--server-env RNNSERVE_X=V ...] [--compare ../other-checkout]

In one run, on one machine, with one model and one seeded request stream per workload
(short: 16-128 words of an IMDB test review; long: whole reviews, cut at the model's max_len):
1. the ceiling on the provider: ONNX Runtime in this process at --ceiling-batches, with and
   without I/O binding (one thread and every core on the CPU), and PyTorch eager (packed
   sequences) on the same device;
2. the naive baselines (loadtest/baselines/) on the provider: FastAPI + ONNX Runtime and
   FastAPI + PyTorch, each running every text alone;
3. rnnserve (python -m serving) at every --users and --texts per request, and with --compare
   another checkout's python -m serving (its own model_repository) on the same points;
4. streaming generation (the LM) at 1, 8 and 64 streams;
and a Locust run of one point, to check that the asyncio client is not the limit. Points are
interleaved across stacks and repeated; medians are reported. For every point the CPU used by
rnnserve's HTTP front-ends and by its engines (per request), by the load generator and by
everything else is read from /proc. Writes results.json, results.md and latency_throughput.png.
"""
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from core.codec import pad
from core.repository import ServingConfig, latest, read_version
from loadtest.client import load_in_processes
from loadtest.headless import run_locust
from loadtest.plot import plot
from loadtest.report import WORKLOADS, markdown
from loadtest.servers import cpu_by_role, cpu_name, free_port, machine_busy_s, start
from loadtest.workloads import PROMPTS, predict_body, texts, token_rows
from serving.engine import devices
from serving.engine.runner import open_session
from serving.common.settings import Settings

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def numbers(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def engine_session(graph: bytes, provider: str, threads: int) -> ort.InferenceSession:
    """A session opened as an engine opens it (options, provider options and their defaults), on
    the provider asked for, with `threads` intra-op threads."""
    if provider == "cuda":
        devices.prepare_cuda()
    settings = Settings(providers=PROVIDERS[provider], intra_op_threads=threads, provider_options={}, spin_wait=False)
    return open_session(graph, settings, ServingConfig(), 0)


def ceiling(graph: bytes, rows: list[list[int]], provider: str, batches: list[int], seconds: float,
            threads: int) -> dict:
    """In-process ONNX Runtime: sequences/s and ms per call at each batch size, with session.run
    and with I/O binding (inputs bound from the host, logits copied back once)."""
    session = engine_session(graph, provider, threads)

    def bound(feeds):
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output("logits", "cpu")
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    out = {}
    for mode, call in (("run", lambda feeds: session.run(["logits"], feeds)), ("iobinding", bound)):
        for batch in batches:
            calls, done, started, i = [], 0, time.perf_counter(), 0
            while time.perf_counter() - started < seconds or not calls:
                ids, lengths = pad([rows[(i + k) % len(rows)] for k in range(batch)])
                i += batch
                t = time.perf_counter()
                call({"input_ids": ids, "lengths": lengths})
                calls.append(time.perf_counter() - t)
                done += batch
            out[f"{mode}|{batch}"] = {"sequences_per_s": done / (time.perf_counter() - started),
                                      "ms_per_call_p50": 1000 * statistics.median(calls)}
    return out


def generation_ceiling(graph: bytes, state: dict, provider: str, batches: list[int], seconds: float) -> dict:
    """In-process greedy decoding with one ONNX Runtime thread, the state copied through the host
    each step (what the engine's loop does, without HTTP or sampling): tokens/s per batch."""
    session = engine_session(graph, provider, 1)
    out = {}
    for batch in batches:
        tokens = np.full((batch, 1), 2, np.int64)
        lengths = np.ones(batch, np.int64)
        states = {name: np.zeros((state["layers"], batch, state["hidden_size"]), np.float32) for name in state["inputs"]}
        steps, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds or not steps:
            logits, *new = session.run(None, {"input_ids": tokens, "lengths": lengths, **states})
            tokens = logits[:, -1].argmax(axis=1)[:, None].astype(np.int64)
            states = dict(zip(state["inputs"], new))
            steps += 1
        elapsed = time.perf_counter() - started
        out[str(batch)] = {"tokens_per_s": batch * steps / elapsed, "ms_per_step": 1000 * elapsed / steps}
    return out


def torch_ceiling(run: Path, rows: list[list[int]], provider: str, batches: list[int], seconds: float) -> dict:
    """PyTorch eager with packed sequences on the same device, in a subprocess (this one imports
    no PyTorch): sequences/s per batch size."""
    code = ("import json, sys, time, torch; from pathlib import Path; from core.codec import pad; "
            "from models.checkpoint import load_run; torch.set_flush_denormal(True); "
            "a = json.loads(sys.stdin.read()); device = torch.device(a['device']); "
            "model = load_run(Path(a['run']))[0].to(device); out = {}\n"
            "for b in a['batches']:\n"
            "    n, i, t0 = 0, 0, time.perf_counter()\n"
            "    while time.perf_counter() - t0 < a['seconds'] or not n:\n"
            "        ids, lengths = pad([a['rows'][(i + k) % len(a['rows'])] for k in range(b)]); i += b\n"
            "        with torch.no_grad(): model(torch.from_numpy(ids).to(device), torch.from_numpy(lengths))\n"
            "        n += b\n"
            "    if device.type == 'cuda': torch.cuda.synchronize()\n"
            "    out[str(b)] = {'sequences_per_s': n / (time.perf_counter() - t0)}\n"
            "print(json.dumps(out))")
    request = {"run": str(run), "rows": rows, "batches": batches, "seconds": seconds, "device": provider}
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(request), capture_output=True, text=True)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.splitlines()[-1])


def measure(pid: int, port: int, requests, users: int, seconds: float, client_procs: int, texts_per_request: int,
            load=load_in_processes) -> dict:
    """One point: `users` sending `requests` for `seconds` through `load` (the asyncio HTTP client,
    or loadtest/protocols.py's gRPC one), with the CPU each role of the server used."""
    roles0, busy0 = cpu_by_role(pid), machine_busy_s()
    result = load("127.0.0.1", port, requests, users, seconds, client_procs)
    roles, busy = cpu_by_role(pid), machine_busy_s() - busy0
    frontend, engine = (roles[r] - roles0[r] for r in ("frontend", "engine"))
    n, lat = len(result.latencies_s), np.array(result.latencies_s) * 1000
    point = {"requests": n, "errors": result.errors, "requests_per_s": n / result.elapsed_s,
             "sequences_per_s": texts_per_request * n / result.elapsed_s,
             "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
             "cpu_server_s": frontend + engine, "cpu_generator_s": result.cpu_s,
             "cpu_other_s": max(0.0, busy - frontend - engine - result.cpu_s),
             "frontend_cpu_ms_per_request": 1000 * frontend / max(1, n),
             "engine_cpu_ms_per_request": 1000 * engine / max(1, n),
             "server_cpu_s_per_1000": 1000 * (frontend + engine) / max(1, n), "elapsed_s": result.elapsed_s}
    if result.first_byte_s:
        point["ttft_p50_ms"] = 1000 * statistics.median(result.first_byte_s)
    point["disturbed"] = point["cpu_other_s"] > 0.15 * result.elapsed_s  # another process took >15% of a core
    return point


def median_point(points: list[dict]) -> dict:
    keys = [k for k, v in points[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    merged = {k: statistics.median(p[k] for p in points) for k in keys}
    merged["disturbed"] = any(p["disturbed"] for p in points)
    merged["repeats"] = len(points)
    return merged


def revision(folder: Path) -> str:
    done = subprocess.run(["git", "-C", str(folder), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or folder.name


def bench(args) -> dict:
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = latest(args.repository, args.model)
    version = read_version(model_dir)
    started = time.time()
    users, per_request = numbers(args.users), numbers(args.texts)
    streams = {w: texts(w, 400, seed=1 + i) for i, w in enumerate(WORKLOADS)}
    rows = {w: token_rows(model_dir, streams[w]) for w in WORKLOADS}
    cores = len(os.sched_getaffinity(0))
    results = {"machine": {"cpu": cpu_name(), "cores": cores, "python": platform.python_version(),
                           "onnxruntime": ort.__version__, "provider": args.provider,
                           "date": time.strftime("%Y-%m-%d %H:%M")},
               "model": args.model, "lm": args.lm, "server_env": args.server_env, "users": users,
               "texts_per_request": per_request, "client_procs": args.client_procs,
               "seconds_per_point": args.seconds, "repeats": args.repeats, "ceiling": {}, "points": {}}
    threads = [1, cores] if args.provider == "cpu" else [1]
    for w in WORKLOADS:
        for n in threads:
            results["ceiling"][f"onnxruntime|{w}|{n} threads"] = ceiling(
                version.graph_bytes(), rows[w], args.provider, numbers(args.ceiling_batches), min(args.seconds, 2), n)
        results["ceiling"][f"pytorch|{w}"] = torch_ceiling(args.runs / args.model, rows[w], args.provider,
                                                           numbers(args.ceiling_batches), min(args.seconds, 2))
        print(f"ceiling {w}: " + json.dumps({k: round(v["sequences_per_s"]) for k, v in
                                            results["ceiling"][f"onnxruntime|{w}|1 threads"].items()}))
    lm = read_version(latest(args.repository, args.lm))
    results["generation_ceiling"] = generation_ceiling(lm.graph_bytes(), lm.manifest.state.model_dump(), args.provider,
                                                       numbers(args.generation_batches), min(args.seconds, 2))
    print("generation ceiling: " + json.dumps({b: round(v["tokens_per_s"]) for b, v in results["generation_ceiling"].items()}))

    stacks = {"rnnserve": ([sys.executable, "-m", "serving", "--host", "127.0.0.1"], None,
                           {"RNNSERVE_REPOSITORY": str(args.repository), "RNNSERVE_PROVIDERS": json.dumps(PROVIDERS[args.provider]),
                            **dict(kv.split("=", 1) for kv in args.server_env)}),
              "naive-onnxruntime": ([sys.executable, "-m", "uvicorn", "loadtest.baselines.ort_app:app", "--log-level",
                                     "warning"], None, {"MODEL_DIR": str(model_dir), "PROVIDER": args.provider}),
              "naive-pytorch": ([sys.executable, "-m", "uvicorn", "loadtest.baselines.torch_app:app", "--log-level",
                                 "warning"], None, {"RUN": str(args.runs / args.model), "DEVICE": args.provider})}
    if args.compare:
        other = args.compare.resolve()
        stacks[f"rnnserve@{revision(other)}"] = ([sys.executable, "-m", "serving", "--host", "127.0.0.1"], other,
                                                  {"RNNSERVE_REPOSITORY": str(other / "model_repository"),
                                                   "PYTHONPATH": str(other)})
    ports, procs = {}, {}
    try:
        for name, (command, cwd, env) in stacks.items():
            ports[name] = free_port()
            ready = "/v2/health/ready" if name.startswith("rnnserve") else "/docs"
            procs[name] = start(name, command + ["--port", str(ports[name])], env, ports[name], ready, cwd)
        plan = [(stack, w, n, u) for w in WORKLOADS for n in per_request for stack in stacks
                for u in (users if stack.startswith("rnnserve") else
                          (users[0], users[-1]) if stack == "naive-onnxruntime" else users[-1:])]
        raw: dict[str, list] = {}
        for _ in range(args.repeats):  # interleaved: every stack once per round
            for stack, w, n, u in plan:
                requests = [(f"/v1/models/{args.model}:predict", predict_body(*streams[w][i: i + n]))
                            for i in range(0, len(streams[w]) - n + 1, n)]
                point = measure(procs[stack].pid, ports[stack], requests, u, args.seconds, args.client_procs, n)
                raw.setdefault(f"{stack}|{w}|{n}|{u}", []).append(point)
                print(f"{stack:18s} {w:5s} {n:2d} texts {u:4d} users: {point['requests_per_s']:8.1f} req/s "
                      f"p50 {point['p50_ms']:7.1f} ms p99 {point['p99_ms']:7.1f} ms, CPU ms/req front-end "
                      f"{point['frontend_cpu_ms_per_request']:.3f} engine {point['engine_cpu_ms_per_request']:.3f}"
                      f"{'  (disturbed)' if point['disturbed'] else ''}")
            for streams_n in numbers(args.streams):
                point = generation_point(procs["rnnserve"].pid, ports["rnnserve"], args.lm, streams_n, args.seconds,
                                         args.client_procs)
                raw.setdefault(f"generate|stream|1|{streams_n}", []).append(point)
                print(f"generate {streams_n:2d} streams: {point['tokens_per_s']:7.0f} tokens/s, "
                      f"time to first token p50 {point['ttft_p50_ms']:.1f} ms")
        results["points"] = {k: median_point(v) for k, v in raw.items()}
        results["raw"] = raw
        one = f"rnnserve|short|{per_request[0]}|{users[-1]}"
        results["locust_check"] = locust_check(ports["rnnserve"], args, results["points"][one], users[-1])
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(30)
    results["wall_s"] = round(time.time() - started, 1)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (args.out / "results.md").write_text(table)
    plot(results, args.out / "latency_throughput.png")
    print(table)
    return results


def generation_point(pid: int, port: int, lm: str, streams: int, seconds: float, client_procs: int,
                     front: str = "generate") -> dict:
    """`streams` streams of 100 sampled tokens each, one after another per stream, through `front`
    (generation_requests); tokens/s, and the front-end's CPU per token."""
    point = measure(pid, port, generation_requests(front, lm), streams, seconds, client_procs, 1)
    point["tokens_per_s"] = 100 * point["requests"] / point["elapsed_s"]
    point["frontend_cpu_us_per_token"] = 10 * point["frontend_cpu_ms_per_request"]
    return point


def generation_requests(front: str, lm: str, max_tokens: int = 100) -> list[tuple[str, bytes]]:
    """The same 64 streamed generations (prompt, seed, length) as :generate's bodies, or as OpenAI's
    completions (front "openai")."""
    if front == "openai":
        return [("/openai/v1/completions", json.dumps({"model": lm, "prompt": PROMPTS[i % len(PROMPTS)],
                                                       "max_tokens": max_tokens, "seed": i, "stream": True}).encode())
                for i in range(64)]
    return [(f"/v1/models/{lm}:generate", json.dumps({"prompt": PROMPTS[i % len(PROMPTS)], "max_new_tokens": max_tokens,
                                                      "seed": i, "stream": True}).encode()) for i in range(64)]


def locust_check(port: int, args, asyncio_point: dict, users: int) -> dict:
    os.environ.update({"RNNSERVE_LOADTEST_MODEL": args.model, "RNNSERVE_LOADTEST_WORKLOAD": "short"})
    summary = run_locust(f"http://127.0.0.1:{port}", users, users, f"{max(5, int(args.seconds) + 2)}s", "predict",
                         args.out / "locust")
    locust = summary["endpoints"].get("v1 predict", {"requests_per_s": 0.0, "p50_ms": 0.0, "p99_ms": 0.0})
    return {"users": users, "locust_requests_per_s": locust["requests_per_s"], "locust_p50_ms": locust["p50_ms"],
            "locust_p99_ms": locust["p99_ms"], "asyncio_requests_per_s": asyncio_point["requests_per_s"]}
