"""The configuration of a training run (what `fastprompt train` takes on its command line)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional, Union

RUNS_DIR = "runs"

from .errors import ConfigError  # noqa: F401  (re-exported: the harness's errors are raised from here too)
from .validate import AUGMENTATIONS, SCHEDULES, check_config


@dataclass
class TrainConfig:
    """Defaults are the built-in run: DCP on the procedural shapes with a small random CLIP, about a minute
    on two CPU cores. The recipe follows the field (CoOp / Dassl): SGD with momentum 0.9 and weight decay
    5e-4, one warm-up epoch at a constant 1e-5, then a cosine schedule over the remaining epochs.

    optimizer "auto" is that SGD, except on the built-in data with random CLIP weights (no data, no
    pretrained), where it is AdamW: there the prompts' gradients differ by three orders of magnitude between
    the text context (the random text tower's LayerNorms amplify its small embeddings) and CMPA's weights,
    so SGD at one learning rate either blows the context up, collapsing every class's text feature onto one
    (the loss stalls at ln C), or leaves CMPA still. AdamW's per-parameter scaling learns the shapes.

    The knobs the public codes' configs need (train/recipes.py): `schedule` "dassl_cosine" is Dassl's cosine,
    CosineAnnealingLR(T_max=epochs) restarted after the warm-up, lr(e) = ½·lr·(1 + cos(π(e − W)/epochs)) for
    e >= W (it never reaches 0), where "cosine" (the default) spans the epochs after the warm-up,
    ½·lr·(1 + cos(π(e − W)/(epochs − W))). `warmup_epochs` W may be a list, one per parameter group of the
    method in its order (DPT: the CoOp context, then the rest), for codes that warm their groups apart.
    `image_size` (None: the model's) is checked against the model; `augmentation` lists the training
    transforms of images on disk by Dassl's INPUT.TRANSFORMS names (data.clip_transforms: random resized crop,
    else a resize to the image size; horizontal flip; normalisation by the model's mean and std)."""

    method: str = "dcp"
    model: Optional[str] = "fastprompt-tiny"  # None: the architecture read from the weights of `pretrained`
    pretrained: Optional[str] = None
    quick_gelu: Optional[bool] = None   # the activation where neither the weights nor the model name say it
    method_config: Optional[dict] = None  # None: the method's defaults, or SMALL_MODEL_CONFIGS on a small CLIP
    recipe: Optional[str] = None        # the recipe the run was resolved from (a record; its values are above)

    data: Optional[str] = None          # None: the built-in procedural dataset
    split_file: Optional[str] = None
    image_dir: Optional[str] = None
    shots: int = 16
    subsample: str = "all"              # all | base | new (base-to-new: train on base, evaluate base and new)
    synthetic_classes: int = 8

    epochs: int = 50
    batch_size: int = 32
    eval_batch_size: int = 64
    lr: float = 0.02
    optimizer: str = "auto"             # auto | sgd | adamw (auto: adamw on the built-in data with random weights)
    momentum: float = 0.9               # SGD's
    weight_decay: float = 5e-4
    warmup_epochs: Union[int, list] = 1  # a list: one per parameter group of the method
    warmup_lr: float = 1e-5
    schedule: str = "cosine"            # cosine | dassl_cosine
    image_size: Optional[int] = None    # None: the model's input size
    augmentation: list = field(default_factory=lambda: list(AUGMENTATIONS))
    max_steps: Optional[int] = None

    backend: str = "auto"
    precision: str = "auto"             # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    device: str = "auto"
    seed: int = 1
    deterministic: bool = False         # deterministic algorithms during the run (trainer.deterministic_mode)
    num_workers: int = 0
    eval_every: int = 1                 # epochs between evaluations (0: only at the end)
    output: Optional[str] = None        # None: a fresh runs/<method>-<time>, with runs/latest pointing to it
    resume: bool = True                 # continue from output/checkpoint.pt when `output` names a run
    progress: bool = True

    def validate(self) -> "TrainConfig":
        """Every setting checked (train/validate.py's table); ConfigError / DataError naming each problem, else
        the config itself. The Trainer calls it before anything is built."""
        return check_config(self)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown training options {unknown}; options are {sorted(known)}")
        return cls(**values)


# What a resumed run must share with the run it continues: everything that changes its trajectory. The rest
# (output, device, backend, workers, evaluation, progress, max_steps, deterministic) may differ.
RESUME_KEYS = ("method", "model", "pretrained", "quick_gelu", "method_config", "data", "split_file", "image_dir",
               "shots", "subsample", "synthetic_classes", "epochs", "batch_size", "lr", "optimizer", "momentum",
               "weight_decay", "warmup_epochs", "warmup_lr", "schedule", "image_size", "augmentation", "precision",
               "seed")


def config_differences(saved: TrainConfig, asked: TrainConfig) -> list:
    """The options (RESUME_KEYS) on which a resume differs from the saved run, as 'key: saved -> asked'."""
    return [f"{key}: {getattr(saved, key)!r} -> {getattr(asked, key)!r}" for key in RESUME_KEYS
            if getattr(saved, key) != getattr(asked, key)]


def fresh_output(stem: str, parent: str = RUNS_DIR) -> str:
    """Create and return a new run folder parent/<stem>-<YYYYmmdd-HHMMSS>[-n], and point parent/latest at it
    (a symbolic link, replaced atomically; skipped where links cannot be made). A default run therefore never
    resumes, or collides with, an earlier one: only an explicit --output names a run to resume."""
    os.makedirs(parent, exist_ok=True)
    base = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in range(1, 1000):
        name = base if n == 1 else f"{base}-{n}"
        try:
            os.mkdir(os.path.join(parent, name))
            break
        except FileExistsError:
            continue
    else:
        raise ConfigError(f"could not create a fresh run folder {base} in {parent}")
    latest, tmp = os.path.join(parent, "latest"), os.path.join(parent, f".latest-{os.getpid()}")
    try:
        if os.path.lexists(latest) and not os.path.islink(latest):
            pass  # a real folder called latest (an old default run): left alone
        else:
            os.symlink(name, tmp)
            os.replace(tmp, latest)
    except OSError:
        pass
    return os.path.join(parent, name)
