"""Zero-shot CLIP (Radford et al., ICML 2021), the first row of every prompt-learning table: nothing is trained.

logits = s · cos(f(image), g(template(class))), the text features of the hand-written template computed once
(the dataset's, methods/templates.py, as CoOp's zero-shot trainer; the trainer picks it from the dataset
unless `template` is given). Several templates are an ensemble (CLIP's prompt ensembling): the normalised
features of each are averaged and normalised again.
"""

from __future__ import annotations

from typing import Iterable, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import PromptMethod
from .templates import DEFAULT_TEMPLATE, check_template


class ZeroShotCLIP(PromptMethod):
    """Zero-shot CLIP. Config: template ("a photo of a {}.", or a list of templates to ensemble)."""

    name = "zeroshot"
    template_from_dataset = True  # the trainer gives it the dataset's template unless one is set

    def __init__(self, clip_model, classnames: Iterable[str], *,
                 template: Union[str, Sequence[str]] = DEFAULT_TEMPLATE, backend: str = "auto"):
        super().__init__(clip_model, classnames, backend)
        self.templates = check_template(self.name, template, ensemble=True)
        features = [F.normalize(self.clip.encode_class_names(t, self.classnames), dim=-1) for t in self.templates]
        # (C, E), normalised; recomputed from the class names, so not in checkpoints
        self.register_buffer("text_features", F.normalize(torch.stack(features).mean(0), dim=-1), persistent=False)

    def trainable_parameters(self) -> list:
        return []

    def logits_and_extras(self, images: Tensor):
        with torch.no_grad():
            image_features = self.clip.encode_image(images)
        return self.clip_logits(image_features, self.text_features), {}
