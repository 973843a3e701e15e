"""What both trainers share (python -m models.train): the device, its description for the run's
record, the arguments as the run folder keeps them, and the learning curves' plot."""
import json
import platform
from pathlib import Path

import torch


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def vars_of(args) -> dict:
    return json.loads(json.dumps(vars(args), default=str))


def plot_curves(history: list[dict], keys: list[str], path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5))
    for ax, key in zip(axes, keys):
        ax.plot([h["epoch"] for h in history], [h[key] for h in history], marker="o")
        ax.set_xlabel("epoch")
        ax.set_title(key)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
