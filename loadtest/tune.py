"""A model's best serving config on this machine, found by measurement and written for it.

    python -m loadtest tune MODEL [--repository model_repository] [--p99-ms 100] [--users 64]
        [--texts 1] [--minutes 10] [--seconds 4] [--confirm 2] [--max-accuracy-loss 0.5] [--write] [--out results/tune]

It starts from the model as it is served now (its config.json, else the server's defaults: the
"defaults" point). What it varies: the model's config.json (max_batch_size, max_queue_delay_ms,
intra_op_threads, and the variant among those whose held-out accuracy the export measured within
--max-accuracy-loss points of fp32) and the server's engines and front-ends (--engines,
--workers: server-wide, so printed as a command, not written). Each point is python -m serving
on a repository of links to the model's versions beside that config.json, --users clients
sending --texts short IMDB texts per V1 predict for --seconds. The best point: the most
requests/s with no error and p99 within --p99-ms.

The search is coordinate descent from the defaults: each setting in turn, every value of it with
the others at the best so far; passes until one changes nothing or --minutes is spent: a few
dozen points where the full grid has hundreds, and a setting whose best value depends on
another's is revisited in the next pass. A point is measured once in the search; machines are
noisy, so the best point and the defaults are then measured --confirm more times each,
alternately, and the best wins only if its median beats the defaults' within the budget.

Writes results.json, results.md (every point tried, then the confirmation) and tune.png
(requests/s against p99, the defaults and the winner marked) under --out; with --write, the
winner's fields into <repository>/MODEL/config.json (its other fields kept). When no point meets
the budget it says so, writes no config, and exits with status 1.
"""
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from core.repository import CONFIG, ServingConfig, latest, read_config, read_version
from loadtest.bench import measure, median_point
from loadtest.servers import cpu_name, free_port, start
from loadtest.workloads import predict_body, texts
from serving.__main__ import process_counts
from serving.common.settings import Settings
from serving.engine import devices
from serving.engine.runner import Limits

SERVER_WIDE = ("engines", "workers")


def choices(args, model_dir: Path) -> dict[str, list]:
    """Each setting's values to try: the current one (None) first, then the others, leaving out
    the value the current one comes to on this machine (the same point twice would let the noise
    choose between them)."""
    cores = len(os.sched_getaffinity(0))
    values = {"max_batch_size": [1, 4, 16, 64, 256], "max_queue_delay_ms": [0.0, 1.0, 2.0, 5.0],
              "engines": list(range(1, cores + 1)), "workers": list(range(1, cores + 1)),
              "intra_op_threads": list(range(1, cores + 1)),
              "variant": ["fp32", *variants_within(model_dir, args.max_accuracy_loss)]}
    current = current_values(model_dir)
    return {k: [None, *(v for v in vs if v != current[k])] for k, vs in values.items()}


def current_values(model_dir: Path) -> dict:
    """What each tuned setting comes to on this machine with the model's config.json and the
    server's settings as they are (RNNSERVE_* in this environment)."""
    settings, config = Settings(), read_config(model_dir.parent)
    provider = devices.CUDA if devices.usable_gpus(settings.providers) else "CPUExecutionProvider"
    limits = Limits.of(settings, config, provider)
    engines, workers = process_counts(settings)
    return {"max_batch_size": limits.max_batch_size, "max_queue_delay_ms": 1000 * limits.max_queue_delay_s,
            "engines": engines, "workers": workers,
            "intra_op_threads": config.intra_op_threads or settings.intra_op_threads, "variant": config.variant}


def variants_within(model_dir: Path, max_loss_points: float) -> list[str]:
    """The graphs besides fp32 whose held-out accuracy the export measured within the loss allowed."""
    kept = []
    for name, graph in read_version(model_dir).manifest.graphs.items():
        quality = graph.quality or {}
        ours, fp32 = quality.get(name, {}), quality.get("fp32", {})
        key = next((k for k in ours if k.endswith("accuracy")), None)
        if name != "fp32" and key and 100 * (fp32[key] - ours[key]) <= max_loss_points:
            kept.append(name)
    return kept


def label(point: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items() if v is not None) or "defaults"


