"""MAP-DAFE, modal-aware prompt tuning with deep adaptive feature enhancement (Comput. Electr. Eng. 2024).
There is no public code: this is our reading of the abstract (DESIGN.md, Methods).

Modality-specific prompts; neither modality's prompts are projected into the other.
  text:   [SOS] a photo of a {class} . [P1..PM] [EOT] (the dataset's hand-written template in place of "a photo of
          a {class}." when the trainer knows the dataset). The prompts follow the class template, so under the causal
          mask they read the template and the template never reads them; EOT, which is pooled, reads both.
          P (M, Dt) is written into the token embeddings before the positional embedding (block 0); the
          prompt rows start at a per-class row, since class names differ in length.
  vision: [CLS] patches [V1..VM] under full attention: the prompts and the patches read each other.
          V (M, Dv) is appended after the patch tokens before ln_pre.
Before every block l = 1..depth−1 of both towers, DAFE_l gates the prompt rows that block l−1 wrote (instance
level) with a fresh learnable prompt of block l (task level), and its output replaces those rows:
    rows ← g·prev + (1 − g)·task,  g = σ(LN(prev) W_gᵀ + b_g + task U_gᵀ)    (DESIGN.md, op 2)
the replacement fused with block l's ln_1 (op 3). One DAFE per block and tower; the modules start with every
gate at 0.5. Defaults: M = 4 text and 4 visual prompts, depth 9, channel gates, prompts from N(0, 0.02²).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from ..ops import insert_prompts
from ..clip import BlockHooks, Slot, clean_classname
from ..modules import DeepAdaptiveFeatureEnhancement
from .base import PromptMethod, append_with_ln, check_depth, normal_init
from .templates import DEFAULT_TEMPLATE, check_template
from .text import TextPath, TextPrompts


def prompt_rows(x: Tensor, start, m: int) -> Tensor:
    """Rows [start, start + M) of each sequence of x (N, L, D) → (N, M, D): start an int, None (the last M
    rows) or per-sequence offsets (N,) (a differentiable gather: the gradient goes back to those rows)."""
    if start is None:
        return x[:, x.shape[1] - m:]
    if isinstance(start, int):
        return x[:, start:start + m]
    index = start[:, None] + torch.arange(m, device=x.device)  # (N, M)
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


class DAFERows(BlockHooks):
    """Before blocks 1..len(dafe) the prompt rows [start, start + M) (start None: the last M rows) are replaced
    by dafe[l−1](prev = those rows, task = tasks[l−1]), fused with block l's ln_1."""

    def __init__(self, blocks, dafe: nn.ModuleList, tasks: nn.ParameterList, start, backend: str):
        self.blocks, self.dafe, self.tasks, self.start, self.backend = blocks, dafe, tasks, start, backend

    def before(self, layer: int, x: Tensor):
        if not 1 <= layer <= len(self.dafe):
            return x, None
        task = self.tasks[layer - 1]
        fused = self.dafe[layer - 1](prompt_rows(x, self.start, task.shape[0]), task)
        start = x.shape[1] - task.shape[0] if self.start is None else self.start
        ln = self.blocks[layer].ln_1
        # the per-class offsets are valid by construction (tokenize_templates refuses a prompt that does not
        # fit the context): no range check, which would be a host sync per block on CUDA
        return insert_prompts(x, fused, start, ln.weight, ln.bias, ln.eps, "replace", backend=self.backend,
                              check_start=False)

    def before_packed(self, layer: int, x: Tensor, cu_seqlens: Tensor):
        """The same on packed suffix tokens x (T, D) with cumulative lengths cu_seqlens (N + 1,): the prompt
        rows are gathered from, and written back into, the packed tokens (no padded copy)."""
        if not 1 <= layer <= len(self.dafe):
            return x, None
        task = self.tasks[layer - 1]
        m = task.shape[0]
        if self.start is None:
            raise ValueError("map_dafe: packed rows need explicit offsets (start=None means the last rows)")
        start = self.start[:, None] if isinstance(self.start, Tensor) else self.start
        index = cu_seqlens[:-1, None] + start + torch.arange(m, device=x.device)  # (N, M) packed rows
        fused = self.dafe[layer - 1](x[index], task)
        ln = self.blocks[layer].ln_1
        # valid by construction, as in before(): no range check (a host sync on CUDA)
        return insert_prompts(x, fused, self.start, ln.weight, ln.bias, ln.eps, "replace", cu_seqlens=cu_seqlens,
                              backend=self.backend, check_start=False)


