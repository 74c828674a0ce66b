"""VPT-deep (Jia et al., ECCV 2022), as in the multimodal-prompt-learning code: learnable visual prompts
appended after the patch tokens before ln_pre, replaced by fresh ones before blocks 1..depth−1; the text side is
the frozen hand-written prompt "a photo of a {class}.". Defaults: 8 tokens, depth 12, N(0, 0.02²) init."""

from __future__ import annotations

from typing import Iterable

from torch import Tensor

from .base import PromptMethod, check_depth, check_tokens, encode_prompted_image, normal_init


class VPTDeep(PromptMethod):
    """VPT-deep. Config: n_ctx (8), depth (12: blocks 0..depth−1 receive prompts), template."""

    name = "vpt_deep"

    def __init__(self, clip_model, classnames: Iterable[str], *, n_ctx: int = 8, depth: int = 12,
                 template: str = "a photo of a {}.", checkpoint_image: bool = False, backend: str = "auto"):
        super().__init__(clip_model, classnames, backend)
        check_depth(self.name, depth, self.clip.vision_layers, "vision")
        if depth < 1:
            raise ValueError("vpt_deep: depth must be at least 1 (block 0 receives the first prompts)")
        check_tokens(self.name, n_ctx=n_ctx)
        self.depth, self.checkpoint_image = depth, checkpoint_image
        self.visual_prompts = normal_init((depth, n_ctx, self.clip.vision_width))
        self.register_buffer("fixed_text_features", self.clip.encode_class_names(template, self.classnames),
                             persistent=False)

    def image_features(self, images: Tensor) -> Tensor:
        deep = {layer: self.visual_prompts[layer] for layer in range(1, self.depth)}
        return encode_prompted_image(self.clip, images, self.visual_prompts[0], deep, self.backend,
                                     self.checkpoint_image)

    def logits_and_extras(self, images: Tensor):
        return self.clip_logits(self.image_features(images), self.fixed_text_features), {}
