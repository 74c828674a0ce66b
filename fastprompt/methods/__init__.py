"""The prompt-learning methods on top of open_clip: `build(name, clip_model, classnames, **config)`.

Every method is an nn.Module with forward(images) -> logits (B, C), loss(images, labels) -> scalar (its
own extra terms included), trainable_parameters() and a state_dict() of the trained tensors only.
"""

from __future__ import annotations

import inspect
from typing import Iterable

from .base import PromptMethod
from .cocoop import CoCoOp
from .coop import CoOp
from .ivlp import IVLP
from .maple import MaPLe
from .vpt_deep import VPTDeep

METHODS: dict[str, type] = {
    "coop": CoOp,
    "cocoop": CoCoOp,
    "vpt_deep": VPTDeep,
    "ivlp": IVLP,
    "maple": MaPLe,
}


def options(name: str) -> dict:
    """A method's config arguments and their defaults."""
    cls = _method(name)
    params = list(inspect.signature(cls.__init__).parameters.values())[3:]
    return {p.name: p.default for p in params}


def _method(name: str) -> type:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; methods are {', '.join(METHODS)}")
    return METHODS[name]


def build(name: str, clip_model, classnames: Iterable[str], **config) -> PromptMethod:
    """The method `name` around a frozen open_clip model (its parameters are frozen in place)."""
    cls = _method(name)
    known = options(name)
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise ValueError(f"{name} has no option {', '.join(unknown)}; its options are "
                         + ", ".join(f"{k}={v!r}" for k, v in known.items()))
    return cls(clip_model, classnames, **config)


__all__ = ["METHODS", "PromptMethod", "build", "options"] + [cls.__name__ for cls in METHODS.values()]
