"""A frozen open_clip CLIP driven block by block, so that prompt methods can rewrite prompt rows between
blocks and the fused insertion + LayerNorm can stand in for a block's ln_1.

The block forward is re-implemented over each block's own parameters (no weight copies): with no hooks the
towers reproduce open_clip's `encode_image` / `encode_text` to float rounding. Supported: CLIP models whose
image tower is a ViT (`VisionTransformer` with class-token pooling, no attentional pooler, no patch dropout)
and whose text tower is a causal transformer pooled at EOT: OpenAI and LAION ViT-B/32, ViT-B/16, ViT-L/14
and their like, in `CLIP` or `CustomTextCLIP`. Anything else gets an error naming what is unsupported.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint


class UnsupportedModelError(ValueError):
    """The open_clip model has a part fastprompt cannot drive; the message names it."""


class BlockHooks:
    """What a prompt method does around each transformer block. The default does nothing.

    before(layer, x) -> (x, x_ln): rewrite rows of the stream before block `layer`; return x_ln = ln_1(x)
        when it was computed on the way (the fused insertion), else None and the block applies ln_1.
    after(layer, x) -> x: for example drop rows that were only meant for one block.
    """

    def before(self, layer: int, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        return x, None

    def after(self, layer: int, x: Tensor) -> Tensor:
        return x


NO_HOOKS = BlockHooks()


def _check_block(block: nn.Module, where: str) -> None:
    from open_clip.transformer import ResidualAttentionBlock

    if not isinstance(block, ResidualAttentionBlock):
        raise UnsupportedModelError(f"fastprompt.clip: the {where} blocks are {type(block).__name__}; only open_clip's "
                                    "ResidualAttentionBlock (plain multi-head attention) is supported")
    if not isinstance(block.attn, nn.MultiheadAttention) or not block.attn.batch_first or hasattr(block, "ln_1_kv"):
        raise UnsupportedModelError(f"fastprompt.clip: the {where} attention is not batch-first self-attention")


def block_forward(block: nn.Module, x: Tensor, *, causal: bool = False, x_ln: Optional[Tensor] = None) -> Tensor:
    """open_clip's ResidualAttentionBlock on a batch-first stream (N, L, D), over the block's parameters.

    x_ln: ln_1(x) when the caller already has it (the fused prompt insertion); else ln_1 is applied here.
    """
    attn = block.attn
    h = block.ln_1(x) if x_ln is None else x_ln
    n, length, d = h.shape
    heads = attn.num_heads
    q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).view(n, length, 3, heads, d // heads).unbind(2)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
    o = F.linear(o.transpose(1, 2).reshape(n, length, d), attn.out_proj.weight, attn.out_proj.bias)
    x = x + block.ls_1(o)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def apply_block(block: nn.Module, x: Tensor, *, causal: bool = False, x_ln: Optional[Tensor] = None,
                checkpoint: bool = False) -> Tensor:
    """block_forward, recomputed in the backward instead of keeping its activations when `checkpoint`
    (activation checkpointing bounds the memory of methods that run many sequences)."""
    if checkpoint and torch.is_grad_enabled():
        return activation_checkpoint(_block_call, block, x, causal, x_ln, use_reentrant=False)
    return block_forward(block, x, causal=causal, x_ln=x_ln)


def _block_call(block, x, causal, x_ln):
    return block_forward(block, x, causal=causal, x_ln=x_ln)


TEXT_SCOPE, IMAGE_SCOPE = "fastprompt.text_tower", "fastprompt.image_tower"


def run_blocks(blocks, x: Tensor, hooks: BlockHooks = NO_HOOKS, *, causal: bool = False,
               checkpoint: bool = False) -> Tensor:
    """The blocks in order, with the hooks around each. The blocks run inside a profiler scope named after
    their tower (the hooks, which call the prompt ops, outside it), so a profile can split a step."""
    scope = TEXT_SCOPE if causal else IMAGE_SCOPE
    for layer, block in enumerate(blocks):
        x, x_ln = hooks.before(layer, x)
        with torch.profiler.record_function(scope):
            x = apply_block(block, x, causal=causal, x_ln=x_ln, checkpoint=checkpoint)
        x = hooks.after(layer, x)
    return x


class ClipBackbone(nn.Module):
    """The frozen CLIP of a prompt method. Holds the open_clip model (so `.to()` moves it) with every
    parameter frozen, and exposes its towers' parts."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._check()
        for p in model.parameters():
            p.requires_grad_(False)

    # ---- what the towers are made of ----------------------------------------------------------
    def _check(self) -> None:
        from open_clip.transformer import TextTransformer, VisionTransformer

        model = self.model
        visual = getattr(model, "visual", None)
        if not isinstance(visual, VisionTransformer):
            raise UnsupportedModelError(
                f"fastprompt.clip: the image tower is {type(visual).__name__}; fastprompt drives ViT image towers "
                "(open_clip VisionTransformer) only")
        if visual.attn_pool is not None or visual.pool_type != "tok":
            raise UnsupportedModelError("fastprompt.clip: the image tower must pool its class token "
                                        f"(pool_type 'tok', no attentional pooler); got pool_type {visual.pool_type!r}")
        if not isinstance(visual.patch_dropout, nn.Identity):
            raise UnsupportedModelError("fastprompt.clip: patch dropout in the image tower is not supported")
        text = model.text if hasattr(model, "text") else model
        if hasattr(model, "text") and not isinstance(model.text, TextTransformer):
            raise UnsupportedModelError(f"fastprompt.clip: the text tower is {type(model.text).__name__}; fastprompt "
                                        "drives open_clip's causal TextTransformer only")
        if getattr(text, "cls_emb", None) is not None:
            raise UnsupportedModelError("fastprompt.clip: text towers with a class embedding are not supported")
        if getattr(text, "attn_mask", None) is None:
            raise UnsupportedModelError("fastprompt.clip: the text tower is not causal (no attention mask)")
        pool = getattr(model, "text_pool_type", getattr(text, "pool_type", "argmax"))
        if pool not in ("argmax", "eos"):
            raise UnsupportedModelError(f"fastprompt.clip: the text tower pools by {pool!r}; only EOT pooling "
                                        "('argmax' or 'eos') is supported")
        for name, blocks in (("image", visual.transformer.resblocks), ("text", text.transformer.resblocks)):
            for block in blocks:
                _check_block(block, name)
        self.text_pool = pool
        self.eos_id = getattr(model, "text_eos_id", getattr(text, "eos_id", None))

    @property
    def _text(self) -> nn.Module:
        """The module holding the text tower's parts: the CLIP itself, or CustomTextCLIP's `text`."""
        return self.model.text if hasattr(self.model, "text") else self.model

    @property
    def visual(self):
        return self.model.visual

    @property
    def vision_blocks(self):
        return self.model.visual.transformer.resblocks

    @property
    def text_blocks(self):
        return self._text.transformer.resblocks

    @property
    def vision_width(self) -> int:
        return self.model.visual.transformer.width

    @property
    def text_width(self) -> int:
        return self._text.transformer.width

    @property
    def vision_layers(self) -> int:
        return len(self.vision_blocks)

    @property
    def text_layers(self) -> int:
        return len(self.text_blocks)

    @property
    def vision_heads(self) -> int:
        return self.vision_blocks[0].attn.num_heads

    @property
    def text_heads(self) -> int:
        return self.text_blocks[0].attn.num_heads

    @property
    def embed_dim(self) -> int:
        return self.model.visual.output_dim

    @property
    def context_length(self) -> int:
        return self._text.positional_embedding.shape[0]

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.exp()

    @property
    def dtype(self) -> torch.dtype:
        return self.model.visual.conv1.weight.dtype

    # ---- text tower -----------------------------------------------------------------------------
    def token_embeddings(self, tokens: Tensor) -> Tensor:
        """(N, L) token ids → (N, L, Dt) embeddings, before the positional embedding."""
        return self._text.token_embedding(tokens)

    def eot_index(self, tokens: Tensor) -> Tensor:
        """The row each sequence is pooled at (open_clip's rule for this model)."""
        if self.text_pool == "eos":
            return (tokens == self.eos_id).int().argmax(-1)
        return tokens.argmax(-1)

    def text_stream(self, embeddings: Tensor) -> Tensor:
        """Token embeddings (prompts already written) + positional embeddings: the input of block 0."""
        return embeddings + self._text.positional_embedding[: embeddings.shape[1]].to(embeddings.dtype)

    def text_features(self, x: Tensor, eot: Tensor) -> Tensor:
        """The last block's output → ln_final at the EOT rows → text projection (N, E)."""
        x = self._text.ln_final(x[torch.arange(x.shape[0], device=x.device), eot])
        proj = self._text.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def encode_text_stream(self, x: Tensor, eot: Tensor, hooks: BlockHooks = NO_HOOKS, checkpoint: bool = False
                           ) -> Tensor:
        return self.text_features(run_blocks(self.text_blocks, x, hooks, causal=True, checkpoint=checkpoint), eot)

    def encode_text(self, tokens: Tensor) -> Tensor:
        """Plain (unprompted) text features, as open_clip's encode_text."""
        return self.encode_text_stream(self.text_stream(self.token_embeddings(tokens)), self.eot_index(tokens))

    # ---- image tower ----------------------------------------------------------------------------
    def image_tokens(self, images: Tensor) -> Tensor:
        """Patch embedding, class token and positional embedding: (B, 1 + P, Dv), before ln_pre."""
        visual = self.model.visual
        x = visual.conv1(images.to(visual.conv1.weight.dtype))
        x = x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)

    @property
    def ln_pre(self) -> nn.Module:
        return self.model.visual.ln_pre

    def image_features(self, x: Tensor) -> Tensor:
        """The last block's output → ln_post of the class token → projection (B, E)."""
        visual = self.model.visual
        x = visual.ln_post(x[:, 0])
        return x @ visual.proj if visual.proj is not None else x

    def encode_image_stream(self, x: Tensor, hooks: BlockHooks = NO_HOOKS, checkpoint: bool = False) -> Tensor:
        """From the stream after ln_pre (prompts included) to the image features."""
        return self.image_features(run_blocks(self.vision_blocks, x, hooks, checkpoint=checkpoint))

    def encode_image(self, images: Tensor) -> Tensor:
        """Plain (unprompted) image features, as open_clip's encode_image."""
        return self.encode_image_stream(self.ln_pre(self.image_tokens(images)))

    def patch_features(self, x: Tensor) -> Tensor:
        """The last block's output → ln_post → projection of every patch token (B, P, E) (TMML's P_b)."""
        visual = self.model.visual
        x = visual.ln_post(x[:, 1:])
        return x @ visual.proj if visual.proj is not None else x
