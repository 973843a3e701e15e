"""The soak benchmark: steady load for minutes, with the server's memory sampled as it goes.

    python -m loadtest soak --model imdb-gru --minutes 10 --users 32 [--reload-every-s 60]

Starts `python -m serving` (default settings) over --repository, sends the seeded short IMDB
stream from --users keep-alive connections without pause, and every --window-s records
requests/s, p50/p99, errors and the resident memory (RSS) of the server's processes. Every
--reload-every-s it also reloads the model through the model-control API, so a leak in
swapping versions would show too. Not in CI: it takes minutes. Writes soak.json and soak.md.
"""
import asyncio
import json
import sys
import time
import urllib.request

import numpy as np

from loadtest.servers import cpu_name, free_port, rss_mb, start
from loadtest.client import load
from loadtest.workloads import predict_body, texts


def reload(port: int, model: str) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/repository/models/{model}/load", method="POST")
    with urllib.request.urlopen(request, timeout=60) as r:
        return r.status


def soak(args) -> dict:
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [sys.executable, "-m", "serving", "--repository", str(args.repository), "--host", "127.0.0.1",
               "--port", str(port)]
    server = start("rnnserve", command, {"RNNSERVE_CONTROL": "open"}, port, "/v2/health/ready")  # reloads
    requests = [(f"/v1/models/{args.model}:predict", predict_body(t)) for t in texts("short", 2000)]
    windows, reloads, started = [], 0, time.perf_counter()
    next_reload = started + args.reload_every_s if args.reload_every_s else float("inf")
    try:
        rss_start = rss_mb(server.pid)
        print(f"server RSS at start: {rss_start:.0f} MB")
        while time.perf_counter() - started < args.minutes * 60:
            if time.perf_counter() >= next_reload:
                if reload(port, args.model) != 200:
                    raise RuntimeError(f"reloading {args.model} failed")
                reloads += 1
                next_reload += args.reload_every_s
            result = asyncio.run(load("127.0.0.1", port, requests, args.users, args.window_s))
            lat = np.array(result.latencies_s) * 1000
            window = {"minute": round((time.perf_counter() - started) / 60, 2), "requests": len(lat),
                      "requests_per_s": len(lat) / result.elapsed_s, "p50_ms": float(np.percentile(lat, 50)),
                      "p99_ms": float(np.percentile(lat, 99)), "errors": result.errors,
                      "statuses": result.statuses, "rss_mb": rss_mb(server.pid), "reloads": reloads}
            windows.append(window)
            print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in window.items()))
    finally:
        server.terminate()
        server.wait(60)
    report = {"model": args.model, "users": args.users, "minutes": args.minutes, "cpu": cpu_name(),
              "rss_start_mb": rss_start, "rss_end_mb": windows[-1]["rss_mb"],
              "rss_max_mb": max(w["rss_mb"] for w in windows), "requests": sum(w["requests"] for w in windows),
              "errors": sum(w["errors"] for w in windows), "reloads": reloads, "windows": windows}
    (args.out / "soak.json").write_text(json.dumps(report, indent=2))
    (args.out / "soak.md").write_text(markdown(report))
    print(markdown(report))
    return report


def markdown(r: dict) -> str:
    first, last = r["windows"][0], r["windows"][-1]
    lines = [f"Soak: {r['model']}, {r['users']} users, {r['minutes']} min, {r['cpu']}; "
             f"{r['requests']} requests, {r['errors']} errors, {r['reloads']} reloads under load.",
             f"Server RSS (all processes): {r['rss_start_mb']:.0f} MB at start, {first['rss_mb']:.0f} MB after the "
             f"first window, {r['rss_max_mb']:.0f} MB max, {r['rss_end_mb']:.0f} MB at the end.", "",
             "| minute | requests/s | p50 ms | p99 ms | errors | RSS MB |", "|---|---|---|---|---|---|"]
    lines += [f"| {w['minute']:.1f} | {w['requests_per_s']:.0f} | {w['p50_ms']:.1f} | {w['p99_ms']:.1f} | "
              f"{w['errors']} | {w['rss_mb']:.0f} |" for w in r["windows"]]
    return "\n".join(lines) + f"\n\nLast window: {last['requests_per_s']:.0f} requests/s, p99 {last['p99_ms']:.1f} ms.\n"
