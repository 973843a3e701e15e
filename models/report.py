"""Print a markdown table of trained runs, with the command that reproduces each.

    python -m models.report runs/*
"""
import json
import sys
from pathlib import Path

from models.train import parse_args


def command(train_args: dict) -> str:
    """The training command: the arguments that differ from the defaults."""
    task = train_args["task"]
    defaults = json.loads(json.dumps(vars(parse_args([task, "--data", "x", "--out", "x"])), default=str))  # as saved
    options = " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in train_args.items()
                       if k not in ("task", "data", "out", "arch") and v != defaults.get(k) and v is not None)
    return (f"python -m models.train {task} --data {train_args['data']} --arch {train_args['arch']} "
            f"--out {train_args['out']} {options}").strip()


def row(run: Path) -> str:
    metrics = json.loads((run / "metrics.json").read_text())
    config = json.loads((run / "config.json").read_text())
    if config["model"]["task"] == "classifier":
        result = f"test accuracy **{100 * metrics['test_accuracy']:.1f}%**"
    else:
        result = f"held-out perplexity **{metrics['valid_perplexity']:.2f}**"
    return (f"| `{run.name}` | `{command(config['train_args'])}` | {result} (best epoch {metrics['best_epoch']} "
            f"of {metrics['epochs']}) | {metrics['wall_time_s'] / 60:.1f} min | {metrics['device']} |")


if __name__ == "__main__":
    print("| run | command | result | wall time | device |\n|---|---|---|---|---|")
    for path in sys.argv[1:]:
        if (Path(path) / "metrics.json").exists():
            print(row(Path(path)))
