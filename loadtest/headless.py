"""Locust, headless, with its CSV and HTML reports and a summary (python -m loadtest run).

`--scenario all` leaves out the gRPC user when no gRPC server answers where it would aim (a
server serves gRPC only with RNNSERVE_GRPC_PORT; `make serve` does not), and says so. Generation's
rates and times to first token are summary fields of their own (loadtest/locustfile.py writes
each stream's timings), not Locust request entries.
"""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb, service_pb2_grpc

from loadtest.workloads import texts

SCENARIOS = {"predict": ["PredictUser"], "v2": ["V2User"], "v2-binary": ["V2BinaryUser"], "grpc": ["GrpcUser"],
             "generate": ["GenerateUser"], "all": ["PredictUser", "V2User", "V2BinaryUser", "GrpcUser", "GenerateUser"]}
PROBE_S = 2.0  # how long the gRPC server has to answer ServerLive before `all` leaves its user out


def grpc_address(host: str) -> str:
    """Where the gRPC user aims: RNNSERVE_LOADTEST_GRPC, else the host's name and port 8001 (Triton's)."""
    return os.environ.get("RNNSERVE_LOADTEST_GRPC", f"{urlsplit(host).hostname}:8001")


def grpc_unanswered(address: str) -> str | None:
    """Why no gRPC server answers ServerLive at `address` within PROBE_S; None when one does."""
    with grpc.insecure_channel(address) as channel:
        try:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=PROBE_S)
            return None
        except grpc.RpcError as e:
            return (f"no gRPC server answers at {address} ({e.code().name}); a server serves gRPC with "
                    "RNNSERVE_GRPC_PORT, and RNNSERVE_LOADTEST_GRPC says where")


def generation(streams: list[list[float]]) -> dict:
    """Streams of [started, first token, ended] (seconds) and tokens, as rates and times: every
    stream's tokens over the time they ran, one stream's tokens/s (median), time to first token."""
    if not streams:
        return {}
    started, first, ended, tokens = np.array(streams).T
    first_ms = (first - started) * 1000
    return {"streams": len(streams), "tokens": int(tokens.sum()),
            "tokens_per_s": float(tokens.sum() / (ended.max() - started.min())),
            "stream_tokens_per_s_p50": float(np.median(tokens / (ended - started))),
            "time_to_first_token_p50_ms": float(np.percentile(first_ms, 50)),
            "time_to_first_token_p95_ms": float(np.percentile(first_ms, 95))}


def run_locust(host: str, users: int, spawn_rate: float, duration: str, scenario: str, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    texts(os.environ.get("RNNSERVE_LOADTEST_WORKLOAD", "short"), 2000,  # warm the cache the locustfile reads
          int(os.environ.get("RNNSERVE_LOADTEST_SEED", "0")))
    classes, left_out = SCENARIOS[scenario], {}
    if scenario == "all" and (why := grpc_unanswered(grpc_address(host))):
        classes, left_out["GrpcUser"] = [c for c in classes if c != "GrpcUser"], why
        print(f"--scenario all: the gRPC user is left out: {why}")
    streams = out / "streams.json"
    streams.unlink(missing_ok=True)
    command = [sys.executable, "-m", "locust", "-f", str(Path(__file__).parent / "locustfile.py"), "--headless",
               "--host", host, "-u", str(users), "-r", str(spawn_rate), "-t", duration, "--only-summary",
               "--csv", str(out / "locust"), "--html", str(out / "report.html"), "--stop-timeout", "10", *classes]
    completed = subprocess.run(command, capture_output=True, text=True,
                               env=os.environ | {"RNNSERVE_LOADTEST_STREAMS": str(streams)})
    rows = list(csv.DictReader(open(out / "locust_stats.csv")))
    exceptions = sum(int(row["Count"]) for row in csv.DictReader(open(out / "locust_exceptions.csv")))
    summary = {"host": host, "users": users, "duration": duration, "scenario": scenario, "left_out": left_out,
               "locust_exit_code": completed.returncode, "exceptions": exceptions, "endpoints": {},
               "generation": generation(json.loads(streams.read_text()) if streams.exists() else [])}
    number = lambda value: float(value) if value not in ("", "N/A") else 0.0  # N/A: no requests
    for row in rows:
        summary["endpoints"][row["Name"]] = {
            "requests": int(row["Request Count"]), "failures": int(row["Failure Count"]),
            "requests_per_s": number(row["Requests/s"]), "p50_ms": number(row["50%"]),
            "p95_ms": number(row["95%"]), "p99_ms": number(row["99%"])}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    notes = [*(f"--scenario all: the gRPC user is left out: {why}" for why in left_out.values()),
             *([f"{exceptions} exceptions in the users' code (locust_exceptions.csv)"] if exceptions else [])]
    lines = [f"Locust, {users} users, {duration}, {scenario} against {host}", "", *notes, *([""] if notes else []),
             "| endpoint | requests | failures | requests/s | p50 ms | p95 ms | p99 ms |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | {e['requests']} | {e['failures']} | {e['requests_per_s']:.1f} | {e['p50_ms']:.0f} | "
              f"{e['p95_ms']:.0f} | {e['p99_ms']:.0f} |" for name, e in summary["endpoints"].items()]
    if g := summary["generation"]:
        lines += ["", "| generation streams | tokens | tokens/s | tokens/s per stream, p50 | time to first token p50 ms "
                      "| p95 ms |", "|---|---|---|---|---|---|",
                  f"| {g['streams']} | {g['tokens']} | {g['tokens_per_s']:.0f} | {g['stream_tokens_per_s_p50']:.0f} | "
                  f"{g['time_to_first_token_p50_ms']:.1f} | {g['time_to_first_token_p95_ms']:.1f} |"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if completed.returncode not in (0, 1):  # 1: there were failures, which the summary shows
        print(completed.stderr[-3000:], file=sys.stderr)
    return summary
