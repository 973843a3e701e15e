"""python -m loadtest tune end to end on the test suite's tiny classifier, with real servers and
load: the search's plumbing and what it writes, not its speed (points of half a second)."""
import json
import os
import subprocess
import sys

import httpx

from core.repository import ServingConfig
from tests.serving_fixtures import Server, tiny_repository


# Each point's server: one engine and one front-end (the search tries two of each), closing its
# port at SIGTERM without the drain's 5 + 5 s: a point takes about 3 s here instead of 13.
ONE_OF_EACH = {"RNNSERVE_ENGINES": "1", "RNNSERVE_WORKERS": "1", "RNNSERVE_DRAIN_SERVE_S": "0", "RNNSERVE_DRAIN_S": "0"}


def tune(repository, out, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loadtest", "tune", "clf", "--repository", str(repository),
                           "--users", "4", "--seconds", "0.5", "--out", str(out), *extra],
                          env=os.environ | ONE_OF_EACH, capture_output=True, text=True, timeout=600)


def test_a_short_tune_writes_a_config_the_server_then_serves_by(tmp_path):
    repository = tiny_repository(tmp_path)
    done = tune(repository, tmp_path / "out", "--minutes", "0.6", "--confirm", "1", "--p99-ms", "5000", "--write")
    print(done.stdout[-3000:])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(results["points"]) >= 3 and results["points"][0]["point"] == {}  # the defaults first
    assert results["minutes"] < 0.6 + 0.5  # within --minutes, but for the last point's stop
    winner, confirmed = results["winner"], results["confirmed"]
    assert winner["meets"]
    if confirmed:  # the search's best and the defaults measured once more each: medians of two
        assert confirmed["best"]["repeats"] == confirmed["defaults"]["repeats"] == 2
        assert winner["point"] in (confirmed["best"]["point"], confirmed["defaults"]["point"])
    assert (tmp_path / "out" / "tune.png").read_bytes()[:4] == b"\x89PNG"
    assert "| defaults |" in (tmp_path / "out" / "results.md").read_text()
    written = json.loads((repository / "clf" / "config.json").read_text())
    chosen = {k: v for k, v in results["winner"]["point"].items() if k not in ("engines", "workers")}
    assert ServingConfig.model_validate(written) and chosen.items() <= written.items()
    s = Server(repository)
    try:
        assert httpx.post(f"{s.url}/v1/models/clf:predict", json={"instances": ["good"]}).status_code == 200
        limits = s.deployment("clf").runner.limits  # the written fields are what the engine batches by
        assert limits.max_batch_size == written.get("max_batch_size", limits.max_batch_size)
        assert limits.max_queue_delay_s * 1000 == written.get("max_queue_delay_ms", limits.max_queue_delay_s * 1000)
    finally:
        s.stop()


def test_a_budget_no_config_meets_says_so_and_writes_nothing(tmp_path):
    repository = tiny_repository(tmp_path)
    before = sorted(p.name for p in (repository / "clf").iterdir())
    done = tune(repository, tmp_path / "out", "--minutes", "0.05", "--p99-ms", "0.001", "--write")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "nothing written" in done.stdout and "--p99-ms" in done.stdout
    assert sorted(p.name for p in (repository / "clf").iterdir()) == before
