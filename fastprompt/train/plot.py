"""`fastprompt plot RUN...`: loss and accuracy against steps and against wall-clock seconds, several runs
overlaid (the convergence-rate comparison the field argues about: in steps, and in seconds)."""

from __future__ import annotations

import os

from .config import ConfigError
from .metrics import read_metrics


def _label(run: str, records: list) -> str:
    head = next((r for r in records if r.get("kind") == "run"), {})
    method = head.get("config", {}).get("method", "")
    return f"{method} ({os.path.basename(os.path.normpath(run))})" if method else os.path.basename(run)


def plot_runs(runs: list, output: str) -> str:
    """Write a PNG with four panels (training loss and evaluation top-1, against steps and seconds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    missing = [run for run in runs if not os.path.isfile(os.path.join(run, "metrics.jsonl") if os.path.isdir(run)
                                                         else run)]
    if missing:
        raise ConfigError(f"no metrics in {', '.join(missing)}: plot takes run folders (or their metrics.jsonl)")
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for run in runs:
        records = read_metrics(run)
        steps = [r for r in records if r.get("kind") == "step"]
        evals = [r for r in records if r.get("kind") == "eval"]
        if not steps:
            raise ConfigError(f"{run} holds no step records")
        label = _label(run, records)
        for col, x in enumerate(("step", "wall_s")):
            axes[0, col].plot([r[x] for r in steps], [r["loss"] for r in steps], label=label)
            keys = [k for k in (evals[0] if evals else {}) if k.startswith("top1_") or k == "hm"]
            for key in keys:
                axes[1, col].plot([r[x] for r in evals], [r[key] for r in evals], marker="o",
                                  label=f"{label} {key.replace('top1_', '')}")
    for col, xlabel in enumerate(("step", "seconds")):
        axes[0, col].set(xlabel=xlabel, ylabel="training loss")
        axes[1, col].set(xlabel=xlabel, ylabel="top-1 (%)")
        for row in range(2):
            axes[row, col].grid(alpha=0.3)
            axes[row, col].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output
