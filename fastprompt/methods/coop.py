"""CoOp (Zhou et al., IJCV 2022): learnable context vectors in the text prompt, frozen image tower.

Text of class c: [SOS] ctx_1..ctx_n {class}. [EOT] (class token at the end; "middle" and "front" are the
paper's other positions). The context is shared by all classes, or class-specific (CSC). It is written into
the token embeddings before the positional embedding (DESIGN.md: text layer 0, replace, no LayerNorm).
Defaults follow the public code: 16 context tokens drawn from N(0, 0.02²), or the embeddings of `ctx_init`'s
words ("a photo of a": n = 4).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from .. import insert_prompts
from ..clip import Slot, clean_classname, tokenize_templates, tokenize_words
from .base import PromptMethod, normal_init

POSITIONS = ("end", "middle", "front")


class TextPrompts(nn.Module):
    """Per-class token embeddings of a template with slots, and the writing of learnable rows into them.

    Holds non-persistent buffers (recomputed from the class names, so not in checkpoints): the token ids,
    the frozen token embeddings, the EOT rows and each slot's per-class first row.
    """

    def __init__(self, clip, templates, backend: str = "auto"):
        super().__init__()
        tok = tokenize_templates(templates, clip.context_length)
        self.register_buffer("ids", tok.ids, persistent=False)
        with torch.no_grad():
            self.register_buffer("embeddings", clip.token_embeddings(tok.ids).detach().clone(), persistent=False)
        self.register_buffer("eot", clip.eot_index(tok.ids), persistent=False)
        self.slot_names = list(tok.slot_starts)
        self._same_row = {}  # slot -> the row when every class has the slot there (an int: no per-call offsets)
        for name, starts in tok.slot_starts.items():
            self.register_buffer(f"start_{name}", starts, persistent=False)
            self._same_row[name] = int(starts[0]) if bool((starts == starts[0]).all()) else None
        self.backend = backend

    def starts(self, slot: str):
        """A slot's first row: an int when every class has it at the same row, else the (C,) offsets."""
        row = self._same_row[slot]
        return row if row is not None else getattr(self, f"start_{slot}")

    def write(self, embeddings: Tensor, slot: str, rows: Tensor, classes: Optional[slice] = None) -> Tensor:
        """Overwrite a slot with `rows` ((n, D) shared, or (C, n, D) per class) in `embeddings` (C, L, D)."""
        start = self.starts(slot)
        if isinstance(start, Tensor) and classes is not None:
            start = start[classes]
        return insert_prompts(embeddings, rows, start, mode="replace", backend=self.backend, check_start=False)[0]


def context_init(clip, n_ctx: int, ctx_init: Optional[str], shape_prefix=()) -> tuple[nn.Parameter, int]:
    """Context vectors from N(0, 0.02²), or the token embeddings of `ctx_init`'s words (as the public codes)."""
    if ctx_init:
        ids = torch.tensor(tokenize_words(clean_classname(ctx_init)))
        with torch.no_grad():
            vectors = clip.token_embeddings(ids.to(clip.model.logit_scale.device)).detach().clone().cpu()
        vectors = vectors.expand(*shape_prefix, *vectors.shape).clone()
        return nn.Parameter(vectors), len(ids)
    return normal_init((*shape_prefix, n_ctx, clip.text_width)), n_ctx


def encode_classes(clip, prompts: TextPrompts, build, n_classes: int, chunk: Optional[int], checkpoint: bool,
                   hooks=None) -> Tensor:
    """Text features of every class, `chunk` classes at a time: build(slice) -> token embeddings of those
    classes with the prompts written; the rest is the frozen text tower."""
    from ..clip import NO_HOOKS

    chunk = chunk or n_classes
    feats = []
    for lo in range(0, n_classes, chunk):
        sl = slice(lo, min(lo + chunk, n_classes))
        x = clip.text_stream(build(sl))
        feats.append(clip.encode_text_stream(x, prompts.eot[sl], hooks or NO_HOOKS, checkpoint=checkpoint))
    return torch.cat(feats) if len(feats) > 1 else feats[0]


class CoOp(PromptMethod):
    """CoOp. Config: n_ctx (16), ctx_init (None: random), class_specific (False), class_token_position
    ("end"), class_chunk (None: all classes at once), checkpoint_text (False)."""

    name = "coop"

    def __init__(self, clip_model, classnames: Iterable[str], *, n_ctx: int = 16, ctx_init: Optional[str] = None,
                 class_specific: bool = False, class_token_position: str = "end", class_chunk: Optional[int] = None,
                 checkpoint_text: bool = False, backend: str = "auto"):
        super().__init__(clip_model, classnames, backend)
        if class_token_position not in POSITIONS:
            raise ValueError(f"coop: class_token_position must be one of {POSITIONS}, got {class_token_position!r}")
        n_cls = len(self.classnames)
        self.ctx, self.n_ctx = context_init(self.clip, n_ctx, ctx_init, (n_cls,) if class_specific else ())
        self.position = class_token_position
        self.class_chunk, self.checkpoint_text = class_chunk, checkpoint_text
        names = [clean_classname(c) for c in self.classnames]
        half = self.n_ctx // 2
        if class_token_position == "end":
            templates = [[Slot("ctx", self.n_ctx), " " + name + "."] for name in names]
        elif class_token_position == "front":
            templates = [[name, Slot("ctx", self.n_ctx), "."] for name in names]
        else:
            templates = [[Slot("ctx_a", half), " " + name, Slot("ctx_b", self.n_ctx - half), "."] for name in names]
        self.prompts = TextPrompts(self.clip, templates, backend)

    def build_text(self, classes: slice) -> Tensor:
        x = self.prompts.embeddings[classes]
        ctx = self.ctx[classes] if self.ctx.dim() == 3 else self.ctx
        if self.position == "middle":
            half = self.n_ctx // 2
            x = self.prompts.write(x, "ctx_a", ctx[..., :half, :], classes)
            return self.prompts.write(x, "ctx_b", ctx[..., half:, :], classes)
        return self.prompts.write(x, "ctx", ctx, classes)

    def text_features(self) -> Tensor:
        return encode_classes(self.clip, self.prompts, self.build_text, len(self.classnames), self.class_chunk,
                              self.checkpoint_text)

    def logits_and_extras(self, images: Tensor):
        with torch.no_grad():  # the image tower is not prompted: no autograd through it
            image_features = self.clip.encode_image(images)
        return self.clip_logits(image_features, self.cached_text_features(self.text_features)), {}
