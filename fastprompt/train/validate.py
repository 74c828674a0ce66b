"""Every setting of a run checked before anything is built, read or written: one table of checks over a
TrainConfig (types, ranges, paths, combinations), so that bad input ends in one clear message naming the
command-line flag, never in a traceback from deep inside torch or in a run that silently does something else.

`check_config` raises ConfigError with every problem found, joined on one line. The Trainer calls it first
(so the Python API gets the same checks as the command line), the protocols call it for every run they plan
before the first one trains; the other commands' arguments (bench, plot, compare, demo) are checked by
`check_arguments` from the same kind of table. What only the filesystem or the model can tell (images, shots
per class, depths against the model's blocks) is checked where it is read, still before the first step.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Iterable, Optional

from ..data import TRAIN_AUGMENTATION
from .errors import ConfigError

SCHEDULES = ("cosine", "dassl_cosine")
OPTIMIZERS = ("auto", "sgd", "adamw")
AUGMENTATIONS = TRAIN_AUGMENTATION  # what clip_transforms applies: Dassl's INPUT.TRANSFORMS names

# the command-line flag of a TrainConfig field, where it is not --field-with-dashes
FLAGS = {"method_config": "--opt", "num_workers": "--workers", "resume": "--no-resume", "progress": "--no-progress"}
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SUBSAMPLES = ("all", "base", "new")
SEED_LIMIT = 2**32  # numpy's seeds are below 2**32


def flag(field: str) -> str:
    return FLAGS.get(field, "--" + field.replace("_", "-"))


# ---- predicates --------------------------------------------------------------------------------------

def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def at_least(low: int) -> Callable:
    return lambda v: is_int(v) and v >= low


def optional(check: Callable) -> Callable:
    return lambda v: v is None or check(v)


def positive_number(v) -> bool:
    return is_number(v) and math.isfinite(v) and v > 0


def non_negative_number(v) -> bool:
    return is_number(v) and math.isfinite(v) and v >= 0


def one_of(choices: Iterable) -> Callable:
    choices = tuple(choices)
    return lambda v: v in choices


def boolean(v) -> bool:
    return isinstance(v, bool)


def _backends() -> tuple:
    from .. import backends

    return (backends.AUTO, *backends.BACKENDS)


def _methods() -> tuple:
    from .. import methods

    return tuple(methods.method_names())  # the methods and the baselines (zeroshot)


def _unknown_method(value) -> str:
    return f"unknown method {value!r}; methods are " + ", ".join(_methods())


# ---- the table: (field, predicate, what it takes) ------------------------------------------------------
# The message is "<flag> takes <what it takes>, got <value>" (or, where the third entry is a function, what
# it returns for the value); a predicate sees the field's value only, the combinations of fields come after.
FIELD_CHECKS = [
    ("method", lambda v: v in _methods(), _unknown_method),
    ("model", optional(lambda v: isinstance(v, str) and v != ""),
     "an open_clip model name or fastprompt-tiny / -small (none: read from the weights of --pretrained)"),
    ("pretrained", optional(lambda v: isinstance(v, str) and v != ""), "an open_clip tag or a checkpoint path"),
    ("quick_gelu", optional(boolean), "True or False (--quick-gelu / --no-quick-gelu)"),
    ("recipe", optional(lambda v: isinstance(v, str) and v != ""), "a recipe name (fastprompt recipes)"),
    ("method_config", optional(lambda v: isinstance(v, dict)), "key=value method options"),
    ("data", optional(lambda v: isinstance(v, str) and v != ""), "a dataset folder"),
    ("split_file", optional(lambda v: isinstance(v, str) and v != ""), "a split_*.json file"),
    ("image_dir", optional(lambda v: isinstance(v, str) and v != ""), "an image folder"),
    ("shots", at_least(0), "a number of training images per class, at least 1 (0: every image of a dataset "
                           "on disk)"),
    ("subsample", one_of(SUBSAMPLES), "all, base or new"),
    ("synthetic_classes", lambda v: is_int(v) and 2 <= v <= 10, "2 to 10 classes of the built-in shapes"),
    ("epochs", at_least(1), "a number of epochs, at least 1"),
    ("batch_size", at_least(1), "a batch size, at least 1"),
    ("eval_batch_size", at_least(1), "a batch size, at least 1"),
    ("lr", positive_number, "a learning rate, a finite number above 0"),
    ("optimizer", lambda v: v in OPTIMIZERS, "auto, sgd or adamw"),
    ("momentum", lambda v: is_number(v) and 0 <= v < 1, "a momentum from 0 up to (not including) 1"),
    ("weight_decay", non_negative_number, "a finite weight decay, at least 0"),
    ("warmup_epochs", lambda v: at_least(0)(v) or (isinstance(v, list) and len(v) > 0 and all(map(at_least(0), v))),
     "a number of warm-up epochs, at least 0 (or one per parameter group)"),
    ("warmup_lr", non_negative_number, "a finite warm-up learning rate, at least 0"),
    ("schedule", lambda v: v in SCHEDULES, lambda v: f"--schedule takes {', '.join(SCHEDULES)}, got {v!r}"),
    ("image_size", optional(at_least(1)), "an image size in pixels, at least 1"),
    ("augmentation", lambda v: isinstance(v, list) and all(a in AUGMENTATIONS for a in v),
     lambda v: f"--augmentation takes names among {', '.join(AUGMENTATIONS)}, got {v!r}"),
    ("max_steps", optional(at_least(1)), "a number of steps, at least 1"),
    ("backend", lambda v: v in _backends(), "auto, reference, triton or cuda"),
    ("precision", one_of(PRECISIONS), ", ".join(PRECISIONS)),
    ("device", lambda v: isinstance(v, str) and v != "", "auto, cpu, cuda or cuda:N"),
    ("seed", lambda v: is_int(v) and 0 <= v < SEED_LIMIT, f"a seed from 0 to {SEED_LIMIT - 1}"),
    ("deterministic", boolean, "True or False"),
    ("num_workers", at_least(0), "a number of DataLoader workers, at least 0"),
    ("eval_every", at_least(0), "a number of epochs between evaluations, at least 0 (0: only at the end)"),
    ("output", optional(lambda v: isinstance(v, str) and v != ""), "a run folder"),
    ("resume", boolean, "True or False"),
    ("progress", boolean, "True or False"),
]


def _field_problems(config: TrainConfig) -> list:
    problems = []
    for field, check, takes in FIELD_CHECKS:
        value = getattr(config, field)
        if not check(value):
            problems.append(takes(value) if callable(takes) else f"{flag(field)} takes {takes}, got {value!r}")
    return problems


def _path_problems(config: TrainConfig) -> list:
    """The dataset's paths that do not exist (a DataError, as when the dataset is read)."""
    problems = []
    if config.data is not None:
        if not os.path.isdir(config.data):
            what = "is a file, not a dataset folder" if os.path.exists(config.data) else "does not exist"
            problems.append(f"the data directory {config.data!r} {what}")
        if config.split_file is not None and not os.path.isfile(config.split_file):
            problems.append(f"the split file {config.split_file!r} does not exist")
        if config.image_dir is not None and not os.path.isdir(config.image_dir):
            problems.append(f"the image folder {config.image_dir!r} does not exist")
    return problems


