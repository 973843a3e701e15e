"""Locust, headless, with its CSV and HTML reports and a summary (python -m loadtest run)."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from loadtest.workloads import texts

SCENARIOS = {"predict": ["PredictUser"], "v2": ["V2User"], "v2-binary": ["V2BinaryUser"], "grpc": ["GrpcUser"],
             "generate": ["GenerateUser"], "all": ["PredictUser", "V2User", "V2BinaryUser", "GrpcUser", "GenerateUser"]}


def run_locust(host: str, users: int, spawn_rate: float, duration: str, scenario: str, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    texts(os.environ.get("RNNSERVE_LOADTEST_WORKLOAD", "short"), 2000,  # warm the cache the locustfile reads
          int(os.environ.get("RNNSERVE_LOADTEST_SEED", "0")))
    command = [sys.executable, "-m", "locust", "-f", str(Path(__file__).parent / "locustfile.py"), "--headless",
               "--host", host, "-u", str(users), "-r", str(spawn_rate), "-t", duration, "--only-summary",
               "--csv", str(out / "locust"), "--html", str(out / "report.html"), "--stop-timeout", "10",
               *SCENARIOS[scenario]]
    completed = subprocess.run(command, capture_output=True, text=True)
    rows = list(csv.DictReader(open(out / "locust_stats.csv")))
    summary = {"host": host, "users": users, "duration": duration, "scenario": scenario,
               "locust_exit_code": completed.returncode, "endpoints": {}}
    number = lambda value: float(value) if value not in ("", "N/A") else 0.0  # N/A: no requests
    for row in rows:
        summary["endpoints"][row["Name"]] = {
            "requests": int(row["Request Count"]), "failures": int(row["Failure Count"]),
            "requests_per_s": number(row["Requests/s"]), "p50_ms": number(row["50%"]),
            "p95_ms": number(row["95%"]), "p99_ms": number(row["99%"])}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = [f"Locust, {users} users, {duration}, {scenario} against {host}", "",
             "| endpoint | requests | failures | requests/s | p50 ms | p95 ms | p99 ms |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | {e['requests']} | {e['failures']} | {e['requests_per_s']:.1f} | {e['p50_ms']:.0f} | "
              f"{e['p95_ms']:.0f} | {e['p99_ms']:.0f} |" for name, e in summary["endpoints"].items()]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if completed.returncode not in (0, 1):  # 1: there were failures, which the summary shows
        print(completed.stderr[-3000:], file=sys.stderr)
    return summary
