"""The benchmark harness: rnnserve against its in-process ceiling and two naive baselines.

    python -m loadtest bench --model imdb-bilstm --lm timemachine-gru    # or: make bench

In one run, on one machine, with one model and one seeded request stream per workload
(short: 16-128 words of an IMDB test review; long: whole reviews, cut at 256 tokens):
1. the ceiling: in-process ONNX Runtime (the server's session settings) at batch 1, 8, 32, 64;
2. the naive baselines (loadtest/baselines/): FastAPI + PyTorch, FastAPI + ONNX Runtime, once per request;
3. rnnserve at 1, 16 and 64 concurrent users;
4. generation (the LM) at 1, 8 and 64 concurrent streams;
and a Locust run of one point to check the asyncio client is not the limit. Points are
interleaved across stacks and repeated; medians are reported. For every point the CPU used by
the server, by the load generator and by everything else is read from /proc.
Writes results.json, results.md and latency_throughput.png into --out.
"""
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from core.codec import pad
from core.repository import latest, read_version
from loadtest.client import LoadResult, load
from loadtest.headless import run_locust
from loadtest.servers import cpu_name, free_port, machine_busy_s, process_cpu_s, start
from loadtest.workloads import PROMPTS, predict_body, texts, token_rows
WORKLOADS = ("short", "long")