class Tuner:
    def __init__(self, args):
        self.args, self.name = args, args.model
        self.model_dir = latest(args.repository, args.model)
        self.requests = [(f"/v1/models/{self.name}:predict", predict_body(*chunk)) for chunk in self.chunks()]
        self.tried: dict[str, dict] = {}
        self.deadline = time.monotonic() + 60 * args.minutes
        self.point_s = 0.0  # the longest a point has taken (start, load, stop): none starts that close to the end

    def chunks(self) -> list[tuple[str, ...]]:
        stream, n = texts("short", 2000, seed=6), self.args.texts
        return [tuple(stream[i: i + n]) for i in range(0, len(stream) - n + 1, n)]

    def run(self, point: dict) -> dict:
        """One measurement of a point: python -m serving with that config, under the load."""
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="rnnserve-tune-") as folder:
            repository = Path(folder)
            model = repository / self.name
            model.mkdir()
            for version in self.model_dir.parent.iterdir():
                if version.is_dir():
                    (model / version.name).symlink_to(version.resolve())
            (model / CONFIG).write_text(json.dumps(self.config_of(point)))
            command = [sys.executable, "-m", "serving", "--host", "127.0.0.1", "--repository", str(repository)]
            for setting in SERVER_WIDE:
                if point.get(setting):
                    command += [f"--{setting}", str(point[setting])]
            port = free_port()
            server = start("rnnserve-tune", command + ["--port", str(port)], {}, port, "/v2/health/ready")
            try:
                result = measure(server.pid, port, self.requests, self.args.users, self.args.seconds, 1, self.args.texts)
            finally:
                server.terminate()
                server.wait(30)
        result["point"] = {k: v for k, v in point.items() if v is not None}
        result["meets"] = result["errors"] == 0 and result["p99_ms"] <= self.args.p99_ms
        self.point_s = max(self.point_s, time.monotonic() - started)
        print(f"{label(point):60s} {result['requests_per_s']:8.0f} req/s  p99 {result['p99_ms']:7.1f} ms  "
              f"errors {result['errors']}{'' if result['meets'] else '  (outside the budget)'}", flush=True)
        return result

    def config_of(self, point: dict) -> dict:
        """The config.json a point is served with: the model's own, its fields as the point sets them."""
        return read_config(self.model_dir.parent).model_dump(exclude_unset=True) | {
            k: v for k, v in point.items() if v is not None and k not in SERVER_WIDE}

    def measured(self, point: dict) -> dict:
        """A point of the search, each measured once."""
        if (key := label(point)) not in self.tried:
            self.tried[key] = self.run(point)
        return self.tried[key]

    def time_left(self) -> bool:
        """Whether another point of the search fits before --minutes is spent, leaving the time of
        the confirmation (2 x --confirm points)."""
        return time.monotonic() + self.point_s * (1 + 2 * self.args.confirm) <= self.deadline

    def better(self, a: dict, b: dict | None) -> bool:
        """a beats b: within the budget and more requests/s (or b is not within it)."""
        return a["meets"] and (b is None or not b["meets"] or a["requests_per_s"] > b["requests_per_s"])

    def search(self) -> tuple[dict, dict | None]:
        """Coordinate descent from the defaults: (the defaults' point, the best point within the
        budget, or None)."""
        space = choices(self.args, self.model_dir)
        best = {k: None for k in space}
        best_result = self.measured(best)
        if not best_result["meets"]:
            best_result = None
        changed = True
        while changed and self.time_left():
            changed = False
            for setting, values in space.items():
                for value in values:
                    if value == best[setting] or not self.time_left():
                        continue
                    result = self.measured(best | {setting: value})
                    if self.better(result, best_result):
                        best, best_result, changed = best | {setting: value}, result, True
        return {k: None for k in space}, (best if best_result else None)

    def confirm(self, defaults: dict, best: dict) -> dict[str, dict]:
        """The defaults and the best point measured --confirm more times each, alternately (the
        machine's drift falls on both), with the search's measurement: medians of each."""
        runs = {"defaults": [self.tried[label(defaults)]], "best": [self.tried[label(best)]]}
        for _ in range(self.args.confirm):
            for name, point in (("defaults", defaults), ("best", best)):
                runs[name].append(self.run(point))
        merged = {}
        for name, points in runs.items():
            merged[name] = median_point(points) | {"point": points[0]["point"]}
            merged[name]["meets"] = merged[name]["errors"] == 0 and merged[name]["p99_ms"] <= self.args.p99_ms
        return merged


