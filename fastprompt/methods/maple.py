"""MaPLe (Khattak et al., CVPR 2023), as in the public code: text context at layer 0 and fresh text prompts
before text blocks 1..depth−1; the visual prompts are projections of the text prompts (a Linear(Dt → Dv)
per layer), appended after the patch tokens before ln_pre at block 0 and replacing the last rows before
vision blocks 1..depth−1. Defaults: 2 tokens, depth 9, context initialised from "a photo of a" (its first
2 tokens, the text continuing with "of a {class}.")."""

from __future__ import annotations

import copy
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from ..clip import Slot, clean_classname, decode_words, tokenize_words
from .base import PromptMethod, ReplaceRows, check_depth, check_tokens, encode_prompted_image, normal_init
from .text import TextPath, TextPrompts


def first_words_context(clip, n_ctx: int, ctx_init: Optional[str]) -> tuple[nn.Parameter, str]:
    """The public codes' rule: with ctx_init and n_ctx <= 4 the context starts as the embeddings of ctx_init's
    first n_ctx tokens and the template keeps the rest of ctx_init's words; otherwise N(0, 0.02²) and no words.
    Returns (ctx (n_ctx, Dt), the words that follow the context in the template)."""
    if ctx_init and n_ctx <= 4:
        words = clean_classname(ctx_init)
        ids = tokenize_words(words)
        if len(ids) < n_ctx:
            raise ValueError(f"ctx_init {ctx_init!r} has {len(ids)} tokens, fewer than n_ctx={n_ctx}")
        with torch.no_grad():
            vectors = clip.token_embeddings(torch.tensor(ids[:n_ctx], device=clip.model.logit_scale.device))
        if len(ids) == len(words.split(" ")):
            rest = " ".join(words.split(" ")[n_ctx:])
        else:
            rest = decode_words(ids[n_ctx:]).strip()
        return nn.Parameter(vectors.detach().clone().cpu()), (" " + rest if rest else "")
    return normal_init((n_ctx, clip.text_width)), ""


class MaPLe(PromptMethod):
    """MaPLe. Config: n_ctx (2), depth (9: blocks 0..depth−1 of both towers receive prompts), ctx_init, and
    the text path's class_chunk, checkpoint_text, pack_text, prefix_reuse (methods/text.py)."""

    name = "maple"

    def __init__(self, clip_model, classnames: Iterable[str], *, n_ctx: int = 2, depth: int = 9,
                 ctx_init: Optional[str] = "a photo of a", class_chunk: Optional[int] = None,
                 checkpoint_text: bool = False, pack_text: bool = True, prefix_reuse: bool = True,
                 backend: str = "auto"):
        super().__init__(clip_model, classnames, backend)
        for layers, what in ((self.clip.text_layers, "text"), (self.clip.vision_layers, "vision")):
            check_depth(self.name, depth, layers, what)
        if depth < 1:
            raise ValueError("maple: depth must be at least 1")
        check_tokens(self.name, n_ctx=n_ctx)
        self.depth, self.n_ctx = depth, n_ctx
        dt, dv = self.clip.text_width, self.clip.vision_width
        self.ctx, words = first_words_context(self.clip, n_ctx, ctx_init)
        self.proj = nn.Linear(dt, dv)
        self.compound_prompts_text = nn.ParameterList([normal_init((n_ctx, dt)) for _ in range(depth - 1)])
        layer = nn.Linear(dt, dv)  # the public code clones one initialised layer: all start equal
        self.compound_prompt_projections = nn.ModuleList([copy.deepcopy(layer) for _ in range(depth - 1)])
        self.text_path = TextPath(class_chunk, checkpoint_text, pack_text, prefix_reuse)
        self.prompts = TextPrompts(self.clip, [[Slot("ctx", n_ctx), words + " " + clean_classname(c) + "."]
                                               for c in self.classnames], backend)

    def text_features(self) -> Tensor:
        deep = {layer: self.compound_prompts_text[layer - 1] for layer in range(1, self.depth)}
        hooks = ReplaceRows(self.clip.text_blocks, deep, 1, self.backend)
        return self.prompts.encode(self.clip, lambda sl: self.prompts.write(
            self.prompts.embeddings[sl], "ctx", self.ctx, sl), self.text_path, hooks)

    def image_features(self, images: Tensor) -> Tensor:
        deep = {layer: proj(self.compound_prompts_text[layer - 1])
                for layer, proj in enumerate(self.compound_prompt_projections, start=1)}
        return encode_prompted_image(self.clip, images, self.proj(self.ctx), deep, self.backend)

    def logits_and_extras(self, images: Tensor):
        # the image side depends on the text prompts: in evaluation the text features are still computed once
        return self.clip_logits(self.image_features(images), self.cached_text_features(self.text_features)), {}
