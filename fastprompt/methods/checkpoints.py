"""Importing checkpoints written by the public codes of CoOp / CoCoOp (KaiyangZhou/CoOp), MaPLe
(muzairkhattak/multimodal-prompt-learning) and DCP (GingL/CMPA) into the matching method.

Those codes save Dassl checkpoints, {"state_dict": ..., "epoch": ...} files named model.pth.tar-N or
model-best.pth.tar. CoOp and CoCoOp save the prompt learner alone ("ctx", "meta_net.*"); MaPLe and DCP
save the whole model ("prompt_learner.*", DCP's CMPA under "encoder.resblocks.<i>.prompt_attn.*", and the
CLIP weights). The frozen CLIP part and the recomputable token buffers (token_prefix / token_suffix) are
ignored; every tensor the method trains must be found, with its shape.
"""

from __future__ import annotations

import os
import re
from typing import Union

import torch

from .base import PromptMethod


def _read(source) -> dict:
    if isinstance(source, (str, os.PathLike)):
        source = torch.load(source, map_location="cpu", weights_only=False)
    state = source.get("state_dict", source) if isinstance(source, dict) else source
    # DataParallel / DDP wrappers prefix every key with "module."
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def _dcp_keys(method, state: dict) -> dict:
    """DCP's CMPA lives in the blocks: shared, every block holds the same module; per layer, block i (1..depth)
    holds its own."""
    out = {}
    for key, value in state.items():
        if key in ("prompt_learner.prompts_text", "prompt_learner.prompts_visual"):
            out[key.split(".", 1)[1]] = value
            continue
        found = re.match(r"(?:encoder\.)?resblocks\.(\d+)\.prompt_attn\.(.+)", key)
        if not found:
            continue
        block, name = int(found.group(1)), found.group(2)
        if method.parameter_sharing:
            out.setdefault(f"cmpa.{name}", value)
        elif 1 <= block <= method.depth:
            out[f"cmpa.{block - 1}.{name}"] = value
    return out


def load_public_checkpoint(method: PromptMethod, source: Union[str, os.PathLike, dict]) -> list[str]:
    """Load a public-code checkpoint (path or loaded dict) into `method`; returns the keys it loaded."""
    state = _read(source)
    if method.name in ("coop", "cocoop", "maple"):
        mapped = _strip(state, "prompt_learner.")
    elif method.name == "dcp":
        mapped = _dcp_keys(method, state)
    else:
        raise ValueError(f"no public checkpoint layout is known for {method.name}; known: coop, cocoop, maple, dcp")
    wanted = method.state_dict()
    missing = [k for k in wanted if k not in mapped]
    if missing:
        raise KeyError(f"{method.name}: the checkpoint lacks {missing} (it has {sorted(state)[:12]}...)")
    for key in wanted:
        if tuple(mapped[key].shape) != tuple(wanted[key].shape):
            raise ValueError(f"{method.name}: {key} has shape {tuple(mapped[key].shape)} in the checkpoint but "
                             f"{tuple(wanted[key].shape)} in this method (check n_ctx, depth and the CLIP widths)")
    method.load_state_dict({k: mapped[k].to(wanted[k].dtype) for k in wanted})
    return sorted(wanted)