class MAPDAFE(PromptMethod):
    """MAP-DAFE. Config: n_ctx_text (4), n_ctx_vision (4), depth (9: prompts enter at block 0, DAFE before
    blocks 1..depth−1 of both towers), gate ("channel", "token" or "scalar"), template ("a photo of a {}.": the
    text the prompts follow; the trainer gives the dataset's, methods/templates.py), and the text path's class_chunk,
    checkpoint_text, pack_text, prefix_reuse (methods/text.py)."""

    name = "map_dafe"
    template_from_dataset = True  # the text before the prompts is the dataset's template unless one is given

    def __init__(self, clip_model, classnames: Iterable[str], *, n_ctx_text: int = 4, n_ctx_vision: int = 4,
                 depth: int = 9, gate: str = "channel", template: str = DEFAULT_TEMPLATE,
                 class_chunk: Optional[int] = None,
                 checkpoint_text: bool = False, pack_text: bool = True, prefix_reuse: bool = True,
                 backend: str = "auto"):
        super().__init__(clip_model, classnames, backend)
        clip = self.clip
        check_depth(self.name, depth, clip.text_layers, "text")
        check_depth(self.name, depth, clip.vision_layers, "vision")
        if depth < 1:
            raise ValueError("map_dafe: depth must be at least 1 (block 0 receives the first prompts)")
        if min(n_ctx_text, n_ctx_vision) < 1:
            raise ValueError(f"map_dafe: n_ctx_text and n_ctx_vision must be at least 1, got {n_ctx_text} "
                             f"and {n_ctx_vision}")
        self.depth, self.n_ctx_text, self.n_ctx_vision = depth, n_ctx_text, n_ctx_vision
        self.text_path = TextPath(class_chunk, checkpoint_text, pack_text, prefix_reuse)
        dt, dv = clip.text_width, clip.vision_width
        # block 0's prompts, then the fresh (task-level) prompt of each block 1..depth−1 (one parameter per
        # block: depth 1 has none, rather than an empty tensor that DDP would report as unused)
        self.prompts_text = normal_init((n_ctx_text, dt))
        self.prompts_vision = normal_init((n_ctx_vision, dv))
        self.task_text = nn.ParameterList([normal_init((n_ctx_text, dt)) for _ in range(depth - 1)])
        self.task_vision = nn.ParameterList([normal_init((n_ctx_vision, dv)) for _ in range(depth - 1)])
        self.dafe_text = nn.ModuleList([DeepAdaptiveFeatureEnhancement(dt, gate, backend=backend)
                                        for _ in range(depth - 1)])
        self.dafe_vision = nn.ModuleList([DeepAdaptiveFeatureEnhancement(dv, gate, backend=backend)
                                          for _ in range(depth - 1)])
        (template,) = check_template(self.name, template)
        templates = [[template.format(clean_classname(c)), Slot("ctx", n_ctx_text)] for c in self.classnames]
        self.prompts = TextPrompts(clip, templates, backend)

    def text_features(self) -> Tensor:
        """(C, E), class chunk by class chunk. The prompt rows start where each class's template ends: after the
        shared prefix ([SOS] a photo of a), so the DAFE rows are rewritten in the suffixes."""
        start = self.prompts.starts("ctx")

        def dafe_rows(sl: slice, offset: int):  # rows counted from `offset`, the first row after the prefix
            rows = start[sl] if isinstance(start, Tensor) else start
            return DAFERows(self.clip.text_blocks, self.dafe_text, self.task_text, rows - offset, self.backend)

        return self.prompts.encode(self.clip, lambda sl: self.prompts.write(
            self.prompts.embeddings[sl], "ctx", self.prompts_text, sl), self.text_path, suffix_hooks=dafe_rows)

    def image_features(self, images: Tensor) -> Tensor:
        clip = self.clip
        x = append_with_ln(clip.image_tokens(images), self.prompts_vision, clip.ln_pre, self.backend)
        return clip.encode_image_stream(x, DAFERows(clip.vision_blocks, self.dafe_vision, self.task_vision, None,
                                                    self.backend))

    def logits_and_extras(self, images: Tensor):
        # the text side never sees the images: evaluation computes its features once
        return self.clip_logits(self.image_features(images), self.cached_text_features(self.text_features)), {}
