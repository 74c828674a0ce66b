"""CoOp (Zhou et al., IJCV 2022): learnable context vectors in the text prompt, frozen image tower.

Text of class c: [SOS] ctx_1..ctx_n {class}. [EOT] (class token at the end; "middle" and "front" are the
paper's other positions). The context is shared by all classes, or class-specific (CSC). It is written into
the token embeddings before the positional embedding (DESIGN.md: text layer 0, replace, no LayerNorm).
Defaults follow the public code: 16 context tokens drawn from N(0, 0.02²), or, with `ctx_init`, one vector per
word taken from the phrase's token embeddings ("a photo of a": n = 4; methods/text.py context_init).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor

from ..clip import Slot, clean_classname
from .base import PromptMethod, check_tokens
from .text import TextPath, TextPrompts, after_context, context_init

POSITIONS = ("end", "middle", "front")


class CoOp(PromptMethod):
    """CoOp. Config: n_ctx (16), ctx_init (None: random), class_specific (False), class_token_position
    ("end"), and the text path's class_chunk, checkpoint_text, pack_text, prefix_reuse (methods/text.py)."""

    name = "coop"

    def __init__(self, clip_model, classnames: Iterable[str], *, n_ctx: int = 16, ctx_init: Optional[str] = None,
                 class_specific: bool = False, class_token_position: str = "end", class_chunk: Optional[int] = None,
                 checkpoint_text: bool = False, pack_text: bool = True, prefix_reuse: bool = True,
                 backend: str = "auto"):
        super().__init__(clip_model, classnames, backend)
        if class_token_position not in POSITIONS:
            raise ValueError(f"coop: class_token_position must be one of {POSITIONS}, got {class_token_position!r}")
        if not ctx_init:
            check_tokens(self.name, n_ctx=n_ctx)
        n_cls = len(self.classnames)
        self.ctx, self.n_ctx, words = context_init(self.clip, n_ctx, ctx_init, (n_cls,) if class_specific else ())
        if words and class_token_position != "end":  # the public code would cut the class name there
            raise ValueError(f"coop: ctx_init {ctx_init!r} leaves the fixed word(s) {words!r} after the context (a "
                             "word of several tokens, methods/text.py context_init); the public code only places "
                             "them right with class_token_position='end'")
        self.position = class_token_position
        self.text_path = TextPath(class_chunk, checkpoint_text, pack_text, prefix_reuse)
        names = [clean_classname(c) for c in self.classnames]
        half = self.n_ctx // 2
        if class_token_position == "end":
            templates = [[Slot("ctx", self.n_ctx), after_context(words, name)] for name in names]
        elif class_token_position == "front":
            templates = [[name, Slot("ctx", self.n_ctx), "."] for name in names]
        else:
            templates = [[Slot("ctx_a", half), " " + name, Slot("ctx_b", self.n_ctx - half), "."] for name in names]
        # the SOS row is shared by all classes; the context too unless it is class-specific (CSC)
        self.prompts = TextPrompts(self.clip, templates, backend, shared_rows=1 if class_specific else None)

    def build_text(self, classes: slice) -> Tensor:
        x = self.prompts.embeddings[classes]
        ctx = self.ctx[classes] if self.ctx.dim() == 3 else self.ctx
        if self.position == "middle":
            half = self.n_ctx // 2
            x = self.prompts.write(x, "ctx_a", ctx[..., :half, :], classes)
            return self.prompts.write(x, "ctx_b", ctx[..., half:, :], classes)
        return self.prompts.write(x, "ctx", ctx, classes)

    def text_features(self) -> Tensor:
        return self.prompts.encode(self.clip, self.build_text, self.text_path)

    def logits_and_extras(self, images: Tensor):
        with torch.no_grad():  # the image tower is not prompted: no autograd through it
            image_features = self.clip.encode_image(images)
        return self.clip_logits(image_features, self.cached_text_features(self.text_features)), {}
