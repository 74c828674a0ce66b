"""`fastprompt plot RUN...`: convergence against steps and against wall-clock seconds, several runs overlaid
(the comparison the field argues about: in steps, and in seconds).

Readable with 1 to 12 runs (and more): every run has one colour, the same in every panel; every evaluation
split one line style and marker (test solid with circles, base dashed with squares, new dotted with
triangles, HM dash-dotted with diamonds); one shared legend sits outside the panels, runs above, splits
below, so it never covers a curve. Per-step curves (loss, learning rate, images/s) can be smoothed by a
trailing moving average over N steps (`smooth`), drawn over the raw values, which stay faint behind it; the
learning rate, a schedule rather than a measurement, is never smoothed. Accuracy is drawn where it was
measured, a marker per evaluation. The title names the model, its weights and the dataset when every run
shares them. The output format follows the file's suffix: PNG, SVG or PDF.
"""

from __future__ import annotations

import os
from typing import Optional

from .config import ConfigError
from .runs import SPLIT_NAMES, read_runs, shared_setting

METRICS = ("top1", "loss", "lr", "images_per_s")
DEFAULT_METRICS = ("loss", "top1")
FORMATS = (".png", ".svg", ".pdf")
Y_LABELS = {"loss": "training loss", "top1": "top-1 accuracy (%)", "lr": "learning rate (first group)",
            "images_per_s": "throughput (images/s)"}
X_AXES = (("step", "training step"), ("wall_s", "wall-clock time (s)"))
SPLIT_STYLES = {"test": ("-", "o"), "base": ("--", "s"), "new": (":", "^"), "hm": ("-.", "D")}
RAW_ALPHA = 0.25  # the raw per-step values behind their moving average


def run_colours(n: int) -> list:
    """n distinct colours: tab10 up to 10 runs, then tab20's darker ten followed by its lighter ten (so the
    first ten keep their tab10 look), then hues spread evenly. Distinct RGB values in every case."""
    import matplotlib

    if n <= 10:
        return [matplotlib.colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        tab20 = matplotlib.colormaps["tab20"]
        return [tab20(i) for i in [*range(0, 20, 2), *range(1, 20, 2)][:n]]
    return [matplotlib.colormaps["hsv"](i / n) for i in range(n)]


def moving_average(values: list, n: int) -> list:
    """Trailing mean over the last n values (fewer at the start), so a point never looks into the future."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= n:
            total -= values[i - n]
        out.append(total / min(i + 1, n))
    return out


def _check(output: str, metric: Optional[str], smooth: int) -> None:
    if os.path.splitext(output)[1].lower() not in FORMATS:
        raise ConfigError(f"plot --output {output!r}: the format follows the suffix, one of "
                          + ", ".join(FORMATS))
    if metric is not None and metric not in METRICS:
        raise ConfigError(f"plot --metric takes {', '.join(METRICS)}, got {metric!r}")
    if not (isinstance(smooth, int) and not isinstance(smooth, bool) and smooth >= 1):
        raise ConfigError(f"plot --smooth takes a number of steps, at least 1 (1: no smoothing), got {smooth!r}")


def make_figure(paths: list, metric: Optional[str] = None, smooth: int = 1):
    """The matplotlib Figure of `fastprompt plot` (module docstring): a row of two panels (against steps,
    against seconds) per quantity, `metric` alone or loss and top-1. Every curve's gid is
    '<run index>:<quantity>:<split, raw or smoothed>', for the tests and for anyone restyling it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    _check("x.png", metric, smooth)
    runs = read_runs(paths)
    metrics = (metric,) if metric else DEFAULT_METRICS
    colours = run_colours(len(runs))
    fig, axes = plt.subplots(len(metrics), 2, figsize=(12, 3.6 * len(metrics) + 0.6), squeeze=False,
                             layout="constrained")
    splits_seen = []
    for i, (run, colour) in enumerate(zip(runs, colours)):
        for row, quantity in enumerate(metrics):
            for col, (x, _) in enumerate(X_AXES):
                ax = axes[row, col]
                if quantity == "top1":
                    for split in run.splits():
                        splits_seen += [split] if split not in splits_seen else []
                        points = run.series(split)
                        style, marker = SPLIT_STYLES[split]
                        ax.plot([p[col] for p in points], [p[2] for p in points], color=colour, linestyle=style,
                                marker=marker, markersize=4, linewidth=1.4, gid=f"{i}:top1:{split}")
                    continue
                xs = [r[x] for r in run.steps if quantity in r]
                ys = [r[quantity] for r in run.steps if quantity in r]
                if smooth > 1 and quantity != "lr":
                    ax.plot(xs, ys, color=colour, alpha=RAW_ALPHA, linewidth=0.8, gid=f"{i}:{quantity}:raw")
                    ax.plot(xs, moving_average(ys, smooth), color=colour, linewidth=1.6,
                            gid=f"{i}:{quantity}:smoothed")
                else:
                    ax.plot(xs, ys, color=colour, linewidth=1.2, gid=f"{i}:{quantity}:raw")
    for row, quantity in enumerate(metrics):
        for col, (_, xlabel) in enumerate(X_AXES):
            ax = axes[row, col]
            ylabel = Y_LABELS[quantity]
            if smooth > 1 and quantity in ("loss", "images_per_s"):
                ylabel += f", mean of {smooth} steps"
            ax.set(xlabel=xlabel, ylabel=ylabel)
            ax.grid(alpha=0.3)
            if quantity == "lr":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    setting = shared_setting(runs)
    if setting:
        fig.suptitle(setting)
    run_handles = [Line2D([], [], color=c, linewidth=2, label=run.label) for run, c in zip(runs, colours)]
    fig.legend(handles=run_handles, loc="outside right upper", title="runs", fontsize=8, title_fontsize=9)
    if splits_seen:
        split_handles = [Line2D([], [], color="0.25", linestyle=SPLIT_STYLES[s][0], marker=SPLIT_STYLES[s][1],
                                markersize=4, label=SPLIT_NAMES[s]) for s in splits_seen]
        fig.legend(handles=split_handles, loc="outside right lower", title="evaluation", fontsize=8,
                   title_fontsize=9)
    return fig


def plot_runs(runs: list, output: str, metric: Optional[str] = None, smooth: int = 1) -> str:
    """Write the plot of `runs` (make_figure) to `output`, PNG, SVG or PDF by its suffix; returns the path."""
    import matplotlib.pyplot as plt

    _check(output, metric, smooth)
    fig = make_figure(runs, metric, smooth)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output