def ceiling(model_dir: Path, rows: list[list[int]], seconds: float, threads: int) -> dict:
    """In-process ONNX Runtime: sequences/s and ms per call at batch 1, 8, 32, 64."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(read_version(model_dir).graph_bytes(), options, providers=["CPUExecutionProvider"])
    out = {}
    for batch in (1, 8, 32, 64):
        calls, done, started, i = [], 0, time.perf_counter(), 0
        while time.perf_counter() - started < seconds:
            ids, lengths = pad([rows[(i + k) % len(rows)] for k in range(batch)])
            i += batch
            t = time.perf_counter()
            session.run(None, {"input_ids": ids, "lengths": lengths})
            calls.append(time.perf_counter() - t)
            done += batch
        out[batch] = {"sequences_per_s": done / (time.perf_counter() - started),
                      "ms_per_call_p50": 1000 * statistics.median(calls)}
    return out


def measure(pid: int, host_port: int, requests, users: int, seconds: float) -> dict:
    server0, me0, busy0 = process_cpu_s(pid), time.process_time(), machine_busy_s()
    result: LoadResult = asyncio.run(load("127.0.0.1", host_port, requests, users, seconds))
    server, me, busy = process_cpu_s(pid) - server0, time.process_time() - me0, machine_busy_s() - busy0
    n, lat = len(result.latencies_s), np.array(result.latencies_s) * 1000
    point = {"requests": n, "errors": result.errors, "requests_per_s": n / result.elapsed_s,
             "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
             "cpu_server_s": server, "cpu_generator_s": me, "cpu_other_s": max(0.0, busy - server - me),
             "server_cpu_s_per_1000": 1000 * server / max(1, n), "elapsed_s": result.elapsed_s}
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


def bench(args) -> dict:
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = latest(args.repository, args.model)
    started = time.time()
    streams = {w: texts(w, 400, seed=1 + i) for i, w in enumerate(WORKLOADS)}
    rows = {w: token_rows(model_dir, streams[w]) for w in WORKLOADS}
    results = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                           "onnxruntime": ort.__version__, "date": time.strftime("%Y-%m-%d %H:%M")},
               "model": args.model, "lm": args.lm, "server_env": args.server_env,
               "seconds_per_point": args.seconds, "repeats": args.repeats,
               "ceiling": {}, "points": {}}
    cores = len(os.sched_getaffinity(0))
    for w in WORKLOADS:  # one thread (one server worker's session) and every core
        results["ceiling"][w] = ceiling(model_dir, rows[w], min(args.seconds, 3), 1)
        results["ceiling"][f"{w}, {cores} threads"] = ceiling(model_dir, rows[w], min(args.seconds, 3), cores)
        print(f"ceiling {w}: " + ", ".join(f"b{b} {v['sequences_per_s']:.0f}/s" for b, v in results["ceiling"][w].items()))

    ports = {"rnnserve": free_port(), "naive-onnxruntime": free_port(), "naive-pytorch": free_port()}
    py = sys.executable
    procs = {
        "rnnserve": start("rnnserve", [py, "-m", "serving", "--port", str(ports["rnnserve"]), "--host", "127.0.0.1"],
                          {"RNNSERVE_REPOSITORY": str(args.repository),
                           **dict(kv.split("=", 1) for kv in args.server_env)}, ports["rnnserve"], "/v2/health/ready"),
        "naive-onnxruntime": start("naive-onnxruntime", [py, "-m", "uvicorn", "loadtest.baselines.ort_app:app",
                                   "--port", str(ports["naive-onnxruntime"]), "--log-level", "warning"],
                                   {"MODEL_DIR": str(model_dir)}, ports["naive-onnxruntime"], "/docs"),
        "naive-pytorch": start("naive-pytorch", [py, "-m", "uvicorn", "loadtest.baselines.torch_app:app",
                               "--port", str(ports["naive-pytorch"]), "--log-level", "warning"],
                               {"RUN": str(args.runs / args.model)}, ports["naive-pytorch"], "/docs"),
    }
    try:
        plan = [(stack, w, users) for w in WORKLOADS for stack, users_list in
                (("rnnserve", (1, 16, 64)), ("naive-onnxruntime", (1, 64)), ("naive-pytorch", (64,)))
                for users in users_list]
        raw: dict[str, list] = {}
        for repeat in range(args.repeats):  # interleaved: every stack once per round
            for stack, w, users in plan:
                requests = [(f"/v1/models/{args.model}:predict", predict_body(t)) for t in streams[w]]
                point = measure(procs[stack].pid, ports[stack], requests, users, args.seconds)
                raw.setdefault(f"{stack}|{w}|{users}", []).append(point)
                print(f"{stack:18s} {w:5s} {users:2d} users: {point['requests_per_s']:7.1f} req/s "
                      f"p50 {point['p50_ms']:6.1f} ms p99 {point['p99_ms']:6.1f} ms"
                      f"{'  (disturbed)' if point['disturbed'] else ''}")
            for users in (1, 8, 64):
                point = generation_point(procs["rnnserve"].pid, ports["rnnserve"], args.lm, users, args.seconds)
                raw.setdefault(f"generate|stream|{users}", []).append(point)
                print(f"generate {users:2d} streams: {point['tokens_per_s']:7.0f} tokens/s, "
                      f"time to first token p50 {point['ttft_p50_ms']:.1f} ms")
        results["points"] = {k: median_point(v) for k, v in raw.items()}
        results["raw"] = raw
        results["locust_check"] = locust_check(ports["rnnserve"], args, results["points"]["rnnserve|short|64"])
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(10)
    results["wall_s"] = round(time.time() - started, 1)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (args.out / "results.md").write_text(table)
    plot(results, args.out / "latency_throughput.png")
    print(table)
    return results


def generation_point(pid: int, port: int, lm: str, streams: int, seconds: float) -> dict:
    bodies = [json.dumps({"prompt": PROMPTS[i % len(PROMPTS)], "max_new_tokens": 100, "seed": i,
                          "stream": True}).encode() for i in range(64)]
    point = measure(pid, port, [(f"/v1/models/{lm}:generate", b) for b in bodies], streams, seconds)
    point["tokens_per_s"] = 100 * point["requests"] / point["elapsed_s"]
    return point


def locust_check(port: int, args, asyncio_point: dict) -> dict:
    os.environ.update({"RNNSERVE_LOADTEST_MODEL": args.model, "RNNSERVE_LOADTEST_WORKLOAD": "short"})
    summary = run_locust(f"http://127.0.0.1:{port}", 64, 64, f"{max(5, int(args.seconds) + 2)}s", "predict", args.out / "locust")
    locust = summary["endpoints"].get("v1 predict", {"requests_per_s": 0.0, "p50_ms": 0.0, "p99_ms": 0.0})
    return {"locust_requests_per_s": locust["requests_per_s"], "locust_p50_ms": locust["p50_ms"],
            "locust_p99_ms": locust["p99_ms"], "asyncio_requests_per_s": asyncio_point["requests_per_s"]}


def markdown(r: dict) -> str:
    p, c = r["points"], r["ceiling"]
    lines = [f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores; ONNX Runtime "
             f"{r['machine']['onnxruntime']}; {r['machine']['date']}. Model {r['model']}; "
             f"{r['seconds_per_point']} s per point, median of {r['repeats']}; rnnserve settings: "
             f"{' '.join(r['server_env']) or 'defaults'}.", "",
             "| stack | workload | users | req/s | p50 ms | p99 ms | server CPU-s / 1k req | CPU server / generator / other (s) | disturbed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, v in p.items():
        if key.startswith("generate"):
            continue
        stack, w, users = key.split("|")
        lines.append(f"| {stack} | {w} | {users} | {v['requests_per_s']:.0f} | {v['p50_ms']:.1f} | {v['p99_ms']:.1f} | "
                     f"{v['server_cpu_s_per_1000']:.2f} | {v['cpu_server_s']:.1f} / {v['cpu_generator_s']:.1f} / "
                     f"{v['cpu_other_s']:.1f} | {'yes' if v['disturbed'] else 'no'} |")
    lines += ["", "| in-process ONNX Runtime | batch 1 | batch 8 | batch 32 | batch 64 |", "|---|---|---|---|---|"]
    for w in c:
        lines.append(f"| {w}: sequences/s (ms per call) | " + " | ".join(
            f"{c[w][b]['sequences_per_s']:.0f} ({c[w][b]['ms_per_call_p50']:.2f})" for b in c[w]) + " |")
    lines += ["", "| ratio | short | long |", "|---|---|---|"]
    best = {w: max(v["sequences_per_s"] for k in c if k.startswith(w) for v in c[k].values()) for w in WORKLOADS}
    for label, num, den in (("rnnserve 64 users / naive ONNX Runtime 64 users", "rnnserve|{w}|64", "naive-onnxruntime|{w}|64"),
                            ("rnnserve 64 users / naive PyTorch 64 users", "rnnserve|{w}|64", "naive-pytorch|{w}|64")):
        lines.append(f"| {label} (req/s) | " + " | ".join(
            f"{p[num.format(w=w)]['requests_per_s'] / p[den.format(w=w)]['requests_per_s']:.2f}x" for w in WORKLOADS) + " |")
    lines.append("| rnnserve 64 users / best in-process ceiling, any threads and batch (seq/s) | " + " | ".join(
        f"{p[f'rnnserve|{w}|64']['requests_per_s'] / best[w]:.2f}" for w in WORKLOADS) + " |")
    lines.append("| rnnserve 1 user p50 - in-process batch-1 call (ms) | " + " | ".join(
        f"{p[f'rnnserve|{w}|1']['p50_ms'] - c[w][1]['ms_per_call_p50']:+.2f}" for w in WORKLOADS) + " |")
    lines += ["", "| generation | streams | tokens/s | time to first token p50 ms | p50 request ms (100 tokens) |",
              "|---|---|---|---|---|"]
    for key, v in p.items():
        if key.startswith("generate"):
            lines.append(f"| {r['lm']} | {key.split('|')[2]} | {v['tokens_per_s']:.0f} | {v['ttft_p50_ms']:.1f} | "
                         f"{v['p50_ms']:.0f} |")
    if "locust_check" in r:
        lc = r["locust_check"]
        lines += ["", f"Locust check (rnnserve, short, 64 users): Locust {lc['locust_requests_per_s']:.0f} req/s "
                      f"(p50 {lc['locust_p50_ms']:.0f} ms, p99 {lc['locust_p99_ms']:.0f} ms) vs the asyncio client "
                      f"{lc['asyncio_requests_per_s']:.0f} req/s."]
    lines.append(f"\nWall time of the whole run: {r['wall_s']} s.")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, w in zip(axes, WORKLOADS):
        for stack in ("rnnserve", "naive-onnxruntime", "naive-pytorch"):
            pts = sorted((v["requests_per_s"], v["p99_ms"]) for k, v in r["points"].items()
                         if k.startswith(f"{stack}|{w}|"))
            ax.plot(*zip(*pts), marker="o", label=stack)
        best = max(v["sequences_per_s"] for k in r["ceiling"] if k.startswith(w) for v in r["ceiling"][k].values())
        ax.axvline(best, color="gray", linestyle="--", label="in-process ceiling")
        ax.set(title=f"{w} requests", xlabel="requests/s", ylabel="p99 latency (ms)", yscale="log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
