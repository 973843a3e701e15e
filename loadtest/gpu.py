"""The GPU check: what a GPU machine can show, in one command that ends within 6 minutes on 16 cores.

    python -m loadtest gpu [--repository model_repository --model imdb-gru --lm timemachine-gru]
        [--encoder NAME] [--quick] [--out results/gpu]
    python -m loadtest gpu --provider cpu --quick      # a rehearsal of the same on the CPU

1. tests/test_cuda.py on the device (trained models' logits against their graphs alone on the
   CPU, calls of 1,000+ rows, generation, sessions, a hot swap, memory after swaps);
2. the in-process ceilings on the device: ONNX Runtime at 256 to 2,048 rows per call (I/O binding),
   and the greedy step loop at 256 and 1,024 streams;
3. python -m serving on the device, sized to the machine (one engine per GPU; a third of the cores
   for the load generator's processes; the rest for front-ends), at the goals' operating points:
   one short IMDB text per request at 256 and 1,024 users, 32 texts per request at 256 users,
   streaming generation at 256 and 1,024 streams, and the encoder model at 256 users.
Writes results.md (one table: each point with its goal) and results.json under --out; exits 1 when
a test fails or a point has errors.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from core.repository import latest, model_names, read_version
from loadtest.bench import ceiling, generation_ceiling, generation_point, measure
from loadtest.servers import cpu_name, free_port, start
from loadtest.workloads import predict_body, texts, token_rows
from serving.engine import devices

ROOT = Path(__file__).resolve().parents[1]
REQUESTS, SEQUENCES, TOKENS = ("req/s", "requests_per_s"), ("sequences/s", "sequences_per_s"), ("tokens/s", "tokens_per_s")
# point -> (goal, (unit, the result's key)): the serving issues' goals on a GPU (issue 14's for the encoder model)
GOALS = {"1 text, 256 users": (40_000, REQUESTS), "1 text, 1024 users": (40_000, REQUESTS),
         "32 texts, 256 users": (100_000, SEQUENCES), "generation, 256 streams": (200_000, TOKENS),
         "generation, 1024 streams": (400_000, TOKENS), "encoder, 1 text, 256 users": (15_000, REQUESTS)}
P99_GOAL_MS = 50  # single-text requests

def gpu_here() -> str | None:
    """Why this machine cannot run the GPU check, or None."""
    if not devices.cuda_built():
        return "this ONNX Runtime has no CUDA execution provider (install onnxruntime-gpu: ../shared/GPU.md)"
    devices.prepare_cuda()
    if missing := devices.missing_libraries():
        return f"the CUDA execution provider cannot load {', '.join(missing)}"
    if not devices.visible_gpus():
        return "no GPU is visible (/dev/nvidia*)"
    return None

def run_tests(provider: str, out: Path) -> dict:
    """tests/test_cuda.py for the device (the stand-in's cases where the rehearsal runs on the CPU)."""
    chosen = "cuda" if provider == "cuda" else "stand"
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "pytest", "tests/test_cuda.py", "-p", "no:cacheprovider", "-q", "-rA",
                           "-k", chosen, "-o", "addopts="], cwd=ROOT, capture_output=True, text=True)
    (out / "test_cuda.log").write_text(done.stdout + done.stderr)
    summary = (done.stdout.strip().splitlines() or ["no output"])[-1]
    print(f"tests/test_cuda.py: {summary} ({time.time() - started:.0f} s)")
    return {"passed": done.returncode == 0, "summary": summary, "seconds": round(time.time() - started, 1)}

def encoder_model(repository: Path) -> str | None:
    """The first classifier in the repository that reads WordPiece tokens (a pretrained encoder's)."""
    for name in model_names(repository):
        manifest = read_version(latest(repository, name)).manifest
        if manifest.task == "classifier" and manifest.tokenizer.get("kind") == "wordpiece":
            return name
    return None