def tune(args) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    tuner = Tuner(args)
    started = time.monotonic()
    defaults, best = tuner.search()
    confirmed = tuner.confirm(defaults, best) if best and best != defaults else None
    if confirmed:
        winner = confirmed["best"] if tuner.better(confirmed["best"], confirmed["defaults"]) else (
            confirmed["defaults"] if confirmed["defaults"]["meets"] else None)
    else:
        winner = tuner.tried[label(defaults)] if best else None
    results = {"machine": cpu_name(), "date": time.strftime("%Y-%m-%d %H:%M"), "model": args.model,
               "p99_budget_ms": args.p99_ms, "users": args.users, "texts": args.texts,
               "minutes": (time.monotonic() - started) / 60, "points": list(tuner.tried.values()),
               "defaults": confirmed["defaults"] if confirmed else tuner.tried[label(defaults)],
               "confirmed": confirmed, "winner": winner}
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(markdown(results))
    plot(results, args.out / "tune.png")
    print(markdown(results))
    if winner is None:
        print(f"no config of {args.model} answers {args.users} users within p99 {args.p99_ms:g} ms without errors "
              f"on this machine ({len(tuner.tried)} tried); nothing written. Allow a larger --p99-ms or fewer --users.")
        return 1
    server = " ".join(f"--{k} {winner['point'][k]}" for k in SERVER_WIDE if k in winner["point"])
    if winner["point"]:
        print(f"best: {label(winner['point'])}: {winner['requests_per_s']:.0f} req/s, p99 {winner['p99_ms']:.1f} ms "
              f"(medians of {args.confirm + 1}); the defaults {confirmed['defaults']['requests_per_s']:.0f} req/s, "
              f"p99 {confirmed['defaults']['p99_ms']:.1f} ms: {winner['requests_per_s'] / confirmed['defaults']['requests_per_s']:.2f}x")
    elif confirmed:
        print(f"the defaults stay: the search's best, {label(confirmed['best']['point'])}, measured again gave "
              f"{confirmed['best']['requests_per_s'] / confirmed['defaults']['requests_per_s']:.2f}x their requests/s")
    else:
        print("the defaults stay: no other point beat them within the budget")
    if server:
        print(f"server-wide, not in config.json: python -m serving {server}")
    if args.write:
        path = args.repository / args.model / CONFIG
        config = ServingConfig.model_validate(tuner.config_of(winner["point"])).model_dump(exclude_unset=True)
        path.write_text(json.dumps(config, indent=2) + "\n")
        print(f"wrote {path}: {json.dumps(config)}")
    return 0


def markdown(r: dict) -> str:
    lines = [f"{r['machine']}; {r['date']}; {r['model']}, {r['users']} users, {r['texts']} text(s) per V1 predict, "
             f"p99 budget {r['p99_budget_ms']:g} ms; {len(r['points'])} points in {r['minutes']:.1f} min.", "",
             "| point | requests/s | p50 ms | p99 ms | errors | within budget |", "|---|---|---|---|---|---|"]
    for p in r["points"]:
        lines.append(row(p))
    if c := r["confirmed"]:
        lines += ["", f"The search's best and the defaults again, alternately (medians of {c['best']['repeats']}):", "",
                  lines[2], lines[3], row(c["defaults"]), row(c["best"]), "",
                  f"Ratio: {c['best']['requests_per_s'] / c['defaults']['requests_per_s']:.2f}x the defaults' requests/s."]
    winner = r["winner"]
    lines += ["", f"Winner: {label(winner['point'])}." if winner else "No point met the budget: nothing written."]
    return "\n".join(lines) + "\n"


def row(p: dict) -> str:
    return (f"| {label(p['point'])} | {p['requests_per_s']:.0f} | {p['p50_ms']:.1f} | {p['p99_ms']:.1f} | "
            f"{p['errors']:.0f} | {'yes' if p['meets'] else 'no'} |")


def plot(r: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = r["points"]
    ax.scatter([p["p99_ms"] for p in points], [p["requests_per_s"] for p in points], color="0.6",
               label="tried (once each)")
    for p, style, name in ((r["defaults"], "s", "defaults"), (r["winner"], "*", "winner")):
        if p:
            ax.scatter([p["p99_ms"]], [p["requests_per_s"]], marker=style, s=160,
                       label=f"{name}: {label(p['point'])}" if p["point"] else name)
    ax.axvline(r["p99_budget_ms"], color="red", linestyle="--", linewidth=1, label="p99 budget")
    ax.set_xlabel("p99 latency (ms)")
    ax.set_ylabel("requests/s")
    ax.set_title(f"{r['model']}: {r['users']} users, {r['texts']} text(s) per request")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
