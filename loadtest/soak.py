"""The soak benchmark: minutes of mixed load through every process of the server, with swaps and
a killed engine, and every process's memory sampled as it goes.

    python -m loadtest soak --model imdb-gru --lm timemachine-gru --minutes 10 [--users 32]
        [--reload-every-s 60] [--kill-engine-at 0.5]

Starts `python -m serving` (default settings, model control open) over --repository and, window
after window (--window-s), sends at once: the seeded short IMDB stream to --model from --users
keep-alive connections, streamed generations of 100 tokens to --lm from a quarter as many, and
sequence sessions (open, three steps, close) from a quarter as many. Every --reload-every-s,
between two windows (no load running), it swaps --model and --lm in (a load call: the version is
read, warmed and swapped in on every engine); at --kill-engine-at of the run, halfway through a
window (under load), it SIGKILLs engine 0, which the server restarts.
Each window records, per kind of request, the requests sent and answered (an answer is any HTTP
status; a request without one, such as a reset connection or a timeout, is lost), the statuses,
requests/s, p50/p99, and each process's resident memory (RSS). Not in CI: it takes minutes.
Writes soak.json and soak.md.
"""
import asyncio
import json
import os
import signal
import sys
import threading
import time
import urllib.request

import httpx
import numpy as np

from loadtest.client import LoadResult, load
from loadtest.servers import cpu_name, free_port, processes, start
from loadtest.workloads import PROMPTS, predict_body, texts


def reload(port: int, model: str) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/repository/models/{model}/load", method="POST")
    with urllib.request.urlopen(request, timeout=120) as r:
        return r.status


async def sessions(port: int, lm: str, users: int, duration_s: float) -> LoadResult:
    """`users` loops of: open a session, three steps, close it; each call counted as a request."""
    result, base = LoadResult(), f"http://127.0.0.1:{port}/v1/models/{lm}/sessions"
    deadline = time.perf_counter() + duration_s

    async def call(client, method: str, url: str, **kw) -> httpx.Response | None:
        sent_at = time.perf_counter()
        try:
            r = await client.request(method, url, **kw)
        except httpx.HTTPError:
            result.lost += 1
            return None
        result.latencies_s.append(time.perf_counter() - sent_at)
        result.statuses[r.status_code] = result.statuses.get(r.status_code, 0) + 1
        result.errors += r.status_code not in (200,)
        return r

    async def user(i: int):
        async with httpx.AsyncClient(timeout=60) as client:
            while time.perf_counter() < deadline:
                opened = await call(client, "POST", base)
                if opened is None or opened.status_code != 200:
                    await asyncio.sleep(0.1)
                    continue
                sid = opened.json()["session_id"]
                for step in PROMPTS[i % len(PROMPTS)].split() + ["time"]:
                    await call(client, "POST", f"{base}/{sid}:step", json={"text": step + " "})
                await call(client, "DELETE", f"{base}/{sid}")

    started = time.perf_counter()
    await asyncio.gather(*(user(i) for i in range(users)))
    result.elapsed_s = time.perf_counter() - started
    return result


