"""The prompt-learning methods on top of open_clip: `build(name, clip_model, classnames, **config)`.

Every method is an nn.Module with forward(images) -> logits (B, C), loss(images, labels) -> scalar (its
own extra terms included), trainable_parameters() (Parameters), parameter_groups(), set_epoch(epoch, epochs),
describe() and a state_dict() of the trained tensors only (the contract: PromptMethod). Methods
are imported when first built, so one method's module never weighs on another's import.
"""

from __future__ import annotations

import importlib
from typing import Iterable

from .base import PromptMethod, option_defaults
from .small import SMALL_MODEL_CONFIGS
from .checkpoints import load_public_checkpoint

# name -> "module:class" under fastprompt.methods
METHODS: dict[str, str] = {
    "coop": "coop:CoOp",
    "cocoop": "cocoop:CoCoOp",
    "vpt_deep": "vpt_deep:VPTDeep",
    "ivlp": "ivlp:IVLP",
    "maple": "maple:MaPLe",
    "dcp": "dcp:DCP",
    "dpt": "dpt:DPT",
    "map_dafe": "map_dafe:MAPDAFE",
    "tmml": "tmml:TMML",
}
# Baselines that train nothing (a run of one only evaluates): kept apart from METHODS, which the training-step
# tests and benchmarks go through.
BASELINES: dict[str, str] = {
    "zeroshot": "zeroshot:ZeroShotCLIP",
}


def method_names() -> list:
    """Every name `build` takes: the methods, then the baselines."""
    return [*METHODS, *BASELINES]


def method_class(name: str) -> type:
    registry = {**METHODS, **BASELINES}
    if name not in registry:
        raise ValueError(f"unknown method {name!r}; methods are {', '.join(registry)}")
    module, cls = registry[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def options(name: str) -> dict:
    """A method's config arguments and their defaults."""
    return option_defaults(method_class(name))


def check_options(name: str, config: dict) -> None:
    """ValueError for an unknown method, an option it does not have or a value of the wrong type (before
    anything is built: the harness calls it on a run's configuration, build() on every build)."""
    method_class(name).check_options(config)


def build(name: str, clip_model, classnames: Iterable[str], **config) -> PromptMethod:
    """The method `name` around a frozen open_clip model (its parameters are frozen in place)."""
    check_options(name, config)
    return method_class(name)(clip_model, classnames, **config)


__all__ = ["BASELINES", "METHODS", "PromptMethod", "SMALL_MODEL_CONFIGS", "build", "check_options",
           "load_public_checkpoint", "method_class", "method_names", "options"]