def _combination_problems(config: TrainConfig) -> list:
    """What a field's value alone cannot tell: settings that only make sense together, the output folder,
    the method's options."""
    problems = []
    if config.data is None:
        for field in ("split_file", "image_dir"):
            if getattr(config, field) is not None:
                problems.append(f"{flag(field)} names a part of a dataset on disk: give the dataset with --data")
        if config.shots == 0:
            problems.append("--shots 0 (every image) applies to a dataset on disk; the built-in shapes are drawn "
                            "per class: give --shots 1 or more")
    if config.output is not None and os.path.exists(config.output) and not os.path.isdir(config.output):
        problems.append(f"--output {config.output!r} is a file, not a run folder")
    if config.method in _methods() and isinstance(config.method_config, dict):
        from .. import methods

        try:
            methods.check_options(config.method, config.method_config)
        except ValueError as exc:
            problems.append(str(exc))
    return problems


def check_config(config: TrainConfig) -> TrainConfig:
    """Raise ConfigError naming every problem of the run's settings (one line), or DataError for dataset paths
    that do not exist; return the config when there is none. Called before anything is built."""
    problems = _field_problems(config)
    if not problems:  # the combinations assume well-typed fields
        problems = _combination_problems(config)
    if problems:
        raise ConfigError("; ".join(problems))
    missing = _path_problems(config)
    if missing:
        from ..data import DataError

        raise DataError("; ".join(missing))
    return config


# ---- the other commands ---------------------------------------------------------------------------------

def check_arguments(command: str, checks: list) -> None:
    """checks: (flag, value, predicate, what it takes) rows of one command's arguments; ConfigError with every
    one that fails."""
    problems = [f"{command} {name} takes {takes}, got {value!r}" for name, value, check, takes in checks
                if not check(value)]
    if problems:
        raise ConfigError("; ".join(problems))


def check_method_names(names: Optional[list], command: str) -> None:
    """Names of methods that train (bench and the step benchmarks time training steps: no baselines)."""
    from .. import methods

    unknown = [n for n in names or [] if n not in methods.METHODS]
    if unknown:
        raise ConfigError(f"{command}: unknown method {', '.join(map(repr, unknown))}; methods are "
                          + ", ".join(methods.METHODS))


def check_backend_names(names: Optional[list], command: str) -> None:
    from .. import backends

    unknown = [n for n in names or [] if n not in backends.BACKENDS]
    if unknown:
        raise ConfigError(f"{command}: unknown backend {', '.join(map(repr, unknown))}; backends are "
                          + ", ".join(backends.BACKENDS))
