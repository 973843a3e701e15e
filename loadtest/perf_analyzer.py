"""python -m loadtest.perf_analyzer [--model imdb-gru --texts texts.json --users 8 --rounds 3]:
Triton's perf_analyzer and this harness's own client (loadtest/client.py) against one
`python -m serving`, alternately, sending the same texts as V2 `text_input` (binary BYTES, one
text per request) at the same concurrency: whether perf_analyzer sees the server as rnnserve's
own load generator does. texts.json is perf_analyzer's --input-data (docs/api.md#perf_analyzer);
perf_analyzer comes from tests/tools/perf_analyzer.sh.
"""
import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

from loadtest.client import load, timed
from loadtest.servers import free_port, start
from loadtest.workloads import v2_text_binary_body

ROOT = Path(__file__).resolve().parent.parent


def main():
    parser = argparse.ArgumentParser(prog="python -m loadtest.perf_analyzer")
    parser.add_argument("--model", default="imdb-gru")
    parser.add_argument("--repository", default="model_repository")
    parser.add_argument("--texts", required=True, help="perf_analyzer's --input-data: text_input rows")
    parser.add_argument("--users", type=int, default=8, help="perf_analyzer's concurrency, the client's users")
    parser.add_argument("--seconds", type=float, default=5.0, help="each client point; perf_analyzer's windows")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    texts = [row["text_input"]["content"][0] for row in json.loads(Path(args.texts).read_text())["data"]]
    requests = []
    for text in texts:
        body, header = v2_text_binary_body(text)
        requests.append((f"/v2/models/{args.model}/infer", body,
                         b"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: %d\r\n" % header))
    perf_analyzer = subprocess.run(["sh", str(ROOT / "tests/tools/perf_analyzer.sh"), sys.executable],
                                   capture_output=True, text=True, check=True).stdout.split()
    port = free_port()
    server = start("rnnserve", [sys.executable, "-m", "serving", "--repository", args.repository, "--port", str(port)],
                   {}, port, "/v2/health/ready")
    ratios = []
    try:
        for round_ in range(1, args.rounds + 1):
            done = subprocess.run([*perf_analyzer, "-m", args.model, "-u", f"localhost:{port}", "-i", "http",
                                   "--input-data", args.texts, "--concurrency-range", str(args.users),
                                   "--measurement-interval", str(int(args.seconds * 1000)),
                                   "--stability-percentage", "1000"], capture_output=True, text=True, check=True)
            theirs = float(re.search(r"throughput: ([\d.]+) infer/sec", done.stdout).group(1))
            result = timed(load, ("127.0.0.1", port, requests, args.users, args.seconds))
            ours = len(result.latencies_s) / result.elapsed_s
            ratios.append(theirs / ours)
            print(f"round {round_}: perf_analyzer {theirs:,.0f} infer/s, the harness's client {ours:,.0f} req/s "
                  f"({result.errors} errors, {result.cpu_s / result.elapsed_s:.2f} of a core): {theirs / ours:.2f}x")
    finally:
        server.terminate()
        server.wait()
    print(f"perf_analyzer / the harness's client, by round: {', '.join(f'{r:.2f}' for r in ratios)}; "
          f"median {sorted(ratios)[len(ratios) // 2]:.2f}")


if __name__ == "__main__":
    main()
