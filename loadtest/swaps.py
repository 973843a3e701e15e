"""An engine's resident memory over hot swaps, in a minute or two: the soak's RSS question alone.

    python -m loadtest swaps --model imdb-gru [--lm timemachine-gru] [--swaps 10 --every-s 3 --users 8]
        [--server-env MALLOC_ARENA_MAX=2 ...]

Starts `python -m serving` with one engine and one front-end (model control open) over
--repository, keeps --users clients sending short IMDB texts to --model (and, with --lm, a
quarter as many streaming 100-token generations) for the whole run, so that each retired version
still has work in flight, and every --every-s swaps --model (and --lm) in with a load call. After
each swap it waits until the engine logs that the retired version was released, then samples the
engine's VmRSS (/proc) every 0.1 s until the next swap. Prints a table: swap, the lowest and the
highest sample, each over the same after the first swap (the goal: within 1.10 after 10). Writes
swaps.json and swaps.md.
"""
import asyncio
import json
import sys
import threading
import time
import urllib.request
from pathlib import Path

from loadtest.client import LoadResult, load
from loadtest.servers import cpu_name, free_port, processes, start
from loadtest.workloads import PROMPTS, predict_body, texts


def load_call(port: int, model: str):
    """POST /v2/repository/models/{model}/load: the latest version read, warmed and swapped in."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/repository/models/{model}/load", method="POST")
    with urllib.request.urlopen(request, timeout=120) as r:
        if r.status != 200:
            raise RuntimeError(f"loading {model}: {r.status}")


def released(log: Path, models: list[str], swaps: int, timeout_s: float = 60) -> float:
    """Wait until the engine has logged the release of `swaps` retired versions of each model (a
    reload of the same version shows READY in the index throughout); the seconds it took."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        text = log.read_text(errors="replace")
        if all(text.count(f"released {model} version") >= swaps for model in models):
            return time.perf_counter() - started
        time.sleep(0.1)
    raise RuntimeError(f"the retired versions were not released within {timeout_s:.0f} s")


def sampled(server_pid: int, swap: int, until: float) -> dict:
    """The engine's RSS every 0.1 s until `until`: its lowest (what stays) and highest (with the
    load's batches in flight), in MB."""
    samples = []
    while not samples or time.perf_counter() < until:
        samples.append(next(p["rss_mb"] for p in processes(server_pid).values() if p["role"] == "engine 0"))
        time.sleep(0.1)
    return {"swap": swap, "floor_mb": min(samples), "peak_mb": max(samples)}


class Traffic(threading.Thread):
    """Requests without pause, in 2-second rounds, until stopped: what each swap retires under."""

    def __init__(self, port: int, args):
        super().__init__(daemon=True)
        self.port, self.stopped, self.results = port, threading.Event(), LoadResult()
        self.predicts = [(f"/v1/models/{args.model}:predict", predict_body(t)) for t in texts("short", 2000)]
        self.generations = [(f"/v1/models/{args.lm}:generate", json.dumps({
            "prompt": PROMPTS[i % len(PROMPTS)], "max_new_tokens": 100, "seed": i, "stream": True}).encode())
            for i in range(64)] if args.lm else []
        self.users = args.users

    def run(self):
        while not self.stopped.is_set():
            rounds = [load("127.0.0.1", self.port, self.predicts, self.users, 2.0)]
            if self.generations:
                rounds.append(load("127.0.0.1", self.port, self.generations, max(1, self.users // 4), 2.0))
            for r in asyncio.run(gather(rounds)):
                self.results.latencies_s += r.latencies_s
                self.results.lost += r.lost
                for status, n in r.statuses.items():
                    self.results.statuses[status] = self.results.statuses.get(status, 0) + n


async def gather(coroutines):
    return await asyncio.gather(*coroutines)


def swaps(args) -> dict:
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {"RNNSERVE_CONTROL": "open", "RNNSERVE_ENGINES": "1", "RNNSERVE_WORKERS": "1",
           **dict(kv.split("=", 1) for kv in args.server_env)}
    command = [sys.executable, "-m", "serving", "--repository", str(args.repository), "--host", "127.0.0.1",
               "--port", str(port)]
    server = start("rnnserve", command, env, port, "/v2/health/ready")
    traffic, models = Traffic(port, args), [m for m in (args.model, args.lm) if m]
    rows = []
    try:
        traffic.start()
        time.sleep(args.every_s)
        rows.append(sampled(server.pid, 0, time.perf_counter() + args.every_s))
        for swap in range(1, args.swaps + 1):
            swapped_at = time.perf_counter()
            for model in models:
                load_call(port, model)
            release_s = released(server.log_path, models, swap)
            rows.append(sampled(server.pid, swap, max(time.perf_counter() + 1.0, swapped_at + args.every_s)))
            print(f"swap {swap}: engine RSS {rows[-1]['floor_mb']:.1f}-{rows[-1]['peak_mb']:.1f} MB "
                  f"(released {release_s:.1f} s after the load call returned)")
    finally:
        traffic.stopped.set()
        traffic.join(30)
        server.terminate()
        server.wait(60)
    first = rows[min(1, len(rows) - 1)]
    report = {"model": args.model, "lm": args.lm, "users": args.users, "cpu": cpu_name(),
              "server_env": args.server_env, "rows": [r | {"floor_ratio": r["floor_mb"] / first["floor_mb"], "peak_ratio": r["peak_mb"] / first["peak_mb"]}
                                                for r in rows],
              "answered": len(traffic.results.latencies_s), "lost": traffic.results.lost,
              "statuses": {str(k): v for k, v in traffic.results.statuses.items()},
              "floor_growth": rows[-1]["floor_mb"] / first["floor_mb"],
              "peak_growth": max(r["peak_mb"] for r in rows[1:]) / first["peak_mb"]}
    (args.out / "swaps.json").write_text(json.dumps(report, indent=2))
    (args.out / "swaps.md").write_text(markdown(report))
    print(markdown(report))
    return report


def markdown(r: dict) -> str:
    lines = [f"Swaps: {r['model']}{' and ' + r['lm'] if r['lm'] else ''}, {r['users']} predict users, one engine, "
             f"{r['cpu']}; server env {' '.join(r['server_env']) or '(none)'}; {r['answered']} requests answered, "
             f"{r['lost']} lost, statuses {r['statuses']}. Engine RSS after the last swap / after the first: "
             f"{r['floor_growth']:.3f} (lowest sample), largest after any swap / after the first: "
             f"{r['peak_growth']:.3f} (highest sample).", "",
             "| swap | engine RSS MB, lowest | / swap 1 | highest | / swap 1 |", "|---|---|---|---|---|"]
    lines += [f"| {row['swap'] or 'before'} | {row['floor_mb']:.1f} | {row['floor_ratio']:.3f} | {row['peak_mb']:.1f} | "
              f"{row['peak_ratio']:.3f} |" for row in r["rows"]]
    return "\n".join(lines) + "\n"
