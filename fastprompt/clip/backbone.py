"""A frozen open_clip CLIP driven block by block, so that prompt methods can rewrite prompt rows between
blocks and the fused insertion + LayerNorm can stand in for a block's ln_1.

The block forward is re-implemented over each block's own parameters (no weight copies): with no hooks the
towers reproduce open_clip's `encode_image` / `encode_text` to float rounding. Supported: CLIP models whose
image tower is a ViT (`VisionTransformer` with class-token pooling, no attentional pooler, no patch dropout)
and whose text tower is a causal transformer pooled at EOT: OpenAI and LAION ViT-B/32, ViT-B/16, ViT-L/14
and their like, in `CLIP` or `CustomTextCLIP`, of open_clip 2.x, 3.x and 4.x (the blocks are read through the
adapter of blocks.py). Anything else gets an error naming what is unsupported. This file and blocks.py are the
only ones that read how open_clip lays out a model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .blocks import ClipBlock, UnsupportedModelError
from .text import clean_classname
from .streams import IMAGE_SCOPE, NO_HOOKS, TEXT_SCOPE, BlockHooks, run_blocks  # noqa: F401  (the scopes: also
# importable from here, where they were first defined)


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
        # plain tuples, not submodules: the adapters hold the model's own blocks, which the model registers
        self._vision_blocks = tuple(ClipBlock(b, "image") for b in visual.transformer.resblocks)
        self._text_blocks = tuple(ClipBlock(b, "text") for b in text.transformer.resblocks)
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
    def vision_blocks(self) -> tuple[ClipBlock, ...]:
        """The image tower's blocks, read through the block adapter (blocks.py)."""
        return self._vision_blocks

    @property
    def text_blocks(self) -> tuple[ClipBlock, ...]:
        """The text tower's blocks, read through the block adapter (blocks.py)."""
        return self._text_blocks

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
        return self.vision_blocks[0].heads

    @property
    def text_heads(self) -> int:
        return self.text_blocks[0].heads

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

    @property
    def text_positional_embedding(self) -> Tensor:
        """(context_length, Dt), added to the token embeddings before block 0."""
        return self._text.positional_embedding

    def text_stream(self, embeddings: Tensor) -> Tensor:
        """Token embeddings (prompts already written) + positional embeddings: the input of block 0."""
        return embeddings + self.text_positional_embedding[: embeddings.shape[1]].to(embeddings.dtype)

    def text_features(self, x: Tensor, eot: Tensor) -> Tensor:
        """The last block's output → ln_final at the EOT rows → text projection (N, E)."""
        return self.pooled_text_features(x[torch.arange(x.shape[0], device=x.device), eot])

    def pooled_text_features(self, x: Tensor) -> Tensor:
        """The last block's output at the EOT rows (N, Dt) → ln_final → text projection (N, E)."""
        x = self._text.ln_final(x)
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

    def encode_class_names(self, template: str, classnames) -> Tensor:
        """Frozen, unprompted text features (C, E) of `template` filled with each class name (underscores read
        as spaces), computed without autograd on the backbone's device: zero-shot CLIP's class features."""
        import open_clip

        tokens = open_clip.tokenize([template.format(clean_classname(c)) for c in classnames],
                                    context_length=self.context_length)
        with torch.no_grad():
            return self.encode_text(tokens.to(self.model.logit_scale.device))

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
