"""The field's evaluation protocols as recipes: each trains and evaluates the runs it needs, over seeds, and
ends in a summary table (mean ± std over seeds), as the papers report them.

  base2new      train on the base half of the classes (16 shots), report base, new and their harmonic mean
  fewshot       K = 1, 2, 4, 8, 16 shots on all classes, top-1 per K
  cross_dataset train on a source dataset (all classes, 16 shots), top-1 on the source and on each target
  domain_generalization   the same with the target datasets as shifted versions of the source (ImageNet →
                ImageNetV2, -Sketch, -A, -R in the papers)

With no data the recipes run on the built-in shapes; a target of the transfer recipes is then the shapes
drawn with another seed (new images of the same classes), which exercises the recipe, not a real transfer.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
from typing import Optional

from .config import ConfigError, TrainConfig, fresh_output
from .trainer import Trainer

PROTOCOLS = ("base2new", "fewshot", "cross_dataset", "domain_generalization")
FEW_SHOTS = (1, 2, 4, 8, 16)


def _mean_std(values: list) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _run(config: TrainConfig, output: str, **changes) -> Trainer:
    trainer = Trainer(dataclasses.replace(config, output=output, **changes))
    trainer.fit()
    return trainer


def run_protocol(name: str, config: TrainConfig, seeds=(1, 2, 3), targets: Optional[list] = None,
                 shots_list=FEW_SHOTS) -> tuple[str, dict]:
    """Run protocol `name` from the base `config` (its output folder holds one folder per run); returns the
    markdown summary table and the raw numbers {row: {column: [value per seed]}}."""
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {name!r}; protocols are {', '.join(PROTOCOLS)}")
    root = config.output
    if root is None:  # a fresh runs/<protocol>-<method>-<time>: every rank must name the same one itself
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("under torchrun a protocol needs an explicit --output (the same on every rank)")
        root = fresh_output(f"{name}-{config.method}")
    rows: dict = {}
    if name == "base2new":
        for seed in seeds:
            trainer = _run(config, os.path.join(root, f"seed{seed}"), seed=seed, subsample="base")
            last = trainer.evaluate()
            for column in ("base", "new", "hm"):
                rows.setdefault(config.method, {}).setdefault(column, []).append(last[column])
        columns = ["base", "new", "hm"]
    elif name == "fewshot":
        for shots in shots_list:
            for seed in seeds:
                trainer = _run(config, os.path.join(root, f"{shots}shot-seed{seed}"), seed=seed, shots=shots)
                rows.setdefault(f"{shots} shots", {}).setdefault("top-1", []).append(trainer.evaluate()["test"])
        columns = ["top-1"]
    else:
        targets = targets or [None]
        columns = ["source"] + [_target_name(t) for t in targets]
        for seed in seeds:
            trainer = _run(config, os.path.join(root, f"seed{seed}"), seed=seed)
            row = rows.setdefault(config.method, {})
            row.setdefault("source", []).append(trainer.evaluate()["test"])
            for target, column in zip(targets, columns[1:]):
                row.setdefault(column, []).append(_evaluate_target(trainer, target, seed))
    table = [f"{name}: {config.method} on {config.data or 'the built-in shapes'}, seeds {list(seeds)}", "",
             "| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row, values in rows.items():
        table.append(f"| {row} | " + " | ".join(_mean_std(values.get(c, [])) for c in columns) + " |")
    text = "\n".join(table)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "summary.md"), "w") as f:
        f.write(text + "\n")
    return text, rows


def _target_name(target: Optional[str]) -> str:
    return "shapes, other seed" if target is None else os.path.basename(os.path.normpath(target))


def _evaluate_target(trainer: Trainer, target: Optional[str], seed: int) -> float:
    """Top-1 of a trained run on another dataset, all of its classes."""
    from ..data import build_task

    task = build_task(trainer.clip_model, target, shots=0, seed=seed + 1000 if target is None else seed,
                      synthetic_classes=trainer.config.synthetic_classes)
    dataset, classnames = task.evaluations["test"]
    return trainer.evaluate_on(dataset, classnames)
