"""DPT, Dual-modality Prompt Tuning (Xing et al., IEEE TMM 2023; public code fanrena/DPT).

Three parts, trained together around a frozen CLIP:
- text: CoOp context, n_ctx = 16 tokens from N(0, 0.02²), class name at the end;
- vision, blocks 0..bottom_limit−2 (bottom_limit is 1-based, as in the public code): VPT-deep, n_visual_tokens
  fresh tokens per block appended at the end of the stream (after ln_pre), dropped after the block;
- vision, blocks bottom_limit−1..L−1: class-aware visual prompts (CAVPT). A frozen, unprompted image forward
  gives zero-shot logits against the hand-written template (the dataset's, methods/templates.py, as the public
  code; "a photo of a {}." by default); its top-K classes select rows
  of the learned CoOp text features T (C, E), unnormalised and not detached, and per block

      q0  = T[top-K] W_q0 + b                      (B, K, Dv)   the class queries
      kv  = [x.detach() ; tokens]                  (B, L + n_cavpt, Dv)  block input + learnable tokens
      a   = softmax((q0 Wq)(kv Wk)ᵀ / √qk_dim)     (B, K, L + n_cavpt)   single head
      out = (a kv) Wo                              (B, K, Dv)   Wo after the sum (computed as a (kv Wo))
      prompts    = LN_out(out + q0)                appended for the block, dropped after it
      aux logits = LN_aux(out) W_cls               (B, K, C)

The loss: during the first phase of training
CE(zero-shot image, learned text) + CE(prompted image, template text) + 0.1·CE(prompted image, learned text),
afterwards CE(prompted image, learned text); plus aux_weight · the auxiliary cross-entropy of the slots whose
class is the label. forward(images) gives the prompted-image × learned-text logits.

The first phase is the first half of the run (DESIGN.md: epochs < 30 of 60). The public code switches at a
fixed epoch (PRETRAIN.C = 30, set beside MAX_EPOCH = 60 in its script), so a fixed 30 would never switch in a
20-epoch run. Here the switch is epoch ceil(switch_fraction · epochs) (0.5: 30 of 60, 10 of 20), resolved
against the run's length, which the trainer sets (set_epoch(epoch, epochs): plain attributes); switch_epoch=N
fixes it at epoch N as the public code does. Epoch 0 is in the first phase of a run of any length, so a
method used outside the trainer needs `epochs` (or switch_epoch) only past epoch 0.

Choices where DESIGN.md is silent (the public code decides where it is explicit):
- Each CAVPT block owns its query Linear(E → Dv) (with bias, as the public meta-net), its learnable tokens,
  its q/k/out projections (no bias), both LayerNorms (LN_out, LN_aux) and its classifier; all are trained at
  `lr` and start at PyTorch's defaults (LayerNorm 1/0, Linear Kaiming-uniform), the tokens at N(0, 0.02²).
- Keys and values are the block's input residual stream (class and patch tokens, before ln_1; the previous
  block's prompts are already dropped), detached; the learnable tokens are not detached.
- The auxiliary cross-entropy is the mean over the matched slots of all CAVPT blocks together, as the public
  code (which averages over the selected rows), not over the batch. On a batch where no slot matches (no
  image's top-K holds its label) the term is left out of the loss, as the public code does: the auxiliary
  classifiers and LN_aux, which only that term reaches, then get no gradient at all (grad None), so SGD
  applies neither momentum nor weight decay to them on that step, exactly as there; a zero gradient would
  decay them. Knowing whether a slot matches is one host synchronisation per step (the public code's boolean
  indexing makes the same one). The trainer's DDP wrapper finds such unused parameters
  (find_unused_parameters); the mean is per rank.
- top_k larger than the number of classes is clamped to it (as the public code).
- Batch invariance: q0 = Linear(T) and its query projection are computed per class (C rows) and gathered, and
  Wo is applied to the values before the weighted sum (the same product), so that every GEMM of the CAVPT
  path has a row count that does not shrink to a few rows with the batch; an image's evaluation logits then
  do not change bitwise with the size of its batch (the golden test checks the public order of operations).
- The zero-shot forward and the prompted forward share the stem (patch embedding and ln_pre), computed once
  without autograd: the CLIP is frozen and nothing is prompted before ln_pre.
- The template text features are a frozen buffer computed once (the public code holds them in a Parameter
  that no optimiser sees). `epoch` and `epochs` are plain attributes, not in the state_dict: the trainer sets
  them, also on resume. bottom_limit = L + 1 leaves no CAVPT block (CoOp + VPT-deep under the DPT loss, no aux term);
  n_visual_tokens = 0 leaves no VPT prompt.
- Evaluation still runs the zero-shot forward per batch (the prompts depend on each image's top-K); the
  learned text features are computed once per evaluation (cached_text_features).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import insert_prompts
from ..clip import BlockHooks, Slot, clean_classname
from .base import PromptMethod, normal_init, small_model_hint
from .templates import check_template
from .text import TextPath, TextPrompts, context_init

EARLY_LEARNED_TEXT_WEIGHT = 0.1  # weight of CE(prompted image, learned text) in the first phase


class CAVPT(nn.Module):
    """The class-aware visual prompts of one block: K prompts (one per selected class) from a single-head cross
    attention of the class queries onto the block's input tokens, and the auxiliary class logits of each slot."""

    def __init__(self, embed_dim: int, width: int, n_classes: int, n_tokens: int, qk_dim: int):
        super().__init__()
        self.query = nn.Linear(embed_dim, width)  # text feature → query token q0
        self.tokens = normal_init((n_tokens, width))
        self.q_proj = nn.Linear(width, qk_dim, bias=False)
        self.k_proj = nn.Linear(width, qk_dim, bias=False)
        self.out_proj = nn.Linear(width, width, bias=False)
        self.ln_out = nn.LayerNorm(width)
        self.ln_aux = nn.LayerNorm(width)
        self.classifier = nn.Linear(width, n_classes, bias=False)

    def forward(self, text: Tensor, top: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """text (C, E) the learned text features, top (B, K) each image's selected classes, x (B, L, Dv) the
        block's input stream → (prompts (B, K, Dv), aux logits (B, K, C))."""
        # q0 and its query projection are functions of the class alone: computed per class and gathered, which
        # leaves each image's result independent of the rest of the batch.
        q0_all = self.query(text)
        q0, q = q0_all[top], self.q_proj(q0_all)[top]
        # The stream is detached: the prompts read the image but send no gradient into the earlier blocks.
        kv = torch.cat([x.detach(), self.tokens.expand(x.shape[0], -1, -1)], dim=1)
        # out = softmax((q0 Wq)(kv Wk)ᵀ / √qk_dim) kv Wo. The public code applies Wo after the weighted sum;
        # a (kv Wo) is the same product, and its GEMM then runs over the B·(L + n) tokens instead of the B·K
        # slots, whose few rows take BLAS paths that depend on the batch size (MKL: M < 12), so an image's
        # logits would change bitwise with the size of its evaluation batch. Cost: one Dv × Dv GEMM over one
        # block's tokens per CAVPT block, under 1% of the image tower with the defaults.
        out = F.scaled_dot_product_attention(q, self.k_proj(kv), self.out_proj(kv))
        return self.ln_out(out + q0), self.classifier(self.ln_aux(out))


class _DPTHooks(BlockHooks):
    """Before each block, append its prompts (VPT tokens, or the CAVPT prompts of the selected classes) to the
    stream fused with the block's ln_1; after it, drop them. Collects the CAVPT blocks' aux logits."""

    def __init__(self, method: "DPT", text: Tensor, top: Tensor):
        self.method, self.text, self.top = method, text, top
        self.aux_logits: list[Tensor] = []
        self._length = None

    def before(self, layer: int, x: Tensor):
        m = self.method
        first_cavpt = m.bottom_limit - 1
        self._length = None
        if layer >= first_cavpt:
            prompts, aux = m.cavpt[layer - first_cavpt](self.text, self.top, x)
            self.aux_logits.append(aux)
        elif m.visual_prompts is not None:
            prompts = m.visual_prompts[layer]
        else:  # no VPT tokens: the block runs on the stream as it is
            return x, None
        self._length = x.shape[1]
        ln = m.clip.vision_blocks[layer].ln_1
        return insert_prompts(x, prompts, x.shape[1], ln.weight, ln.bias, ln.eps, "insert", backend=m.backend)

    def after(self, layer: int, x: Tensor) -> Tensor:
        return x if self._length is None else x[:, :self._length]


class DPT(PromptMethod):
    """DPT. Config: n_ctx (16), n_visual_tokens (10), bottom_limit (12, 1-based: CAVPT in blocks
    bottom_limit..L), top_k (10), n_cavpt_tokens (10), qk_dim (32), aux_weight (0.3), switch_fraction (0.5:
    the loss switches after this fraction of the run's epochs), switch_epoch (None; an epoch number overrides
    switch_fraction), template ("a photo of a {}."), ctx_lr (0.002, CoOp context), lr (0.01, the rest),
    class_chunk, checkpoint_text."""

    name = "dpt"
    template_from_dataset = True  # the frozen template text features use the dataset's template, as the public code

    def __init__(self, clip_model, classnames: Iterable[str], *, n_ctx: int = 16, n_visual_tokens: int = 10,
                 bottom_limit: int = 12, top_k: int = 10, n_cavpt_tokens: int = 10, qk_dim: int = 32,
                 aux_weight: float = 0.3, switch_fraction: float = 0.5, switch_epoch: Optional[int] = None,
                 template: str = "a photo of a {}.",
                 ctx_lr: float = 0.002, lr: float = 0.01, class_chunk: Optional[int] = None,
                 checkpoint_text: bool = False, pack_text: bool = True, prefix_reuse: bool = True,
                 backend: str = "auto"):
        super().__init__(clip_model, classnames, backend)
        clip, n_cls, layers = self.clip, len(self.classnames), self.clip.vision_layers
        if not 1 <= bottom_limit <= layers + 1:
            raise ValueError(f"dpt: bottom_limit {bottom_limit} is out of range: it is 1-based (CAVPT in blocks "
                             f"bottom_limit..{layers}), from 1 to {layers + 1} for this model's {layers} blocks"
                             + small_model_hint(self.name))
        for what, value, low in (("n_ctx", n_ctx, 1), ("top_k", top_k, 1), ("qk_dim", qk_dim, 1),
                                 ("n_visual_tokens", n_visual_tokens, 0), ("n_cavpt_tokens", n_cavpt_tokens, 0)):
            if value < low:
                raise ValueError(f"dpt: {what} must be at least {low}, got {value}")
        if not 0.0 <= switch_fraction <= 1.0:
            raise ValueError(f"dpt: switch_fraction is a fraction of the run's epochs, from 0 to 1; got "
                             f"{switch_fraction}")
        if switch_epoch is not None and switch_epoch < 0:
            raise ValueError(f"dpt: switch_epoch must be at least 0, got {switch_epoch}")
        self.bottom_limit, self.top_k = bottom_limit, min(top_k, n_cls)
        self.aux_weight, self.switch_fraction, self.switch_epoch = aux_weight, switch_fraction, switch_epoch
        self.ctx_lr, self.lr = ctx_lr, lr
        self.text_path = TextPath(class_chunk, checkpoint_text, pack_text, prefix_reuse)
        # set by the trainer (epochs: the run's length): the loss changes at the switch
        self.epoch, self.epochs = 0, None

        # text: CoOp, class at the end
        self.ctx, self.n_ctx, _ = context_init(clip, n_ctx, None)
        self.prompts = TextPrompts(clip, [[Slot("ctx", self.n_ctx), " " + clean_classname(c) + "."]
                                          for c in self.classnames], backend)
        (template,) = check_template(self.name, template)
        self.register_buffer("fixed_text_features", clip.encode_class_names(template, self.classnames),
                             persistent=False)

        # vision: VPT-deep below bottom_limit, one CAVPT per block from bottom_limit on
        # (None when there are none: an empty Parameter would never get a gradient, which DDP rejects)
        self.visual_prompts = (normal_init((bottom_limit - 1, n_visual_tokens, clip.vision_width))
                               if bottom_limit > 1 and n_visual_tokens > 0 else None)
        self.cavpt = nn.ModuleList([CAVPT(clip.embed_dim, clip.vision_width, n_cls, n_cavpt_tokens, qk_dim)
                                    for _ in range(layers - bottom_limit + 1)])

    def parameter_groups(self) -> list:
        """Two groups: the CoOp context at ctx_lr, the visual prompts and CAVPT at lr."""
        rest = [p for name, p in self.named_parameters() if p.requires_grad and name != "ctx"]
        return [{"params": [self.ctx], "lr": self.ctx_lr}, {"params": rest, "lr": self.lr}]

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """The loss switches phase at an epoch resolved against the run's length (switch_at)."""
        self.epoch, self.epochs = epoch, epochs

    def text_features(self) -> Tensor:
        """The learned (CoOp) text features (C, E), unnormalised."""
        return self.prompts.encode(
            self.clip, lambda sl: self.prompts.write(self.prompts.embeddings[sl], "ctx", self.ctx, sl), self.text_path)

    def select_classes(self, zero_shot_features: Tensor) -> Tensor:
        """The top-K classes (B, K) of each image by zero-shot logits against the template text features."""
        return self.clip_logits(zero_shot_features, self.fixed_text_features).topk(self.top_k, dim=-1).indices

    def logits_and_extras(self, images: Tensor):
        clip = self.clip
        with torch.no_grad():  # the frozen, unprompted forward; the stem is shared with the prompted one
            x = clip.ln_pre(clip.image_tokens(images))
            zero_shot = clip.encode_image_stream(x)
            top = self.select_classes(zero_shot)
        text = self.cached_text_features(self.text_features)
        hooks = _DPTHooks(self, text, top)
        image_features = clip.encode_image_stream(x, hooks)
        aux = torch.stack(hooks.aux_logits, dim=1) if hooks.aux_logits else None  # (B, blocks, K, C)
        extras = dict(image_features=image_features, text_features=text, zero_shot_features=zero_shot,
                      top_k=top, aux_logits=aux)
        return self.clip_logits(image_features, text), extras

    def aux_loss(self, aux_logits: Optional[Tensor], top: Tensor, labels: Tensor) -> Optional[Tensor]:
        """Mean cross-entropy of the aux logits over the slots (of every CAVPT block) whose class is the label;
        None when no slot matches (or there is no CAVPT block): the loss then leaves the term out."""
        if aux_logits is None:
            return None
        b, blocks, k, n_cls = aux_logits.shape
        matched = (top == labels[:, None])[:, None].expand(b, blocks, k)
        if not bool(matched.any()):  # a host sync: the public code's boolean indexing needs the same one
            return None
        target = labels[:, None, None].expand(b, blocks, k)
        ce = F.cross_entropy(aux_logits.reshape(-1, n_cls), target.reshape(-1), reduction="none").view(b, blocks, k)
        return torch.where(matched, ce, 0.0).sum() / matched.sum()

    def switch_at(self) -> Optional[int]:
        """The first epoch of the second phase: switch_epoch, else ceil(switch_fraction · epochs); None while the
        run's length is unknown."""
        if self.switch_epoch is not None:
            return self.switch_epoch
        return None if self.epochs is None else math.ceil(self.switch_fraction * self.epochs)

    def in_first_phase(self) -> bool:
        switch = self.switch_at()
        if switch is not None:
            return self.epoch < switch
        if self.epoch == 0:  # ceil(f · epochs) >= 1 for any run when f > 0
            return self.switch_fraction > 0
        raise ValueError(f"dpt: at epoch {self.epoch} the loss depends on the run's length: set method.epochs (the "
                         "trainer does) or give switch_epoch")

    def loss_from(self, logits: Tensor, extras: dict, labels: Tensor) -> Tensor:
        if self.in_first_phase():
            loss = (F.cross_entropy(self.clip_logits(extras["zero_shot_features"], extras["text_features"]), labels)
                    + F.cross_entropy(self.clip_logits(extras["image_features"], self.fixed_text_features), labels)
                    + EARLY_LEARNED_TEXT_WEIGHT * F.cross_entropy(logits, labels))
        else:
            loss = F.cross_entropy(logits, labels)
        aux = self.aux_loss(extras["aux_logits"], extras["top_k"], labels)
        return loss if aux is None else loss + self.aux_weight * aux
