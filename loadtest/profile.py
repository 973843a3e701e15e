"""Where each process's time goes under load: py-spy flame graphs of the front-end and the engine.

    python -m loadtest profile [--model imdb-gru --repository model_repository] [--users 1,64] [--texts 1]
                               [--seconds 8] [--tree ../before]

python -m serving with one front-end and one engine (`--workers 1 --engines 1`: the front-end is
the server process itself), loaded by the harness's client (loadtest/client.py) with --texts short
texts per request at each --users (--tree: another checkout's python -m serving, e.g. the commit
before a change, over the same repository). While a point runs, py-spy samples the front-end
and the engine at --rate Hz without pausing them (`--nonblocking`; idle frames left out). Writes
`<role>-<users>users-<texts>texts.svg` under --out and prints each point's requests/s, p50 and each
process's CPU per request, and the functions whose own code holds the largest share of each
process's samples (read from the flame graph). Needs py-spy (the test extra).
"""
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from core.repository import latest
from loadtest.bench import measure
from loadtest.servers import cpu_name, free_port, processes, start
from loadtest.workloads import predict_body, texts

FRAME = re.compile(r'<title>(.+?) \((?:[\d,]+) samples?, [\d.]+%\)</title><rect [^>]*?y="(\d+)"[^>]*fg:x="(\d+)" fg:w="(\d+)"')


def own_shares(svg: Path, top: int) -> list[tuple[str, float]]:
    """The functions whose own code (not their callees') holds the largest shares of the samples, read
    from py-spy's flame graph: a frame's own samples are its width less its callees' (the frames
    one row below it, within its span)."""
    frames = [(name.split(" (")[0], int(y), int(x), int(w)) for name, y, x, w in FRAME.findall(svg.read_text())]
    rows = defaultdict(list)
    for name, y, x, w in frames:
        rows[y].append((x, w))
    own, total = defaultdict(int), max((w for *_, w in frames), default=1)
    for name, y, x, w in frames:
        below = sum(cw for cx, cw in rows[y + 16] if x <= cx < x + w)
        own[name] += w - below
    return [(name, 100 * n / total) for name, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]]


def titled(svg: Path, title: str):
    """The flame graph's title says what was profiled, not the command line (and paths) py-spy ran with."""
    svg.write_text(re.sub(r'(<text id="title"[^>]*>).*?(</text>)', lambda m: m[1] + title + m[2], svg.read_text(), 1))


def profile(args) -> dict:
    spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if spy is None:
        sys.exit("python -m loadtest profile needs py-spy: pip install py-spy (make install puts it in .venv)")
    args.out.mkdir(parents=True, exist_ok=True)
    model = latest(args.repository, args.model).parent.name
    port = free_port()
    server = start("rnnserve", [sys.executable, "-m", "serving", "--host", "127.0.0.1", "--port", str(port),
                                "--workers", "1", "--engines", "1"],
                   {"RNNSERVE_REPOSITORY": str(args.repository.resolve())}, port, "/v2/health/ready", cwd=args.tree)
    roles = {"front-end": server.pid,
             "engine": next(pid for pid, p in processes(server.pid).items() if p["role"] == "engine 0")}
    short = texts("short", 800, seed=5)
    n = args.texts
    requests = [(f"/v1/models/{model}:predict", predict_body(*short[i: i + n])) for i in range(0, len(short) - n + 1, n)]
    results = {"machine": cpu_name(), "model": model, "points": {}}
    try:
        measure(server.pid, port, requests, 8, 2, 1, 1)  # warm
        for users in args.users:
            spies = {role: subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", str(args.rate), "--duration",
                                             str(int(args.seconds)), "--nonblocking", "--format", "flamegraph",
                                             "--output", str(args.out / f"{role}-{users}users-{n}texts.svg")],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                     for role, pid in roles.items()}
            point = measure(server.pid, port, requests, users, args.seconds, 1, n)
            for role, process in spies.items():
                process.wait(60)
                titled(args.out / f"{role}-{users}users-{n}texts.svg", f"rnnserve's {role}, {users} user(s), {n} short "
                       f"text(s) per request ({model}): python -m loadtest profile")
            results["points"][users] = point
            print(f"\n{users} user(s): {point['requests_per_s']:.0f} req/s, p50 {point['p50_ms']:.2f} ms; CPU per "
                  f"request: front-end {1000 * point['frontend_cpu_ms_per_request']:.0f} us, engine "
                  f"{1000 * point['engine_cpu_ms_per_request']:.0f} us{' (disturbed)' if point['disturbed'] else ''}")
            for role in roles:
                svg = args.out / f"{role}-{users}users-{n}texts.svg"
                print(f"  {role} ({svg}), own samples: " + ", ".join(f"{name} {p:.1f}%" for name, p in own_shares(svg, args.top)))
    finally:
        server.terminate()
        server.wait(30)
    return results
