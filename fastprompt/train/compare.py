"""`fastprompt compare RUN...`: the convergence-rate numbers a paper reports, one row per run: the final and
the best top-1 of each evaluation split (test; or base, new and HM), the steps and wall-clock seconds at the
first evaluation that reached a target top-1, the median images/s of the training steps, and the steps and
seconds the run took.

The target is read on one split: HM where a run has it (base-to-new), else test, unless `split` names one.
Without a target given, it is the lowest of the runs' best top-1 on that split, the accuracy every run
reached, so that each row has a time to it. Reaching is measured where it can be, at the evaluations: a run
evaluated every epoch resolves it to the epoch. Seconds are the run's training clock at that evaluation
(continued across resumes), the evaluations before it included.
"""

from __future__ import annotations

import math
from typing import Optional

from .config import ConfigError
from .runs import SPLIT_NAMES, SPLITS, median, read_runs

CHOICES = ("auto", *SPLITS)


def _target_split(run, split: str) -> Optional[str]:
    if split != "auto":
        return split if split in run.splits() else None
    present = run.splits()
    return "hm" if "hm" in present else ("test" if "test" in present else None)


def reached(points: list, target: float) -> Optional[tuple]:
    """(step, seconds) of the first evaluation at or above `target`, None when none is."""
    return next(((step, wall) for step, wall, top1 in points if top1 >= target), None)


def compare_runs(paths: list, target: Optional[float] = None, split: str = "auto") -> list:
    """One dict per run (module docstring): name, method, final / best top-1 per split, target and its split,
    steps_to_target / seconds_to_target (None: not reached), images_per_s, steps, seconds."""
    if split not in CHOICES:
        raise ConfigError(f"compare --split takes {', '.join(CHOICES)}, got {split!r}")
    if target is not None and not (isinstance(target, (int, float)) and math.isfinite(target) and 0 < target <= 100):
        raise ConfigError(f"compare --target takes a top-1 in % above 0 and at most 100, got {target!r}")
    runs = read_runs(paths)
    chosen = [_target_split(run, split) for run in runs]
    if target is None:
        bests = [max(p[2] for p in run.series(s)) for run, s in zip(runs, chosen) if s is not None]
        target = min(bests) if bests else None
    rows = []
    for run, target_split in zip(runs, chosen):
        row = dict(run=run.name, path=run.path, method=run.config.get("method"), final={}, best={})
        for s in run.splits():
            values = [p[2] for p in run.series(s)]
            row["final"][s], row["best"][s] = values[-1], max(values)
        hit = reached(run.series(target_split), target) if target_split and target is not None else None
        row.update(target=target, target_split=target_split, steps_to_target=hit[0] if hit else None,
                   seconds_to_target=hit[1] if hit else None,
                   images_per_s=median([r.get("images_per_s") for r in run.steps]),
                   steps=run.steps[-1]["step"], seconds=max(r.get("wall_s", 0.0) for r in run.steps + run.evals))
        rows.append(row)
    return rows


def _cell(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_comparison(rows: list) -> str:
    """A markdown table of compare_runs' rows, and a line saying what the target was."""
    splits = [s for s in SPLITS if any(s in r["final"] for r in rows)]
    target = next((r["target"] for r in rows if r["target"] is not None), None)
    header = (["run", "method"] + [f"final {SPLIT_NAMES[s]}" for s in splits]
              + [f"best {SPLIT_NAMES[s]}" for s in splits])
    if target is not None:
        header += [f"steps to {target:.1f}%", f"s to {target:.1f}%"]
    header += ["images/s", "steps", "s"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for r in rows:
        cells = [r["run"], r["method"] or "—"] + [_cell(r["final"].get(s)) for s in splits]
        cells += [_cell(r["best"].get(s)) for s in splits]
        if target is not None:
            missed = "not reached" if r["target_split"] else "no such evaluation"
            cells += [_cell(r["steps_to_target"]) if r["steps_to_target"] is not None else missed,
                      _cell(r["seconds_to_target"], 1) if r["seconds_to_target"] is not None else missed]
        cells += [_cell(r["images_per_s"], 1), str(r["steps"]), _cell(float(r["seconds"]), 1)]
        lines.append("| " + " | ".join(cells) + " |")
    if target is not None:
        on = sorted({SPLIT_NAMES[r["target_split"]] for r in rows if r["target_split"]})
        lines.append(f"\ntarget: top-1 {target:.2f}% on {' / '.join(on) or 'no split'} (first evaluation at or "
                     "above it; seconds of training clock, evaluations before it included)")
    return "\n".join(lines)
