"""DCP, Deeply Coupled Cross-modal Prompt learning (Liu et al., ACL Findings 2023; public code GingL/CMPA).

M learnable text prompts (rows 1..M of every class's sequence) and M visual prompts (appended after the patch
tokens before ln_pre). Before each block 1..depth, cross-modal prompt attention (CMPA) takes the prompt rows
the previous block wrote (x_v[:, -M:], x_t[:, 1:1+M]) and its outputs replace them; the two towers are
stepped layer by layer together. One CMPA is shared by all layers by default.

couple_text=True (default, the paper) writes CMPA's text output back into the text stream; couple_text=False
reproduces the public code, which never does, and then the text half of CMPA is neither computed nor trained.
Uncoupled, the text tower never reads the images: its features and the prompt rows CMPA reads from it at each
block are computed apart from the image tower, once per evaluation like the other methods' static text.
The visual pooling of CMPA mixes the images of a batch: under torch.distributed the visual prompt rows of all
ranks are gathered before CMPA, so a DDP run equals a single-process run over the same global batch, and the
logits depend on the evaluation batch (the harness logs its size).

What couple_text=True costs (issue 14: "the coupled step takes twice as long"). Both settings run the towers
alike: the same operators and shapes, 361.1 GFLOP per training step at ViT-B/16, C = 100, batch 4, M = 16
(torch's FlopCounterMode). Coupling adds CMPA's text half, 28 GEMMs of 16 rows per call (forward, the
backward's recomputation and the backward), about 50 ms of a 125 ms CMPA call on one CPU thread, so ~0.45 s
over the 9 layers. Measured with one thread, interleaved, medians of 6 steps on the shared 2-core CPU: CPU time
per step 6.2 s coupled and 6.0 s uncoupled (5.8 and 6.0 s before the streams moved to fastprompt.clip): within
the noise, no twofold step. The twofold step appears with two threads on a busy 2-core machine: CMPA's
operators are too small to gain from a second thread, and each waits for it while the other load holds the
core (one 16×512·512×2048 GEMM: 0.56 ms on one thread, ~32 ms on two; CMPA forward + backward 0.1 s against
0.7-1 s), and the text half doubles their number (two threads here: 53 s coupled against 43 s, the prompt ops
47 % of the coupled step and 28 % of the other). Nothing in this method or the towers waits; time CPU steps with
one thread. What would shorten both settings lies in the op: the reference backward recomputes each side's
forward (a quarter of its GEMMs) and fills parameter gradients with zeros it then replaces.
"""

from __future__ import annotations

from typing import Iterable, Optional

from torch import Tensor, nn

from ..clip import ImageStream, Slot, TextStream, clean_classname, run_towers
from ..modules import CrossModalPromptAttention
from .base import PromptMethod, append_with_ln, check_depth, check_tokens, normal_init
from .text import TextPath, TextPrompts
from .distributed import gather_rows
from .maple import first_words_context


