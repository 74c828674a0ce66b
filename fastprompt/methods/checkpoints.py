"""Importing checkpoints written by the public codes into the matching method: CoOp / CoCoOp (KaiyangZhou/CoOp),
MaPLe, IVLP and VPT-deep (muzairkhattak/multimodal-prompt-learning), DCP (GingL/CMPA) and DPT (fanrena/DPT).

Those codes save Dassl checkpoints, {"state_dict": ..., "epoch": ...} files named model.pth.tar-N or
model-best.pth.tar, one per registered model in a folder of that name under the run's output folder:
- CoOp and CoCoOp register the prompt learner alone (prompt_learner/: "ctx", "meta_net.*");
- MaPLe, IVLP, VPT-deep and DCP register the whole model ("prompt_learner.*", the CLIP's "image_encoder.*" /
  "text_encoder.*", DCP's CMPA under "encoder.resblocks.<i>.prompt_attn.*");
- DPT registers three parts: prompt_learner/ ("ctx"), image_encoder.transformer.ctx_learner/ ("ctx": the
  VPT-deep prompts of blocks 0..bottom_limit−2) and image_encoder.transformer.extractor/ (CAVPT: "meta_nets",
  "attns", "lns", "lns2", "classfiers" per CAVPT block and "ctx", the learnable tokens of all of them).
A source is one such file, a loaded dict, or the run's output folder (its part folders are read and their keys
prefixed with the folder name, unless they already hold whole-model keys). The frozen CLIP part and the
recomputable token buffers (token_prefix / token_suffix) are ignored; every tensor the method trains must be
found, with its shape, and prompts the checkpoint holds for blocks the method does not prompt are an error.

Where the public models keep one tensor per block and fastprompt one tensor for all blocks, block i's tensor
lands in row i of fastprompt's (IVLP / VPT-deep: the image encoder's VPT is row 0 of visual_prompts and
resblocks.<i>.VPT_shallow row i; the text encoder's resblocks.<i>.VPT_shallow is row i − 1 of text_prompts;
DPT's extractor index i is CAVPT block bottom_limit − 1 + i).
"""

from __future__ import annotations

import os
import re
from typing import Optional, Union

import torch

from ..clip import unwrap_state_dict
from .base import PromptMethod

WHOLE_MODEL_ROOTS = ("prompt_learner", "image_encoder", "text_encoder", "encoder")


# ---- reading ------------------------------------------------------------------------------------

def _dassl_file(folder: str, epoch: Optional[int]) -> Optional[str]:
    """The checkpoint of one registered model: model.pth.tar-<epoch>, else model-best.pth.tar, else the last
    epoch's."""
    names = os.listdir(folder)
    if epoch is not None:
        wanted = f"model.pth.tar-{epoch}"
        return os.path.join(folder, wanted) if wanted in names else None
    if "model-best.pth.tar" in names:
        return os.path.join(folder, "model-best.pth.tar")
    numbered = sorted((int(m.group(1)), n) for n in names if (m := re.fullmatch(r"model\.pth\.tar-(\d+)", n)))
    return os.path.join(folder, numbered[-1][1]) if numbered else None


def _read_folder(root: str, epoch: Optional[int]) -> dict:
    """A Dassl output folder: every registered model's checkpoint, merged."""
    merged = {}
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        path = _dassl_file(folder, epoch) if os.path.isdir(folder) else None
        if path is None:
            continue
        state = unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=False))
        whole = any(k.split(".", 1)[0] in WHOLE_MODEL_ROOTS for k in state)
        merged.update(state if whole else {f"{name}.{k}": v for k, v in state.items()})
    if not merged:
        raise FileNotFoundError(f"{root} holds no Dassl checkpoints (<model>/model-best.pth.tar or "
                                f"<model>/model.pth.tar-N{'' if epoch is None else f' for epoch {epoch}'})")
    return merged


