"""Runs read back from their metrics.jsonl, for `fastprompt plot` and `fastprompt compare`: the step and
evaluation records of each, its label, and what the runs share (model, weights, data) for a title."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .config import ConfigError
from .metrics import read_metrics

# evaluation splits in the order they are drawn and tabulated, and their keys in the eval records
SPLITS = ("test", "base", "new", "hm")
SPLIT_KEYS = {"test": "top1_test", "base": "top1_base", "new": "top1_new", "hm": "hm"}
SPLIT_NAMES = {"test": "test", "base": "base", "new": "new", "hm": "HM"}


@dataclass
class Run:
    path: str
    name: str       # the run folder's name
    head: dict      # the "run" record: config, device, ...
    steps: list     # the "step" records, in step order
    evals: list     # the "eval" records, in step order

    @property
    def config(self) -> dict:
        return self.head.get("config", {})

    @property
    def label(self) -> str:
        method = self.config.get("method")
        return f"{method} ({self.name})" if method else self.name

    def splits(self) -> list:
        """The evaluation splits this run reports (test; or base, new and HM)."""
        present = {k for r in self.evals for k in r}
        return [s for s in SPLITS if SPLIT_KEYS[s] in present]

    def series(self, split: str) -> list:
        """(step, wall seconds, top-1) of each evaluation of `split`."""
        key = SPLIT_KEYS[split]
        return [(r["step"], r["wall_s"], r[key]) for r in self.evals if key in r]


def read_runs(paths: list) -> list:
    """Each path (a run folder or its metrics.jsonl) read as a Run; ConfigError for a path without metrics or
    with no step records."""
    missing = [p for p in paths if not os.path.isfile(os.path.join(p, "metrics.jsonl") if os.path.isdir(p) else p)]
    if missing:
        raise ConfigError(f"no metrics in {', '.join(missing)}: plot and compare take run folders (or their "
                          "metrics.jsonl)")
    runs = []
    for path in paths:
        try:
            records = read_metrics(path)
        except ValueError as exc:  # a line that is not JSON
            raise ConfigError(f"{path} is not a metrics.jsonl of fastprompt: {exc}") from exc
        steps = sorted((r for r in records if r.get("kind") == "step"), key=lambda r: r["step"])
        evals = sorted((r for r in records if r.get("kind") == "eval"), key=lambda r: r["step"])
        if not steps:
            raise ConfigError(f"{path} holds no step records (a run that has not trained yet)")
        folder = os.path.dirname(path) if os.path.isfile(path) else path
        name = os.path.basename(os.path.normpath(os.path.abspath(folder)))
        head = next((r for r in records if r.get("kind") == "run"), {})
        runs.append(Run(path, name, head, steps, evals))
    return runs


def shared_setting(runs: list) -> str:
    """'<model> (<weights>) on <data>' when every run has the same, else ''."""
    described = {(r.config.get("model"), r.config.get("pretrained"), r.config.get("data")) for r in runs}
    if len(described) != 1:
        return ""
    model, pretrained, data = described.pop()
    if model is None:
        return ""
    weights = pretrained or "random weights"
    return f"{model} ({weights}) on {data or 'the built-in shapes'}"


def median(values: list) -> float:
    values = sorted(v for v in values if isinstance(v, (int, float)) and math.isfinite(v))
    if not values:
        return float("nan")
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])
