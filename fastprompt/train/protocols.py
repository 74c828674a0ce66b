"""The field's evaluation protocols as recipes: each trains and evaluates the runs it needs, over seeds, and
ends in a summary table (mean ± std over seeds), as the papers report them.

  base2new      train on the base half of the classes (16 shots), report base, new and their harmonic mean
  fewshot       K = 1, 2, 4, 8, 16 shots on all classes, top-1 per K
  cross_dataset train on a source dataset (all classes, 16 shots), top-1 on the source and on each target
  domain_generalization   the same with the target datasets as shifted versions of the source (ImageNet →
                ImageNetV2, -Sketch, -A, -R in the papers)

With no data the recipes run on the built-in shapes; a target of the transfer recipes is then the shapes
drawn with another seed (new images of the same classes), which exercises the recipe, not a real transfer.

Every run a protocol will make is planned first and its requirements checked before the first one trains:
its settings (validate.check_config), its shots per class and every image it will read (on disk), and the
target datasets; an error found there costs seconds, not the runs before it.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
from typing import Optional

from .config import ConfigError, TrainConfig, fresh_output
from .trainer import Trainer
from .validate import check_config, is_int

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


# the settings a protocol sets itself, per protocol: giving them as well is an error, not a silent override
SET_BY = {"base2new": {"subsample": "base2new trains on the base classes", "seed": "the protocol runs --seeds"},
          "fewshot": {"shots": "fewshot trains with each K of --shots-list", "seed": "the protocol runs --seeds",
                      "subsample": "fewshot trains on all classes"},
          "cross_dataset": {"seed": "the protocol runs --seeds", "subsample": "the source trains on all classes"},
          "domain_generalization": {"seed": "the protocol runs --seeds",
                                    "subsample": "the source trains on all classes"}}


def check_protocol_flags(name: str, given: set) -> None:
    """ConfigError for a run option (TrainConfig field) given on the command line that protocol `name` sets
    itself."""
    from .validate import flag

    if name not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {name!r}; protocols are {', '.join(PROTOCOLS)}")
    clashes = [f"{flag(field)}: {why}" for field, why in SET_BY[name].items() if field in given]
    if clashes:
        raise ConfigError(f"{name} sets these itself, leave them out: " + "; ".join(clashes))


def _check_list(what: str, values, low: int) -> list:
    values = list(values)
    if not values or not all(is_int(v) and v >= low for v in values):
        raise ConfigError(f"{what} takes whole numbers of at least {low}, got {values}")
    if len(set(values)) != len(values):
        raise ConfigError(f"{what} lists {sorted(v for v in set(values) if values.count(v) > 1)} twice: each run "
                          "would overwrite the other's folder")
    return values


def plan(name: str, config: TrainConfig, seeds, targets: Optional[list], shots_list) -> list:
    """The runs of protocol `name`: (folder name, config changes) in the order they train. Checks the
    protocol's own arguments."""
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {name!r}; protocols are {', '.join(PROTOCOLS)}")
    seeds = _check_list("--seeds", seeds, 0)
    if targets is not None and name not in ("cross_dataset", "domain_generalization"):
        raise ConfigError(f"--targets applies to cross_dataset and domain_generalization, not {name}")
    if shots_list is not None and name != "fewshot":
        raise ConfigError(f"--shots-list applies to fewshot, not {name} (it trains with --shots)")
    if name == "base2new":
        return [(f"seed{seed}", dict(seed=seed, subsample="base")) for seed in seeds]
    if name == "fewshot":
        shots = _check_list("--shots-list", FEW_SHOTS if shots_list is None else shots_list, 1)
        return [(f"{k}shot-seed{seed}", dict(seed=seed, shots=k)) for k in shots for seed in seeds]
    return [(f"seed{seed}", dict(seed=seed)) for seed in seeds]


def check_runs(config: TrainConfig, runs: list, targets: Optional[list]) -> None:
    """Everything the planned runs need that can be known without training: each one's settings, its shots
    per class and readable images (on disk), and the targets' test images (all a target is read for); raises
    on the first problem."""
    from ..data import task_records

    for _, changes in runs:
        run = check_config(dataclasses.replace(config, **changes))
        if run.data is not None:
            task_records(run.data, shots=run.shots, seed=run.seed, subsample=run.subsample,
                         split_file=run.split_file, image_dir=run.image_dir)
    for target in targets or []:
        if not os.path.isdir(target):
            raise ConfigError(f"the target dataset {target!r} does not exist")
        task_records(target, train=False)


def run_protocol(name: str, config: TrainConfig, seeds=(1, 2, 3), targets: Optional[list] = None,
                 shots_list=None) -> tuple[str, dict]:
    """Run protocol `name` from the base `config` (its output folder holds one folder per run); returns the
    markdown summary table and the raw numbers {row: {column: [value per seed]}}. shots_list (fewshot only)
    defaults to 1, 2, 4, 8, 16. Every run is checked before the first trains (module docstring)."""
    seeds = (1, 2, 3) if seeds is None else seeds
    runs = plan(name, config, seeds, targets, shots_list)
    check_runs(config, runs, targets)
    root = config.output
    if root is None:  # a fresh runs/<protocol>-<method>-<time>: every rank must name the same one itself
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("under torchrun a protocol needs an explicit --output (the same on every rank)")
        root = fresh_output(f"{name}-{config.method}")
    rows: dict = {}
    targets = targets or [None]
    columns = {"base2new": ["base", "new", "hm"], "fewshot": ["top-1"]}.get(
        name, ["source"] + [_target_name(t) for t in targets])
    for folder, changes in runs:
        trainer = _run(config, os.path.join(root, folder), **changes)
        last = trainer.evaluate()
        if name == "base2new":
            for column in columns:
                rows.setdefault(config.method, {}).setdefault(column, []).append(last[column])
        elif name == "fewshot":
            rows.setdefault(f"{changes['shots']} shots", {}).setdefault("top-1", []).append(last["test"])
        else:
            row = rows.setdefault(config.method, {})
            row.setdefault("source", []).append(last["test"])
            for target, column in zip(targets, columns[1:]):
                row.setdefault(column, []).append(_evaluate_target(trainer, target, changes["seed"]))
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

    # a target on disk is only evaluated (train=False); the shapes draw a train set of at least 1 shot
    task = build_task(trainer.clip_model, target, shots=1, train=target is None,
                      seed=seed + 1000 if target is None else seed,
                      synthetic_classes=trainer.config.synthetic_classes)
    dataset, classnames = task.evaluations["test"]
    return trainer.evaluate_on(dataset, classnames)
