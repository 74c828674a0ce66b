"""The baseline of the text-tower benchmarks: open_clip's own encode_text run on CoOp's prompted sequences.

Prompt-learning code (CoOp's public code and its descendants) builds the prompted token embeddings by
concatenation, [SOS] + context + the rest of the tokenized template, and then runs the rest of the CLIP's
encode_text on them: positional embedding, the transformer with its causal mask over all 77 tokens,
ln_final, pooling at EOT, projection. `open_clip_text_features` does exactly that with open_clip's modules
and functions (its Transformer, its attention mask, its text_global_pool), not with fastprompt's code, so the
speed-ups of the packed path are measured against what users run today.
"""

from __future__ import annotations

import torch
from open_clip.transformer import text_global_pool
from torch import Tensor, nn


def prompted_embeddings(coop) -> Tensor:
    """CoOp's prompted token embeddings (C, L, D) built as its public code builds them: the frozen template
    embeddings with the shared context concatenated after SOS (gradients reach coop.ctx)."""
    start = coop.prompts.starts("ctx") if "ctx" in coop.prompts.slot_names else None
    if not isinstance(start, int) or coop.ctx.dim() != 2:
        raise ValueError("the open_clip baseline builds CoOp's default prompt only: one shared context, class "
                         "token at the end (class_token_position='end', class_specific=False)")
    frozen = coop.prompts.embeddings
    ctx = coop.ctx.to(frozen.dtype).expand(frozen.shape[0], -1, -1)
    return torch.cat([frozen[:, :start], ctx, frozen[:, start + ctx.shape[1]:]], dim=1)


def open_clip_text_features(model: nn.Module, embeddings: Tensor, ids: Tensor) -> Tensor:
    """open_clip's CLIP.encode_text from the token embedding on (open_clip 3.x), on given token embeddings
    (N, L, D); `ids` (N, L) are the token ids, which open_clip pools by (argmax: the EOT)."""
    if hasattr(model, "text"):
        raise ValueError("the open_clip baseline runs open_clip.CLIP's encode_text (text tower parts on the model "
                         f"itself); got {type(model).__name__} with a separate text tower")
    cast_dtype = model.transformer.get_cast_dtype()
    x = embeddings.to(cast_dtype) + model.positional_embedding.to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    x = text_global_pool(x, ids, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    proj = model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return x


def open_clip_coop_text_features(coop) -> Tensor:
    """CoOp's text features (C, E) through open_clip's encode_text on the full 77-token sequences."""
    return open_clip_text_features(coop.clip.model, prompted_embeddings(coop), coop.prompts.ids)


def open_clip_coop_logits(coop, images: Tensor) -> Tensor:
    """CoOp's logits as its public code computes them: open_clip's encode_image and the open_clip text
    features, both L2-normalised, scaled by the CLIP's logit scale."""
    model = coop.clip.model
    with torch.no_grad():
        image = model.encode_image(images, normalize=True)
    text = open_clip_coop_text_features(coop)
    text = text / text.norm(dim=-1, keepdim=True)
    return model.logit_scale.exp() * image @ text.t()
