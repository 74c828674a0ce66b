"""IVLP, independent vision-language prompting (Khattak et al., CVPR 2023 baseline), as in the public code:
CoOp-style text context written at layer 0 and fresh text prompts replacing rows 1..n before text blocks
1..depth_text−1; VPT-deep visual prompts. The two sides never exchange information. Defaults: 2 + 2 tokens,
depth 12 on both sides, text context initialised from "a photo of a" (its first n tokens), N(0, 0.02²) else.

depth_vision=0 or n_ctx_vision=0 switches the vision side off (the public language-only config): the image
tower then runs without autograd and the method holds no visual prompt, since a parameter that never gets a
gradient is one DDP without find_unused_parameters rejects. For the same reason depth_text=1 holds no deep
text prompts. The text side is always on (depth_text >= 1, as the public code asserts; VPT-deep prompts the
vision alone)."""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor

from ..clip import Slot, clean_classname
from .base import PromptMethod, ReplaceRows, check_depth, encode_prompted_image, normal_init
from .text import TextPath, TextPrompts
from .maple import first_words_context


class IVLP(PromptMethod):
    """IVLP. Config: n_ctx_text (2), n_ctx_vision (2), depth_text (12), depth_vision (12), ctx_init, and the
    text path's class_chunk, checkpoint_text, pack_text, prefix_reuse (methods/text.py)."""

    name = "ivlp"

    def __init__(self, clip_model, classnames: Iterable[str], *, n_ctx_text: int = 2, n_ctx_vision: int = 2,
                 depth_text: int = 12, depth_vision: int = 12, ctx_init: Optional[str] = "a photo of a",
                 class_chunk: Optional[int] = None, checkpoint_text: bool = False, pack_text: bool = True,
                 prefix_reuse: bool = True, backend: str = "auto"):
        super().__init__(clip_model, classnames, backend)
        check_depth(self.name, depth_text, self.clip.text_layers, "text")
        check_depth(self.name, depth_vision, self.clip.vision_layers, "vision")
        if depth_text < 1 or n_ctx_text < 1:
            raise ValueError(f"ivlp: the text side needs depth_text >= 1 and n_ctx_text >= 1, got {depth_text} and "
                             f"{n_ctx_text} (use vpt_deep to prompt the vision alone)")
        if n_ctx_vision < 0:
            raise ValueError(f"ivlp: n_ctx_vision must be at least 0, got {n_ctx_vision}")
        if n_ctx_vision == 0:
            depth_vision = 0
        self.depth_text, self.depth_vision = depth_text, depth_vision
        self.ctx, prefix = first_words_context(self.clip, n_ctx_text, ctx_init)
        # None rather than an empty tensor where a side has no prompts: it would never get a gradient
        self.text_prompts = (normal_init((depth_text - 1, n_ctx_text, self.clip.text_width))
                             if depth_text > 1 else None)
        self.visual_prompts = (normal_init((depth_vision, n_ctx_vision, self.clip.vision_width))
                               if depth_vision else None)
        self.text_path = TextPath(class_chunk, checkpoint_text, pack_text, prefix_reuse)
        self.prompts = TextPrompts(self.clip, [[Slot("ctx", n_ctx_text), prefix + " " + clean_classname(c) + "."]
                                               for c in self.classnames], backend)

    def text_features(self) -> Tensor:
        deep = {layer: self.text_prompts[layer - 1] for layer in range(1, self.depth_text)}
        hooks = ReplaceRows(self.clip.text_blocks, deep, 1, self.backend)
        return self.prompts.encode(self.clip, lambda sl: self.prompts.write(
            self.prompts.embeddings[sl], "ctx", self.ctx, sl), self.text_path, hooks)

    def logits_and_extras(self, images: Tensor):
        if self.visual_prompts is not None:
            deep = {layer: self.visual_prompts[layer] for layer in range(1, self.depth_vision)}
            image_features = encode_prompted_image(self.clip, images, self.visual_prompts[0], deep, self.backend)
        else:
            with torch.no_grad():  # the image tower is not prompted: no autograd through it
                image_features = self.clip.encode_image(images)
        return self.clip_logits(image_features, self.cached_text_features(self.text_features)), {}
