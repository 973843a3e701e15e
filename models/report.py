"""Print a markdown table of trained runs from their metrics.json and config.json.

    python -m models.report runs/*
"""
import json
import sys
from pathlib import Path


def row(run: Path) -> str:
    metrics = json.loads((run / "metrics.json").read_text())
    config = json.loads((run / "config.json").read_text())
    args, model = config["train_args"], config["model"]
    if model["task"] == "classifier":
        result = f"test accuracy **{100 * metrics['test_accuracy']:.1f}%**"
    else:
        result = f"held-out perplexity **{metrics['valid_perplexity']:.2f}**"
    recipe = (f"{args['data']} {model['arch']} {config['tokenizer']['kind']}, E{model['embed_dim']} "
              f"H{model['hidden_size']} L{model['num_layers']}, {metrics['epochs']} epochs (best {metrics['best_epoch']})")
    return f"| `{run.name}` | {recipe} | {result} | {metrics['wall_time_s'] / 60:.1f} min | {metrics['device']} |"


if __name__ == "__main__":
    print("| run | recipe | result | wall time | device |\n|---|---|---|---|---|")
    for path in sys.argv[1:]:
        if (Path(path) / "metrics.json").exists():
            print(row(Path(path)))
