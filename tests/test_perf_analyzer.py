"""Triton's perf_analyzer, unchanged, against a real server over the tiny repository: the
classifier over HTTP and gRPC with real token ids and with texts (text_input), and the language
model's decoupled stream over gRPC. It reads the model configuration and statistics extensions before and after it measures;
each run exits 0 with a throughput and the server-side breakdown those statistics give.

perf_analyzer is installed by tests/tools/perf_analyzer.sh into .perf_analyzer/ (once; CI runs it
from here). If it cannot be installed the test fails, saying why: it is never skipped."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.servers import free_port
from tests.serving_fixtures import Server, tiny_repository

ROOT = Path(__file__).resolve().parents[1]
BREAKDOWN = re.compile(r"Avg request latency: \d+ usec \(overhead \d+ usec \+ queue \d+ usec \+ compute input \d+ usec "
                       r"\+ compute infer \d+ usec \+ compute output \d+ usec\)")


@pytest.fixture(scope="session")
def perf_analyzer() -> list[str]:
    done = subprocess.run(["sh", str(ROOT / "tests/tools/perf_analyzer.sh"), sys.executable], capture_output=True,
                          text=True, timeout=900)
    if done.returncode:
        pytest.fail(f"perf_analyzer could not be installed (tests/tools/perf_analyzer.sh):\n{done.stderr[-3000:]}")
    return done.stdout.split()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tiny_repository(tmp_path_factory.mktemp("perf")), grpc_port=free_port(), max_queue_delay_ms=2)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def input_data(tmp_path_factory) -> Path:
    """Two real rows of token ids (padded to one length: perf_analyzer sends one shape per run)."""
    path = tmp_path_factory.mktemp("perf-data") / "rows.json"
    path.write_text(json.dumps({"data": [
        {"input_ids": {"content": [2, 3, 4, 5], "shape": [4]}, "lengths": {"content": [4], "shape": [1]}},
        {"input_ids": {"content": [5, 6, 7, 0], "shape": [4]}, "lengths": {"content": [3], "shape": [1]}}]}))
    return path


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> Path:
    """Two texts as text_input (a classifier's other input form: tests/test_v2_text.py)."""
    path = tmp_path_factory.mktemp("perf-text") / "texts.json"
    path.write_text(json.dumps({"data": [{"text_input": {"content": ["good film"], "shape": [1]}},
                                         {"text_input": {"content": ["awful plot , the worst"], "shape": [1]}}]}))
    return path


def measured(perf_analyzer: list[str], *args: str) -> str:
    """perf_analyzer's run, short: three windows of 0.5 s per concurrency, taken as stable whatever
    they measure (a test box is shared; docs/benchmarks.md has the figures)."""
    done = subprocess.run([*perf_analyzer, *args, "--measurement-interval", "500", "--stability-percentage", "1000"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    return done.stdout


@pytest.mark.parametrize("given", ["ids", "text"])
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_measures_the_classifier(perf_analyzer, server, input_data, text_data, protocol, given):
    """With token ids or with texts: the configuration marks each input optional, and perf_analyzer
    sends those its data gives."""
    url = server.url[len("http://"):] if protocol == "http" else f"127.0.0.1:{server.settings.grpc_port}"
    out = measured(perf_analyzer, "-m", "clf", "-u", url, "-i", protocol, "--input-data",
                   str(input_data if given == "ids" else text_data), "--concurrency-range", "1:2")
    throughputs = [float(t) for t in re.findall(r"Concurrency: \d+, throughput: ([\d.]+) infer/sec", out)]
    assert len(throughputs) == 2 and min(throughputs) > 0, out
    assert len(BREAKDOWN.findall(out)) == 2, out  # the server's side, from the statistics extension
    counts = re.findall(r"Server: \n\s+Inference count: (\d+)\n\s+Execution count: (\d+)", out)
    assert len(counts) == 2 and all(int(n) > 0 and 0 < int(calls) <= int(n) for n, calls in counts), out


def test_perf_analyzer_measures_the_language_models_stream(perf_analyzer, server, input_data):
    """The language model is decoupled (its configuration says so): perf_analyzer streams its
    requests on ModelStreamInfer, each answered with its logits."""
    out = measured(perf_analyzer, "-m", "lm", "-u", f"127.0.0.1:{server.settings.grpc_port}", "-i", "grpc",
                   "--streaming", "--input-data", str(input_data), "--concurrency-range", "1")
    assert "Detected decoupled model" in out and BREAKDOWN.search(out), out
    assert float(re.search(r"Concurrency: 1, throughput: ([\d.]+) infer/sec", out).group(1)) > 0, out
