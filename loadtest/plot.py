"""The benchmark harness's picture (python -m loadtest bench): p99 latency against sequences/s for
every stack, with the in-process ceiling, one panel per workload (latency_throughput.png)."""
from pathlib import Path

from loadtest.report import WORKLOADS


def plot(r: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, w in zip(axes, WORKLOADS):
        for stack in sorted({k.split("|")[0] for k in r["points"] if not k.startswith("generate")}):
            pts = sorted((v["sequences_per_s"], v["p99_ms"]) for k, v in r["points"].items()
                         if k.startswith(f"{stack}|{w}|"))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=stack)
        best = max(v["sequences_per_s"] for k, t in r["ceiling"].items() if k.startswith(f"onnxruntime|{w}")
                   for v in t.values())
        ax.axvline(best, color="gray", linestyle="--", label="in-process ceiling")
        ax.set(title=f"{w} requests", xlabel="sequences/s", ylabel="p99 latency (ms)", yscale="log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
