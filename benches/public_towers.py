"""The two CLIP towers computed the way the public prompt-learning codes compute them: the baseline of
benches/train_step_figures.py.

CoOp, CoCoOp, MaPLe, DCP and DPT all run a copy of OpenAI's clip/model.py. There the stream is
sequence-first (`x.permute(1, 0, 2)`, LND); a block is `x + attn(ln_1(x))`, `x + mlp(ln_2(x))` with
`nn.MultiheadAttention(x, x, x, need_weights=False, attn_mask=mask)`; the text tower runs all 77 tokens of
every sequence under a float causal mask and is pooled at the argmax of the token ids; prompt rows are
written by `torch.cat` of slices of the stream. This module does the same over the parameters of an
open_clip CLIP, read as those codes read OpenAI's: the model's own attributes (`positional_embedding`,
`transformer.resblocks`, `ln_final`, `text_projection`, `visual.*`), so both paths of the figures run the
same weights and nothing of fastprompt's computation is used here.

Every block runs inside the profiler scope of its tower (the scopes fastprompt's blocks run in), so that
`fastprompt.train.bench.parts_of` splits a profile of either path alike.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from fastprompt.clip.backbone import IMAGE_SCOPE, TEXT_SCOPE

Rewrite = Optional[Callable[[int, Tensor], Tensor]]  # (layer, LND stream) -> LND stream


def check_model(model: nn.Module) -> None:
    """The public codes' CLIP keeps its text tower's parts on the model itself (open_clip's `CLIP`)."""
    if hasattr(model, "text"):
        raise ValueError("the public codes' way runs CLIP models whose text tower parts are on the model itself "
                         f"(open_clip.CLIP); got {type(model).__name__} with a separate text tower")


def causal_mask(length: int, device) -> Tensor:
    """clip/model.py's build_attention_mask: a float mask, -inf above the diagonal."""
    return torch.full((length, length), float("-inf"), device=device).triu_(1)


def residual_block(block: nn.Module, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
    """clip/model.py's ResidualAttentionBlock on an LND stream (L, N, D), over an open_clip block's modules.

    open_clip's nn.MultiheadAttention is batch-first: it is handed the (N, L, D) view of the LND tensor, which
    it transposes back itself, so the attention runs on the same LND memory as in the public codes."""
    h = block.ln_1(x).transpose(0, 1)
    mask = attn_mask.to(h.dtype) if attn_mask is not None else None
    x = x + block.ls_1(block.attn(h, h, h, need_weights=False, attn_mask=mask)[0].transpose(0, 1))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


# ---- text -------------------------------------------------------------------------------------------

def text_stream(model: nn.Module, prompts: Tensor) -> Tensor:
    """The TextEncoder's input: prompted token embeddings (N, L, D) + positional embedding, as LND."""
    return (prompts + model.positional_embedding.to(prompts.dtype)).permute(1, 0, 2)


def text_features(model: nn.Module, x: Tensor, ids: Tensor) -> Tensor:
    """The TextEncoder's output: LND stream → NLD, ln_final on every token, the argmax (EOT) row projected."""
    x = model.ln_final(x.permute(1, 0, 2))
    x = x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]
    proj = model.text_projection
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


def encode_text(model: nn.Module, prompts: Tensor, ids: Tensor, before_block: Rewrite = None) -> Tensor:
    """The public codes' TextEncoder: prompts (N, 77, D), the token embeddings with the learned rows already
    cat'd in, through every block over all 77 tokens; `before_block(layer, x)` may rewrite the LND stream
    before a block (MaPLe's deeper prompts) → text features (N, E)."""
    check_model(model)
    x = text_stream(model, prompts)
    mask = causal_mask(x.shape[0], x.device)
    for layer, block in enumerate(model.transformer.resblocks):
        if before_block is not None:
            x = before_block(layer, x)
        with torch.profiler.record_function(TEXT_SCOPE):
            x = residual_block(block, x, mask)
    return text_features(model, x, ids)


# ---- image ------------------------------------------------------------------------------------------

def image_stem(model: nn.Module, images: Tensor) -> Tensor:
    """VisionTransformer.forward up to its positional embedding: (B, 1 + P, Dv), batch-first (where the
    public codes append their first visual prompts)."""
    v = model.visual
    x = v.conv1(images.to(v.conv1.weight.dtype))
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = v.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)
    return torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)


def image_blocks(model: nn.Module, x: Tensor, before_block: Rewrite = None, after_block: Rewrite = None) -> Tensor:
    """The image blocks over an LND stream (after ln_pre), with optional rewrites before and after each."""
    for layer, block in enumerate(model.visual.transformer.resblocks):
        if before_block is not None:
            x = before_block(layer, x)
        with torch.profiler.record_function(IMAGE_SCOPE):
            x = residual_block(block, x)
        if after_block is not None:
            x = after_block(layer, x)
    return x


def image_features(model: nn.Module, x: Tensor) -> Tensor:
    """The last block's LND output → ln_post of the class token → projection (B, E)."""
    v = model.visual
    x = v.ln_post(x.permute(1, 0, 2)[:, 0, :])
    return x @ v.proj if v.proj is not None else x


def encode_image(model: nn.Module, images: Tensor) -> Tensor:
    """The unprompted VisionTransformer.forward (`clip_model.visual(image)`): (B, E)."""
    x = model.visual.ln_pre(image_stem(model, images)).permute(1, 0, 2)
    return image_features(model, image_blocks(model, x))


def clip_logits(model: nn.Module, image: Tensor, text: Tensor) -> Tensor:
    """CustomCLIP's logits: both features divided by their norms, scaled by exp(logit_scale)."""
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    return model.logit_scale.exp() * image @ text.t()
