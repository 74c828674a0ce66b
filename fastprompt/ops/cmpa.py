"""Cross-modal prompt attention: input checks, the autograd Function over the backends' raw ops, and
the functional form. The math is in fastprompt/reference/cmpa.py."""

from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import _validation as v
from ..backends import _impls, select
from ..reference.cmpa import FUSINGS, N_SIDE_PARAMS, CMPASideParams

OP = "cross_modal_prompt_attention"


class CrossModalPromptAttentionFunction(torch.autograd.Function):
    """Both sides of CMPA through one backend's `fastprompt::cmpa_{fwd,bwd}_<backend>` pair.

    Returns the new visual and text prompts broadcast back over B and C as stride-0 `expand` views,
    as the original module does (the text output is None without compute_text); the backward receives the
    gradients at that broadcast shape.
    """

    @staticmethod
    def forward(ctx, visual: Tensor, text: Tensor, backend: str, n_head_visual: int, n_head_text: int,
                fusing: str, eps: float, compute_text: bool, *params: Tensor):
        impl = _impls[("cmpa", backend)]
        vp, tp = list(params[:N_SIDE_PARAMS]), list(params[N_SIDE_PARAMS:])
        out_v, out_t, saved = impl.forward(visual, text, vp, tp, n_head_visual, n_head_text, fusing, eps,
                                           compute_text)
        ctx.save_for_backward(visual, text, *params, *saved)
        ctx.config = (backend, n_head_visual, n_head_text, fusing, eps, compute_text)
        ctx.set_materialize_grads(False)
        m, b, _ = visual.shape
        c = text.shape[1]
        new_v = out_v.unsqueeze(1).expand(m, b, -1)
        return new_v, (out_t.unsqueeze(1).expand(m, c, -1) if compute_text else None)

    @staticmethod
    def backward(ctx, grad_visual: Optional[Tensor], grad_text: Optional[Tensor]):
        backend, n_head_visual, n_head_text, fusing, eps, compute_text = ctx.config
        n_config = 6
        if grad_visual is None and grad_text is None:
            return (None,) * (2 + n_config + 2 * N_SIDE_PARAMS)
        visual, text, *rest = ctx.saved_tensors
        vp, tp, saved = rest[:N_SIDE_PARAMS], rest[N_SIDE_PARAMS:2 * N_SIDE_PARAMS], rest[2 * N_SIDE_PARAMS:]
        impl = _impls[("cmpa", backend)]
        dvisual, dtext, dvp, dtp = impl.backward(grad_visual, grad_text, visual, text, vp, tp, saved,
                                                 n_head_visual, n_head_text, fusing, eps, compute_text)
        dtp = tuple(dtp) if compute_text else (None,) * N_SIDE_PARAMS
        return (dvisual, dtext) + (None,) * n_config + tuple(dvp) + dtp


def _check_side_params(side: str, p: CMPASideParams, d: int, d_other: int, n_head: int) -> None:
    names = [(f"{side}_params.{f}", t) for f, t in zip(CMPASideParams._fields, p)]
    for name, t in names:
        v.check_tensor(OP, name, t)
    hidden = p.fc_weight.shape[0] if p.fc_weight.dim() == 2 else -1
    other = "text" if side == "visual" else "visual"
    expected = CMPASideParams(
        (d, d_other), (d,), (d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (hidden, d), (hidden,),
        (d, hidden), (d,))
    for (name, t), shape in zip(names, expected):
        v.check_shape(OP, name, t, shape, why=f"{side} has width {d} and {other} width {d_other}; MLP width {hidden}")
    if hidden < 1:
        raise ValueError(f"{OP}: {side}_params.fc_weight has no rows")
    if n_head < 1 or d % n_head:
        raise ValueError(f"{OP}: the {side} width {d} is not divisible by n_head_{side}={n_head}")


def cross_modal_prompt_attention(visual: Tensor, text: Tensor, visual_params: Sequence[Tensor],
                                 text_params: Sequence[Tensor], *, n_head_visual: int, n_head_text: int,
                                 fusing: str = "mean", eps: float = 1e-5, backend: str = "auto",
                                 compute_text: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """Cross-modal prompt attention of DCP (both sides), in the LND layout of the original module.

    Args:
        visual: visual prompts (M, B, Dv). Any strides.
        text: text prompts (M, C, Dt); the same M as `visual`.
        visual_params: the 14 visual-side parameters, a `CMPASideParams` or a sequence in its order
            (proj_t2v, ln_pa_1_visual, promt_attention_visual, ln_pa_2_visual, mlp_pa_visual).
        text_params: the 14 text-side parameters (proj_v2t, the *_text layers).
        n_head_visual, n_head_text: attention heads of each side.
        fusing: pooling over B and C: "mean", "first" or "max".
        eps: LayerNorm epsilon.
        backend: "auto", "reference", "triton" or "cuda" (see fastprompt.backends).
        compute_text: False computes the visual side only (the text input still feeds the visual query and
            gets its gradient through it); new_text is then None and the text parameters get no gradient.

    Returns:
        (new_visual (M, B, Dv), new_text (M, C, Dt)): stride-0 broadcasts of one (M, D) result per side.
    """
    v.check_tensor(OP, "visual", visual, 3, "(M, B, Dv) in LND layout")
    v.check_tensor(OP, "text", text, 3, "(M, C, Dt) in LND layout")
    if len(visual_params) != N_SIDE_PARAMS or len(text_params) != N_SIDE_PARAMS:
        raise ValueError(f"{OP}: visual_params and text_params take {N_SIDE_PARAMS} tensors each "
                         f"({', '.join(CMPASideParams._fields)}), got {len(visual_params)} and {len(text_params)}")
    if fusing not in FUSINGS:
        raise ValueError(f"{OP}: fusing must be one of {FUSINGS}, got {fusing!r}")
    vp, tp = CMPASideParams(*visual_params), CMPASideParams(*text_params)
    m, _, dv = visual.shape
    dt = text.shape[2]
    if text.shape[0] != m:
        raise ValueError(f"{OP}: visual and text must have the same number of prompts M (dim 0): the query "
                         f"length of one side is the key length of the other; got {m} and {text.shape[0]}")
    v.check_nonempty(OP, [("visual", visual), ("text", text)])
    _check_side_params("visual", vp, dv, dt, n_head_visual)
    _check_side_params("text", tp, dt, dv, n_head_text)
    tensors = [visual, text, *vp, *tp]
    named = [("visual", visual), ("text", text)] + [(f"visual_params.{f}", t) for f, t in zip(vp._fields, vp)] \
        + [(f"text_params.{f}", t) for f, t in zip(tp._fields, tp)]
    device = v.check_same_device(OP, named)
    tensors = v.cast_floating(tensors, v.autocast_dtype(device))
    named = [(name, t) for (name, _), t in zip(named, tensors)]
    dtype = v.check_dtypes(OP, named)
    problem = dict(dtype=dtype, m=m, b=visual.shape[1], c=text.shape[1], dv=dv, dt=dt,
                   n_head_visual=n_head_visual, n_head_text=n_head_text, fusing=fusing,
                   mlp_visual=vp.fc_weight.shape[0], mlp_text=tp.fc_weight.shape[0], compute_text=compute_text)
    impl = select("cmpa", backend, device, problem)
    return CrossModalPromptAttentionFunction.apply(tensors[0], tensors[1], impl.backend, n_head_visual, n_head_text,
                                                   fusing, eps, bool(compute_text), *tensors[2:])
