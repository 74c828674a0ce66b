"""CoCoOp (Zhou et al., CVPR 2022): CoOp's context shifted per image by a meta-net of the image feature.

ctx_b = ctx + meta_net(f̂_b), meta_net = Linear(E, E/16) → ReLU → Linear(E/16, Dt), f̂_b the normalised image
feature; the text tower then runs B·C sequences (one prompt set per image): class chunking and activation
checkpointing bound that memory. Defaults follow the public code: ctx_init "a photo of a" (n = 4).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..clip import Slot, clean_classname
from .base import PromptMethod, check_tokens
from .text import TextPath, TextPrompts, after_context, context_init


class CoCoOp(PromptMethod):
    """CoCoOp. Config: n_ctx (4; taken from ctx_init when given), ctx_init ("a photo of a"), and the text
    path's class_chunk, checkpoint_text, pack_text, prefix_reuse (the prefix is shared per image)."""

    name = "cocoop"
    text_depends_on_images = True

    def __init__(self, clip_model, classnames: Iterable[str], *, n_ctx: int = 4,
                 ctx_init: Optional[str] = "a photo of a", class_chunk: Optional[int] = None,
                 checkpoint_text: bool = False, pack_text: bool = True, prefix_reuse: bool = True,
                 backend: str = "auto"):
        super().__init__(clip_model, classnames, backend)
        if not ctx_init:
            check_tokens(self.name, n_ctx=n_ctx)
        self.ctx, self.n_ctx, words = context_init(self.clip, n_ctx, ctx_init)  # one vector per word
        vis_dim = self.clip.embed_dim
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(vis_dim, vis_dim // 16)),
            ("relu", nn.ReLU(inplace=True)),
            ("linear2", nn.Linear(vis_dim // 16, self.clip.text_width)),
        ]))
        self.text_path = TextPath(class_chunk, checkpoint_text, pack_text, prefix_reuse)
        templates = [[Slot("ctx", self.n_ctx), after_context(words, clean_classname(c))]
                     for c in self.classnames]
        self.prompts = TextPrompts(self.clip, templates, backend)

    def logits_and_extras(self, images: Tensor):
        with torch.no_grad():
            image_features = F.normalize(self.clip.encode_image(images), dim=-1)
        ctx = self.ctx.unsqueeze(0) + self.meta_net(image_features).unsqueeze(1)  # (B, n_ctx, Dt)
        text = []
        for ctx_b in ctx:  # one prompt set per image: all its classes share SOS and the shifted context
            text.append(self.prompts.encode(
                self.clip, lambda sl: self.prompts.write(self.prompts.embeddings[sl], "ctx", ctx_b, sl),
                self.text_path))
        return self.clip_logits(image_features, torch.stack(text)), {}
