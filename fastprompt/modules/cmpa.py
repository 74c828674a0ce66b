"""`CrossModalPromptAttention`: a drop-in replacement for `PromptAttention` of the public DCP code
(GingL/CMPA, clip/model.py).

Same constructor, same forward contract (LND by default), same parameters under the same state_dict
keys, spelling included ("promt_attention_*"), so a checkpoint of that code loads with strict=True.
The submodules are the same kinds as the original's (nn.MultiheadAttention, LayerNorm, Linear), so
their initialisation is the original's too; only their parameters are used: the forward runs the
fused op `fastprompt.ops.cross_modal_prompt_attention` on the selected backend.
"""

from collections import OrderedDict
from typing import Optional

import torch
from torch import Tensor, nn

from ..ops import cross_modal_prompt_attention
from ..ops.cmpa import FUSINGS, CMPASideParams


# The keys of the design_details dict the public DCP code passes down its model (trainers/cmpa.py), all
# accepted so that its dict can be handed over as it is; a key outside them is a mistake (a misspelt "fusing").
DESIGN_DETAILS_KEYS = ("trainer", "vision_depth", "language_depth", "vision_ctx", "language_ctx", "cmpa_length",
                       "fusing", "parameter_sharing")


class QuickGELU(nn.Module):
    """x·σ(1.702x), CLIP's activation (present for the module structure; the op applies it)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def _mlp(width: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict([
        ("c_fc", nn.Linear(width, width * 4)),
        ("gelu", QuickGELU()),
        ("c_proj", nn.Linear(width * 4, width)),
    ]))


class CrossModalPromptAttention(nn.Module):
    """Cross-modal prompt attention (CMPA) of DCP: visual and text prompts exchange information.

    Args:
        d_model_visual, n_head_visual: width and heads of the visual side (ViT-B/16: 768, 12).
        d_model_text, n_head_text: width and heads of the text side (ViT-B/16: 512, 8).
        design_details: the original's config dict; its "fusing" entry is used when present.
        fusing: "mean" (default), "first" or "max" pooling over B and C. Giving it together with a
            different design_details["fusing"] is an error.
        batch_first: inputs and outputs are (B, M, Dv) and (C, M, Dt) instead of LND.
        backend: "auto", "reference", "triton" or "cuda" (the attribute `backend` can be changed later).

    The attribute `compute_text` (default True; not in the original) set to False computes the visual side
    only: forward then returns (new_visual, None) and the text side's parameters take no part.

    forward(visual_context (M, B, Dv), textual_context (M, C, Dt)) -> (new_visual, new_textual), the
    results broadcast over B and C as stride-0 `expand` views, exactly as the original returns them.
    """

    def __init__(self, d_model_visual: int = 768, n_head_visual: int = 12, d_model_text: int = 512,
                 n_head_text: int = 8, design_details: Optional[dict] = None, *, fusing: Optional[str] = None,
                 batch_first: bool = False, backend: str = "auto"):
        super().__init__()
        unknown = sorted(set(design_details or {}) - set(DESIGN_DETAILS_KEYS))
        if unknown:
            raise ValueError(f"CrossModalPromptAttention: design_details has no key {', '.join(map(repr, unknown))}; "
                             f"the original's keys are {', '.join(DESIGN_DETAILS_KEYS)} (only 'fusing' is read)")
        for side, width, heads in (("visual", d_model_visual, n_head_visual), ("text", d_model_text, n_head_text)):
            if not (isinstance(width, int) and isinstance(heads, int) and width >= 1 and heads >= 1
                    and width % heads == 0):
                raise ValueError(f"CrossModalPromptAttention: n_head_{side}={heads!r} must be a whole number of at "
                                 f"least 1 dividing d_model_{side}={width!r} (each head takes width / heads)")
        from_details = (design_details or {}).get("fusing")
        if fusing is not None and from_details is not None and fusing != from_details:
            raise ValueError(f"CrossModalPromptAttention: fusing={fusing!r} contradicts "
                             f"design_details['fusing']={from_details!r}")
        fusing = fusing or from_details or "mean"
        if fusing not in FUSINGS:
            raise ValueError(f"CrossModalPromptAttention: fusing must be one of {FUSINGS}, got {fusing!r}")
        self.fusing = fusing
        self.batch_first = batch_first
        self.backend = backend
        self.compute_text = True
        # Registration order and names follow the original, so state_dict() lists the same keys in the
        # same order.
        self.promt_attention_visual = nn.MultiheadAttention(d_model_visual, n_head_visual)
        self.ln_pa_1_visual = nn.LayerNorm(d_model_visual)
        self.mlp_pa_visual = _mlp(d_model_visual)
        self.ln_pa_2_visual = nn.LayerNorm(d_model_visual)
        self.proj_v2t = nn.Linear(d_model_visual, d_model_text)
        self.proj_t2v = nn.Linear(d_model_text, d_model_visual)
        self.promt_attention_text = nn.MultiheadAttention(d_model_text, n_head_text)
        self.ln_pa_1_text = nn.LayerNorm(d_model_text)
        self.mlp_pa_text = _mlp(d_model_text)
        self.ln_pa_2_text = nn.LayerNorm(d_model_text)

    def side_params(self, side: str) -> CMPASideParams:
        """The parameters of one side ("visual" or "text") in the order the op takes them."""
        proj = self.proj_t2v if side == "visual" else self.proj_v2t
        attn = getattr(self, f"promt_attention_{side}")
        ln1, ln2 = getattr(self, f"ln_pa_1_{side}"), getattr(self, f"ln_pa_2_{side}")
        mlp = getattr(self, f"mlp_pa_{side}")
        return CMPASideParams(proj.weight, proj.bias, ln1.weight, ln1.bias, attn.in_proj_weight, attn.in_proj_bias,
                              attn.out_proj.weight, attn.out_proj.bias, ln2.weight, ln2.bias,
                              mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight, mlp.c_proj.bias)

    def forward(self, visual_context: Tensor, textual_context: Tensor) -> tuple[Tensor, Tensor]:
        if self.batch_first:  # views: the op takes any strides
            visual_context, textual_context = visual_context.transpose(0, 1), textual_context.transpose(0, 1)
        eps = self.ln_pa_1_visual.eps
        if any(ln.eps != eps for ln in (self.ln_pa_2_visual, self.ln_pa_1_text, self.ln_pa_2_text)):
            raise ValueError("CrossModalPromptAttention: all four LayerNorms must share one eps")
        new_visual, new_text = cross_modal_prompt_attention(
            visual_context, textual_context, self.side_params("visual"), self.side_params("text"),
            n_head_visual=self.promt_attention_visual.num_heads, n_head_text=self.promt_attention_text.num_heads,
            fusing=self.fusing, eps=eps, backend=self.backend, compute_text=self.compute_text)
        if self.batch_first:
            new_visual = new_visual.transpose(0, 1)
            new_text = new_text.transpose(0, 1) if new_text is not None else None
        return new_visual, new_text

    def extra_repr(self) -> str:
        return f"fusing={self.fusing!r}, batch_first={self.batch_first}, backend={self.backend!r}"