def _read(source, epoch: Optional[int] = None) -> dict:
    if isinstance(source, (str, os.PathLike)):
        if os.path.isdir(source):
            return _read_folder(str(source), epoch)
        source = torch.load(source, map_location="cpu", weights_only=False)
    return unwrap_state_dict(source)


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


# ---- layouts ------------------------------------------------------------------------------------

def _per_block(state: dict, prefix: str, suffix: str) -> dict:
    """{block index: tensor} of the keys prefix<i>.suffix."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\." + re.escape(suffix) + "$")
    return {int(m.group(1)): v for k, v in state.items() if (m := pattern.match(k))}


def _stack_blocks(method: str, found: dict, blocks: range, key: str) -> Optional[torch.Tensor]:
    """The per-block tensors of `blocks` stacked in block order; None when the checkpoint has none of them
    (the caller reports the missing tensor). Prompts for other blocks are an error: loading without them
    would be another model."""
    extra = sorted(set(found) - set(blocks))
    if extra:
        raise ValueError(f"{method}: the checkpoint holds {key.replace('<i>', str(extra[0]))} (blocks {extra}), but "
                         f"this method prompts blocks {list(blocks)} there: build it with the checkpoint's depth")
    missing = [i for i in blocks if i not in found]
    if missing:
        if len(missing) == len(blocks):
            return None
        raise KeyError(f"{method}: the checkpoint lacks {key.replace('<i>', str(missing[0]))} (blocks {missing})")
    return torch.stack([found[i] for i in blocks]) if len(blocks) else None


def _vpt_keys(method, state: dict) -> dict:
    """The vision side of IVLP and VPT-deep: image_encoder.VPT (block 0) and the VPT_shallow of blocks 1..depth−1."""
    out = {}
    deep = _per_block(state, "image_encoder.transformer.resblocks.", "VPT_shallow")
    depth = method.depth_vision if method.name == "ivlp" else method.depth
    if "image_encoder.VPT" in state:
        deep = {**deep, 0: state["image_encoder.VPT"]}
    stacked = _stack_blocks(method.name, deep, range(depth),
                            "image_encoder.transformer.resblocks.<i>.VPT_shallow (block 0: image_encoder.VPT)")
    if stacked is not None:
        out["visual_prompts"] = stacked
    return out


def _ivlp_keys(method, state: dict) -> dict:
    out = _vpt_keys(method, state)
    if "prompt_learner.ctx" in state:
        out["ctx"] = state["prompt_learner.ctx"]
    deep = _per_block(state, "text_encoder.transformer.resblocks.", "VPT_shallow")
    stacked = _stack_blocks("ivlp", deep, range(1, method.depth_text),
                            "text_encoder.transformer.resblocks.<i>.VPT_shallow")
    if stacked is not None:
        out["text_prompts"] = stacked
    return out


# DPT's CAVPT extractor (public name -> fastprompt's CAVPT module), per CAVPT block i
DPT_EXTRACTOR = {"meta_nets.<i>.weight": "query.weight", "meta_nets.<i>.bias": "query.bias",
                 "attns.<i>.qmlp.weight": "q_proj.weight", "attns.<i>.kmlp.weight": "k_proj.weight",
                 "attns.<i>.vmlp.weight": "out_proj.weight",
                 "lns.<i>.weight": "ln_aux.weight", "lns.<i>.bias": "ln_aux.bias",  # LN before the aux classifier
                 "lns2.<i>.weight": "ln_out.weight", "lns2.<i>.bias": "ln_out.bias",  # LN(out + query): the prompts
                 "classfiers.<i>.weight": "classifier.weight"}


def _dpt_keys(method, state: dict) -> dict:
    state = _strip(state, "image_encoder.transformer.")
    out = {}
    if "prompt_learner.ctx" in state:
        out["ctx"] = state["prompt_learner.ctx"]
    if "ctx_learner.ctx" in state:
        out["visual_prompts"] = state["ctx_learner.ctx"]
    n_blocks = len(method.cavpt)
    for public, ours in DPT_EXTRACTOR.items():
        prefix, suffix = public.split("<i>.")
        found = _per_block(state, "extractor." + prefix, suffix)
        extra = sorted(set(found) - set(range(n_blocks)))
        if extra:
            raise ValueError(f"dpt: the checkpoint has CAVPT blocks {sorted(found)} (extractor.{prefix}<i>), this "
                             f"method {n_blocks}: build it with the checkpoint's bottom_limit")
        out.update({f"cavpt.{i}.{ours}": v for i, v in found.items()})
    tokens = state.get("extractor.ctx")  # (CAVPT blocks, tokens, Dv), one row per block
    if tokens is not None:
        if tokens.shape[0] != n_blocks:
            raise ValueError(f"dpt: extractor.ctx holds the tokens of {tokens.shape[0]} CAVPT blocks, this method has "
                             f"{n_blocks}: build it with the checkpoint's bottom_limit")
        out.update({f"cavpt.{i}.tokens": tokens[i] for i in range(n_blocks)})
    for key, value in state.items():  # the same tokens saved one block per key, extractor.ctx.<i>
        if m := re.fullmatch(r"extractor\.ctx\.(\d+)", key):
            if int(m.group(1)) >= n_blocks:
                raise ValueError(f"dpt: the checkpoint has {key}, this method {n_blocks} CAVPT blocks: build it "
                                 "with the checkpoint's bottom_limit")
            out[f"cavpt.{m.group(1)}.tokens"] = value
    return out


def _dcp_keys(method, state: dict) -> dict:
    """DCP's CMPA lives in the blocks: shared, every block holds the same module; per layer, block i (1..depth)
    holds its own."""
    if method.couple_text:
        raise ValueError("dcp: the public DCP code never writes CMPA's text output back into the text stream, so "
                         "its checkpoints are of the model couple_text=False (their text half of CMPA never "
                         "trained: it gets no gradient there). This method has couple_text=True, where that "
                         "untrained half would rewrite the text prompts: build it with couple_text=False to load it")
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


LAYOUTS = {"coop": lambda m, s: _strip(s, "prompt_learner."), "cocoop": lambda m, s: _strip(s, "prompt_learner."),
           "maple": lambda m, s: _strip(s, "prompt_learner."), "ivlp": _ivlp_keys, "vpt_deep": _vpt_keys,
           "dcp": _dcp_keys, "dpt": _dpt_keys}


def load_public_checkpoint(method: PromptMethod, source: Union[str, os.PathLike, dict],
                           epoch: Optional[int] = None) -> list[str]:
    """Load a public-code checkpoint (a file, a loaded dict, or a Dassl output folder: `epoch` picks
    model.pth.tar-<epoch> there, else model-best.pth.tar, else the last) into `method`; returns the keys it
    loaded. The method's cached evaluation text features are dropped."""
    if method.name not in LAYOUTS:
        raise ValueError(f"no public checkpoint layout is known for {method.name}; known: {', '.join(LAYOUTS)}")
    state = _read(source, epoch)
    mapped = LAYOUTS[method.name](method, state)
    wanted = method.state_dict()
    missing = [k for k in wanted if k not in mapped]
    if missing:
        raise KeyError(f"{method.name}: the checkpoint lacks {missing} (it has {sorted(state)[:12]}...)")
    for key in wanted:
        if tuple(mapped[key].shape) != tuple(wanted[key].shape):
            raise ValueError(f"{method.name}: {key} has shape {tuple(mapped[key].shape)} in the checkpoint but "
                             f"{tuple(wanted[key].shape)} in this method (check n_ctx, depth and the CLIP widths)")
    method.load_state_dict({k: mapped[k].to(wanted[k].dtype) for k in wanted})  # which clears the text cache
    return sorted(wanted)