async def window(port: int, args, predicts: list, generations: list) -> dict[str, LoadResult]:
    few = max(1, args.users // 4)
    results = await asyncio.gather(load("127.0.0.1", port, predicts, args.users, args.window_s),
                                   load("127.0.0.1", port, generations, few, args.window_s),
                                   sessions(port, args.lm, few, args.window_s))
    return dict(zip(("predict", "generate", "session"), results))


def summary(result: LoadResult) -> dict:
    lat = np.array(result.latencies_s or [0.0]) * 1000
    return {"answered": len(result.latencies_s), "lost": result.lost, "errors": result.errors,
            "statuses": {str(k): v for k, v in result.statuses.items()},
            "requests_per_s": len(result.latencies_s) / max(result.elapsed_s, 1e-9),
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


def soak(args) -> dict:
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [sys.executable, "-m", "serving", "--repository", str(args.repository), "--host", "127.0.0.1",
               "--port", str(port)]
    server = start("rnnserve", command, {"RNNSERVE_CONTROL": "open"}, port, "/v2/health/ready")
    predicts = [(f"/v1/models/{args.model}:predict", predict_body(t)) for t in texts("short", 2000)]
    generations = [(f"/v1/models/{args.lm}:generate", json.dumps({
        "prompt": PROMPTS[i % len(PROMPTS)], "max_new_tokens": 100, "seed": i, "stream": True}).encode())
        for i in range(64)]
    windows, reloads, killed, started = [], 0, None, time.perf_counter()
    next_reload = started + args.reload_every_s if args.reload_every_s else float("inf")
    kill_at = started + args.kill_engine_at * args.minutes * 60 if args.kill_engine_at else float("inf")
    try:
        while time.perf_counter() - started < args.minutes * 60:
            if time.perf_counter() >= next_reload:
                for model in (args.model, args.lm):
                    if reload(port, model) != 200:
                        raise RuntimeError(f"reloading {model} failed")
                reloads += 1
                next_reload += args.reload_every_s
            if killed is None and time.perf_counter() >= kill_at:  # halfway through this window, under load
                killed = next(pid for pid, p in processes(server.pid).items() if p["role"] == "engine 0")
                threading.Timer(args.window_s / 2, os.kill, (killed, signal.SIGKILL)).start()
                print(f"killing engine 0 (pid {killed}) {args.window_s / 2:g} s into the next window")
            results = asyncio.run(window(port, args, predicts, generations))
            row = {"minute": round((time.perf_counter() - started) / 60, 2), "reloads": reloads,
                   "engine_killed": killed is not None, "kinds": {k: summary(r) for k, r in results.items()},
                   "processes": processes(server.pid)}
            windows.append(row)
            print(f"minute {row['minute']:.1f}: " + "; ".join(
                f"{k} {s['requests_per_s']:.0f}/s p99 {s['p99_ms']:.0f} ms, {s['lost']} lost, {s['statuses']}"
                for k, s in row["kinds"].items()) + " | RSS MB " + " ".join(
                f"{p['role']}={p['rss_mb']:.0f}" for p in row["processes"].values()))
    finally:
        server.terminate()
        server.wait(60)
    report = {"model": args.model, "lm": args.lm, "users": args.users, "minutes": args.minutes, "cpu": cpu_name(),
              "reloads": reloads, "killed_engine_pid": killed, "windows": windows,
              "lost": sum(s["lost"] for w in windows for s in w["kinds"].values()),
              "answered": sum(s["answered"] for w in windows for s in w["kinds"].values()),
              "rss_drift": rss_drift(windows)}
    (args.out / "soak.json").write_text(json.dumps(report, indent=2))
    (args.out / "soak.md").write_text(markdown(report))
    print(markdown(report))
    return report


def rss_drift(windows: list[dict]) -> dict[str, float]:
    """Each process's largest RSS once it has run a minute, over its RSS in the first such window."""
    born, base, drift = {}, {}, {}
    for w in windows:
        for pid, p in w["processes"].items():
            born.setdefault(pid, w["minute"])
            if w["minute"] - born[pid] >= 1.0:
                base.setdefault(pid, p["rss_mb"])
                key = f"{p['role']} (pid {pid})"
                drift[key] = max(drift.get(key, 0.0), p["rss_mb"] / base[pid])
    return drift


def markdown(r: dict) -> str:
    roles = sorted({p["role"] for w in r["windows"] for p in w["processes"].values()})
    lines = [f"Soak: {r['model']} and {r['lm']}, {r['users']} predict users (and a quarter as many streaming and "
             f"session users), {r['minutes']} min, {r['cpu']}; {r['answered']} requests answered, {r['lost']} lost, "
             f"{r['reloads']} swaps of both models between windows; engine 0 killed (pid {r['killed_engine_pid']}).",
             "Largest RSS after a process's first minute / its RSS then: " + ", ".join(
                 f"{k} {v:.3f}" for k, v in r["rss_drift"].items()) + ".", "",
             "| minute | predict/s | p99 ms | stream/s | session calls/s | non-200 | lost | "
             + " | ".join(f"{role} RSS MB" for role in roles) + " |", "|---" * (7 + len(roles)) + "|"]
    for w in r["windows"]:
        k = w["kinds"]
        rss = {p["role"]: p["rss_mb"] for p in w["processes"].values()}
        bad = sum(n for s in k.values() for status, n in s["statuses"].items() if status != "200")
        lines.append(f"| {w['minute']:.1f} | {k['predict']['requests_per_s']:.0f} | {k['predict']['p99_ms']:.0f} | "
                     f"{k['generate']['requests_per_s']:.1f} | {k['session']['requests_per_s']:.0f} | {bad} | "
                     f"{sum(s['lost'] for s in k.values())} | " + " | ".join(f"{rss.get(role, 0):.0f}" for role in roles)
                     + " |")
    return "\n".join(lines) + "\n"