class DCP(PromptMethod):
    """DCP. Config: n_ctx (16), depth (9: CMPA before blocks 1..depth), fusing ("mean"), parameter_sharing
    (True), couple_text (True), ctx_init (used only when n_ctx <= 4, as in the public code), and the text
    path's checkpoint_text, pack_text, prefix_reuse (methods/text.py)."""

    name = "dcp"
    text_depends_on_images = True

    def __init__(self, clip_model, classnames: Iterable[str], *, n_ctx: int = 16, depth: int = 9,
                 fusing: str = "mean", parameter_sharing: bool = True, couple_text: bool = True,
                 ctx_init: Optional[str] = "a photo of a", checkpoint_text: bool = False, pack_text: bool = True,
                 prefix_reuse: bool = True, backend: str = "auto"):
        super().__init__(clip_model, classnames, backend)
        clip = self.clip
        if clip.vision_layers != clip.text_layers:
            raise ValueError(f"dcp couples the towers layer by layer, but this model's image tower has "
                             f"{clip.vision_layers} blocks and its text tower {clip.text_layers}")
        check_depth(self.name, depth, clip.vision_layers - 1, "CMPA")
        if depth < 1:  # no block would call CMPA: its parameters would never be trained
            raise ValueError("dcp: depth must be at least 1 (CMPA couples the prompts before blocks 1..depth)")
        check_tokens(self.name, n_ctx=n_ctx)
        self.n_ctx, self.depth, self.couple_text = n_ctx, depth, couple_text
        self.text_depends_on_images = couple_text  # uncoupled, evaluation computes the text side once
        self.text_path = TextPath(None, checkpoint_text, pack_text, prefix_reuse)
        self.prompts_text, words = first_words_context(clip, n_ctx, ctx_init)
        self.prompts_visual = normal_init((n_ctx, clip.vision_width))

        def make_cmpa():
            m = CrossModalPromptAttention(clip.vision_width, clip.vision_heads, clip.text_width, clip.text_heads,
                                          fusing=fusing, batch_first=True, backend=backend)
            m.compute_text = couple_text
            if not couple_text:  # the public code's text half: never computed, never trained
                for name, p in m.named_parameters():
                    if "_text." in name or name.startswith("proj_v2t"):
                        p.requires_grad_(False)
            return m

        self.parameter_sharing = parameter_sharing
        self.cmpa = make_cmpa() if parameter_sharing else nn.ModuleList([make_cmpa() for _ in range(depth)])
        self.prompts = TextPrompts(clip, [[Slot("ctx", n_ctx), words + " " + clean_classname(c) + "."]
                                          for c in self.classnames], backend)

    def cmpa_at(self, layer: int) -> CrossModalPromptAttention:
        return self.cmpa if self.parameter_sharing else self.cmpa[layer - 1]

    def text_stream(self):
        """The text tower over every class, with the text prompts written at layer 0, to step block by block."""
        return self.prompts.stream(self.clip, self.prompts.write(self.prompts.embeddings, "ctx", self.prompts_text),
                                   self.text_path)

    def text_side(self) -> tuple[Tensor, dict]:
        """couple_text=False: the text features (C, E) and the text prompt rows CMPA reads before each block
        1..depth ({layer: rows}); neither depends on the images."""
        text, rows = self.text_stream(), {}

        def record(layer: int, image: None, text: TextStream) -> None:
            if 1 <= layer <= self.depth:
                rows[layer] = text.rows(1, self.n_ctx)

        run_towers(None, text, record)
        return text.features(), rows

    def couple(self, layer: int, image: ImageStream, text: Optional[TextStream],
               text_rows: Optional[dict] = None) -> None:
        """The coupling before block `layer` (run_towers' callback): CMPA between the prompt rows the previous
        block wrote in both streams (uncoupled: the text rows of text_side), its outputs written back (the text
        one only when coupled), each fused with the next block's ln_1."""
        if not 1 <= layer <= self.depth:
            return
        rows_v, local = gather_rows(image.rows(None, self.n_ctx))  # every rank's rows: pooled over the global batch
        rows_t = text.rows(1, self.n_ctx) if text is not None else text_rows[layer]
        new_v, new_t = self.cmpa_at(layer)(rows_v, rows_t)
        image.replace(new_v[local])
        if text is not None:
            text.replace(new_t, 1)

    def towers(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Image features (B, E) and text features (C, E), the towers stepped together. With the shared prefix
        the text prompt rows are one row set (the same for every class): CMPA then pools over one text row
        instead of C identical ones, which is the same result. Uncoupled, the text side comes first (cached
        in evaluation) and the image tower alone is stepped, reading its rows."""
        clip = self.clip
        image = ImageStream(clip, append_with_ln(clip.image_tokens(images), self.prompts_visual, clip.ln_pre,
                                                 self.backend), self.backend)
        if self.couple_text:
            text = self.text_stream()
            run_towers(image, text, self.couple)
            return image.features(), text.features()
        text_features, text_rows = self.cached_text_features(self.text_side)
        run_towers(image, None, lambda layer, image, _: self.couple(layer, image, None, text_rows))
        return image.features(), text_features

    def logits_and_extras(self, images: Tensor):
        image_features, text_features = self.towers(images)
        return self.clip_logits(image_features, text_features), {}