def gpu(args) -> dict:
    provider = args.provider
    if provider == "cuda" and (why := gpu_here()):
        sys.exit(f"python -m loadtest gpu measures a GPU, and {why}; `--provider cpu` rehearses it on the CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    engines = max(1, devices.visible_gpus()) if provider == "cuda" else 1
    client_procs = max(1, cores // 3)
    workers = max(1, cores - client_procs - engines)
    seconds = args.seconds or (3.0 if args.quick else 8.0)
    started = time.time()
    results = {"machine": {"cpu": cpu_name(), "cores": cores, "gpu": devices.gpu_name(0) if provider == "cuda" else "",
                           "provider": provider, "date": time.strftime("%Y-%m-%d %H:%M")},
               "layout": {"engines": engines, "front_ends": workers, "load_generator_processes": client_procs},
               "seconds_per_point": seconds, "points": {}}
    results["tests"] = run_tests(provider, args.out) if args.tests else {"passed": True, "summary": "not run (--no-tests)"}

    model_dir, lm_dir = latest(args.repository, args.model), latest(args.repository, args.lm)
    short = texts("short", 2048, seed=1)
    rows = token_rows(model_dir, short)
    batches = [256, 1024] if args.quick else [256, 1024, 2048]
    table = ceiling(read_version(model_dir).graph_bytes(), rows, provider, batches, min(seconds, 2), 1)
    results["ceiling"] = {str(b): table[f"iobinding|{b}"] for b in batches}
    lm = read_version(lm_dir)
    results["generation_ceiling"] = generation_ceiling(lm.graph_bytes(), lm.manifest.state.model_dump(), provider,
                                                       [256, 1024], min(seconds, 2))
    print("ceilings: " + json.dumps({b: round(v["sequences_per_s"]) for b, v in results["ceiling"].items()}) + "; "
          + json.dumps({b: round(v["tokens_per_s"]) for b, v in results["generation_ceiling"].items()}))

    encoder = args.encoder or encoder_model(args.repository)
    env = {"RNNSERVE_REPOSITORY": str(args.repository), "RNNSERVE_ENGINES": str(engines),
           "RNNSERVE_WORKERS": str(workers), "RNNSERVE_MAX_GENERATIONS": "1024",
           "RNNSERVE_PROVIDERS": json.dumps(["CPUExecutionProvider"] if provider == "cpu" else
                                            ["CUDAExecutionProvider", "CPUExecutionProvider"])}
    port = free_port()
    server = start("rnnserve", [sys.executable, "-m", "serving", "--host", "127.0.0.1", "--port", str(port)], env, port,
                   "/v2/health/ready", ROOT)
    try:
        points = [("1 text, 256 users", args.model, 1, 256), ("32 texts, 256 users", args.model, 32, 256)]
        if not args.quick:
            points.insert(1, ("1 text, 1024 users", args.model, 1, 1024))
        if encoder:
            points.append(("encoder, 1 text, 256 users", encoder, 1, 256))
        for label, model, n, users in points:
            requests = [(f"/v1/models/{model}:predict", predict_body(*short[i: i + n])) for i in range(0, len(short) - n + 1, n)]
            point = measure(server.pid, port, requests, users, seconds, client_procs, n)
            results["points"][label] = point | {"model": model}
            print(f"{label}: {point['requests_per_s']:.0f} req/s, {point['sequences_per_s']:.0f} sequences/s, "
                  f"p50 {point['p50_ms']:.1f} ms, p99 {point['p99_ms']:.1f} ms, {point['errors']} errors")
        for streams in [256] if args.quick else [256, 1024]:
            point = generation_point(server.pid, port, args.lm, streams, seconds, client_procs)
            results["points"][f"generation, {streams} streams"] = point | {"model": args.lm}
            print(f"generation, {streams} streams: {point['tokens_per_s']:.0f} tokens/s, time to first token p50 "
                  f"{point['ttft_p50_ms']:.1f} ms, {point['errors']} errors")
    finally:
        server.terminate()
        server.wait(30)
    results["encoder"] = encoder or "none in the repository"
    results["wall_s"] = round(time.time() - started, 1)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(markdown(results))
    print(markdown(results))
    if failed(results):
        sys.exit(1)
    return results

def markdown(r: dict) -> str:
    m, lay = r["machine"], r["layout"]
    lines = [f"Machine: {m['gpu'] or 'no GPU'} ({m['provider']}), {m['cpu']}, {m['cores']} cores; {m['date']}. "
             f"python -m serving with {lay['engines']} engine(s) and {lay['front_ends']} front-ends; the load from "
             f"{lay['load_generator_processes']} processes; {r['seconds_per_point']} s per point. "
             f"tests/test_cuda.py: {r['tests']['summary']}.", "",
             "| point | model | result | p50 ms | p99 ms | errors | goal | met |", "|---|---|---|---|---|---|---|---|"]
    for label, p in r["points"].items():
        goal, (unit, key) = GOALS[label]
        got = p[key]
        met = got >= goal and (not label.startswith("1 text") or p["p99_ms"] <= P99_GOAL_MS)
        goal_text = f"{goal:,} {unit}" + (f", p99 <= {P99_GOAL_MS} ms" if label.startswith("1 text") else "")
        lines.append(f"| {label} | {p['model']} | {got:,.0f} {unit} | {p['p50_ms']:.1f} | {p['p99_ms']:.1f} | "
                     f"{p['errors']} | {goal_text} | {'yes' if met else 'no'} |")
    lines += ["", "| in-process ceiling | " + " | ".join(f"{b} rows" for b in r["ceiling"]) + " |",
              "|---|" + "---|" * len(r["ceiling"]),
              "| ONNX Runtime, I/O binding, sequences/s (ms per call) | " + " | ".join(
                  f"{v['sequences_per_s']:,.0f} ({v['ms_per_call_p50']:.2f})" for v in r["ceiling"].values()) + " |",
              "| greedy step loop, tokens/s (ms per step) | " + " | ".join(
                  f"{r['generation_ceiling'][b]['tokens_per_s']:,.0f} ({r['generation_ceiling'][b]['ms_per_step']:.2f})"
                  if b in r["generation_ceiling"] else "" for b in r["ceiling"]) + " |",
              "", f"Encoder model: {r['encoder']}. Wall time: {r['wall_s']} s."]
    return "\n".join(lines) + "\n"

def failed(r: dict) -> bool:
    return not r["tests"]["passed"] or any(p["errors"] for p in r["points"].values())
