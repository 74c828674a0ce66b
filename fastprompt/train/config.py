"""The configuration of a training run (what `fastprompt train` takes on its command line)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Optional


@dataclass
class TrainConfig:
    """Defaults are the built-in run: DCP on the procedural shapes with a small random CLIP, about a minute
    on two CPU cores. The recipe follows the field (CoOp / Dassl): SGD with momentum 0.9 and weight decay
    5e-4, one warm-up epoch at a constant 1e-5, then a cosine schedule over the remaining epochs.

    optimizer "auto" is that SGD, except on the built-in data with random CLIP weights (no data, no
    pretrained), where it is AdamW: there the prompts' gradients differ by three orders of magnitude between
    the text context (the random text tower's LayerNorms amplify its small embeddings) and CMPA's weights,
    so SGD at one learning rate either blows the context up, collapsing every class's text feature onto one
    (the loss stalls at ln C), or leaves CMPA still. AdamW's per-parameter scaling learns the shapes."""

    method: str = "dcp"
    model: str = "fastprompt-tiny"
    pretrained: Optional[str] = None
    method_config: Optional[dict] = None  # None: the method's defaults, or SMALL_MODEL_CONFIGS on a small CLIP

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
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    max_steps: Optional[int] = None

    backend: str = "auto"
    precision: str = "auto"             # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    device: str = "auto"
    seed: int = 1
    deterministic: bool = False         # deterministic algorithms during the run (trainer.deterministic_mode)
    num_workers: int = 0
    eval_every: int = 1                 # epochs between evaluations (0: only at the end)
    output: str = "runs/latest"
    resume: bool = True                 # continue from output/checkpoint.pt when it exists
    progress: bool = True

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training options {unknown}; options are {sorted(known)}")
        return cls(**values)
