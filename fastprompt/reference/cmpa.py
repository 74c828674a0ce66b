"""Cross-modal prompt attention (CMPA), reference implementation: the specification of the op.

Math (DESIGN.md, op 1). V visual (M, B, Dv), T text (M, C, Dt); the text side mirrors the visual side:
  1. pool over B (resp. C): mean, first (index 0) or max         V̄ (M, Dv), T̄ (M, Dt)
  2. a = LN1v(proj_t2v(T̄)), b = LN1v(V̄)                       (one LN1v for both)
  3. V' = V̄ + MHA_v(query=a, key=b, value=b)                    (scale 1/√(Dv/Hv), no mask)
  4. V'' = V' + MLP_v(LN2v(V'))                                  (MLP: c_proj(QuickGELU(c_fc(·))))
  5. T'' likewise, with proj_v2t(V̄) as the query source: the pooled input V̄, not V''
  6. V'' and T'' are broadcast back over B and C by the caller (stride-0 views)

The raw ops (declared in fastprompt/ops/cmpa.py) compute in fp32 for fp16 / bf16 / fp32 inputs (fp64 for
fp64) and round the results to the input dtype. The forward returns V'' and T'' as (M, D) rows plus what the
backward needs (the pooled rows, the argmax of `max` and each computed side's intermediates, SAVED: M rows
each, a few hundred kB at ViT-B/16 widths, where recomputing them would read the 11 M weights once more in every
backward; DCP calls the op at 9 layers a step); the backward takes
the upstream gradients at the broadcast shape (M, B, Dv) and (M, C, Dt), reduces them over B and C, and
returns the input and parameter gradients.
"""

from typing import Optional

import torch
from torch import Tensor

from ..ops.cmpa import CMPA, CMPASideParams
from ._math import (attention_bwd, attention_fwd, compute_dtype, layer_norm_bwd, layer_norm_fwd, linear,
                    linear_bwd, no_autocast, quick_gelu, quick_gelu_bwd)


# ---- pooling over the batch (visual) or class (text) dimension ---------------------------------

def pool(x: Tensor, fusing: str, cd: torch.dtype) -> tuple[Tensor, Tensor]:
    """(M, N, D) → (M, D) in the compute dtype, and the argmax indices for `max` (else empty)."""
    empty = torch.empty(0, dtype=torch.int64, device=x.device)
    if fusing == "mean":
        return torch.mean(x, dim=1, dtype=cd), empty
    if fusing == "first":
        return x[:, 0].to(cd, copy=True), empty  # a copy: op outputs never alias inputs
    values, idx = torch.max(x, dim=1)  # first index of the maximum, ties included
    return values.to(cd), idx


def pool_bwd(dpooled: Tensor, x: Tensor, fusing: str, idx: Tensor) -> Tensor:
    """Gradient of the pooling: (M, D) → (M, N, D) in x's dtype."""
    m, n, d = x.shape
    if fusing == "mean":
        return (dpooled / n).unsqueeze(1).expand(m, n, d).to(x.dtype).contiguous()
    dx = torch.zeros(m, n, d, dtype=dpooled.dtype, device=dpooled.device)
    if fusing == "first":
        dx[:, 0] = dpooled
    else:
        dx.scatter_(1, idx.unsqueeze(1), dpooled.unsqueeze(1))
    return dx.to(x.dtype)


# ---- one side: query from the other modality, keys and values from this one -----------------

def side_forward(xbar: Tensor, other_bar: Tensor, p: CMPASideParams, n_head: int, eps: float):
    """Returns this side's output rows (M, D) and the intermediates its backward needs."""
    d = xbar.shape[-1]
    wq, wk, wv = p.in_proj_weight.split(d)
    bq, bk, bv = p.in_proj_bias.split(d)
    proj = linear(other_bar, p.proj_weight, p.proj_bias)
    a, mean_a, rstd_a = layer_norm_fwd(proj, p.ln1_weight, p.ln1_bias, eps)
    b, mean_b, rstd_b = layer_norm_fwd(xbar, p.ln1_weight, p.ln1_bias, eps)
    q, k, v = linear(a, wq, bq), linear(b, wk, bk), linear(b, wv, bv)
    o, probs = attention_fwd(q, k, v, n_head)
    x1 = xbar + linear(o, p.out_proj_weight, p.out_proj_bias)
    c, mean_c, rstd_c = layer_norm_fwd(x1, p.ln2_weight, p.ln2_bias, eps)
    h = linear(c, p.fc_weight, p.fc_bias)
    g = quick_gelu(h)
    out = x1 + linear(g, p.cproj_weight, p.cproj_bias)
    cache = dict(proj=proj, mean_a=mean_a, rstd_a=rstd_a, a=a, mean_b=mean_b, rstd_b=rstd_b, b=b, q=q, k=k, v=v,
                 o=o, probs=probs, x1=x1, mean_c=mean_c, rstd_c=rstd_c, c=c, h=h, g=g)
    return out, cache


# The intermediates of one side that the forward saves for the backward, in this order, with their shapes
# (M rows, width D, H heads, MLP width F); side_forward's cache holds them.
SAVED = ("proj", "mean_a", "rstd_a", "a", "mean_b", "rstd_b", "b", "q", "k", "v", "o", "probs", "x1", "mean_c",
         "rstd_c", "c", "h", "g")


def saved_shapes(m: int, d: int, h: int, f: int) -> list[tuple[int, ...]]:
    rows, stats = (m, d), (m, 1)
    shapes = dict(proj=rows, a=rows, b=rows, q=rows, k=rows, v=rows, o=rows, x1=rows, c=rows, probs=(h, m, m),
                  h=(m, f), g=(m, f))
    return [shapes.get(name, stats) for name in SAVED]


def side_backward(dout: Tensor, xbar: Tensor, other_bar: Tensor, p: CMPASideParams, n_head: int, f: dict):
    """Returns dV̄ (this side's pooled input), dŌ (the other side's pooled input, through proj) and the
    parameter gradients as a CMPASideParams. `f`: the forward's intermediates (side_forward's cache)."""
    d = xbar.shape[-1]
    wq, wk, wv = p.in_proj_weight.split(d)
    # MLP residual branch: out = x1 + c_proj(g(c_fc(LN2(x1))))
    dg, dw_cproj, db_cproj = linear_bwd(dout, f["g"], p.cproj_weight)
    dh = quick_gelu_bwd(dg, f["h"])
    dc, dw_fc, db_fc = linear_bwd(dh, f["c"], p.fc_weight)
    dx1_ln, dw_ln2, db_ln2 = layer_norm_bwd(dc, f["x1"], f["mean_c"], f["rstd_c"], p.ln2_weight)
    dx1 = dout + dx1_ln
    # attention residual branch: x1 = V̄ + out_proj(MHA(q, k, v))
    do, dw_out, db_out = linear_bwd(dx1, f["o"], p.out_proj_weight)
    dq, dk, dv = attention_bwd(do, f["q"], f["k"], f["v"], f["probs"], n_head)
    da, dwq, dbq = linear_bwd(dq, f["a"], wq)
    db_from_k, dwk, dbk = linear_bwd(dk, f["b"], wk)
    db_from_v, dwv, dbv = linear_bwd(dv, f["b"], wv)
    # LN1 is applied twice (query source and key/value source): its affine gradients add up
    dproj, dw_ln1_a, db_ln1_a = layer_norm_bwd(da, f["proj"], f["mean_a"], f["rstd_a"], p.ln1_weight)
    dxbar_ln, dw_ln1_b, db_ln1_b = layer_norm_bwd(db_from_k + db_from_v, xbar, f["mean_b"], f["rstd_b"], p.ln1_weight)
    dother, dw_proj, db_proj = linear_bwd(dproj, other_bar, p.proj_weight)
    grads = CMPASideParams(
        dw_proj, db_proj, dw_ln1_a + dw_ln1_b, db_ln1_a + db_ln1_b,
        torch.cat([dwq, dwk, dwv]), torch.cat([dbq, dbk, dbv]), dw_out, db_out,
        dw_ln2, db_ln2, dw_fc, db_fc, dw_cproj, db_cproj,
    )
    return dx1 + dxbar_ln, dother, grads


# ---- the raw ops --------------------------------------------------------------------------------

def _upcast(params: list[Tensor], cd: torch.dtype) -> CMPASideParams:
    return CMPASideParams(*(t.to(cd) for t in params))


def cmpa_fwd(visual: Tensor, text: Tensor, visual_params: list[Tensor], text_params: list[Tensor],
             n_head_visual: int, n_head_text: int, fusing: str, eps: float, compute_text: bool
             ) -> tuple[Tensor, Tensor, list[Tensor]]:
    with no_autocast(visual.device):
        cd = compute_dtype(visual.dtype)
        vbar, vidx = pool(visual, fusing, cd)
        tbar, tidx = pool(text, fusing, cd)
        out_v, cache_v = side_forward(vbar, tbar, _upcast(visual_params, cd), n_head_visual, eps)
        saved = [vbar, tbar, vidx, tidx, *(cache_v[name] for name in SAVED)]
        if compute_text:
            out_t, cache_t = side_forward(tbar, vbar, _upcast(text_params, cd), n_head_text, eps)
            out_t = out_t.to(text.dtype)
            saved += [cache_t[name] for name in SAVED]
        else:  # the visual side alone (DCP as its public code runs it): the text side is never computed
            out_t = text.new_empty(0)
    return out_v.to(visual.dtype), out_t, saved


def cmpa_fwd_fake(visual, text, visual_params, text_params, n_head_visual, n_head_text, fusing, eps, compute_text):
    """This forward saves the pooled rows and each computed side's intermediates in the compute dtype and the
    int64 argmax (not the kernels' workspace)."""
    m, _, dv = visual.shape
    dt = text.shape[2]
    cd = compute_dtype(visual.dtype)
    idx_v = visual.new_empty((m, dv) if fusing == "max" else (0,), dtype=torch.int64)
    idx_t = text.new_empty((m, dt) if fusing == "max" else (0,), dtype=torch.int64)
    saved = [visual.new_empty((m, dv), dtype=cd), text.new_empty((m, dt), dtype=cd), idx_v, idx_t]
    saved += [visual.new_empty(s, dtype=cd) for s in saved_shapes(m, dv, n_head_visual, visual_params[10].shape[0])]
    if compute_text:
        saved += [text.new_empty(s, dtype=cd) for s in saved_shapes(m, dt, n_head_text, text_params[10].shape[0])]
    return (visual.new_empty(m, dv), text.new_empty((m, dt) if compute_text else (0,)), saved)


def cmpa_bwd(grad_visual_out: Optional[Tensor], grad_text_out: Optional[Tensor], visual: Tensor, text: Tensor,
             visual_params: list[Tensor], text_params: list[Tensor], saved: list[Tensor], n_head_visual: int,
             n_head_text: int, fusing: str, eps: float, compute_text: bool
             ) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
    """Without compute_text the text parameters get empty gradients (they took no part)."""
    with no_autocast(visual.device):
        vbar, tbar, vidx, tidx = saved[:4]
        n = len(SAVED)
        cache_v = dict(zip(SAVED, saved[4:4 + n]))
        cache_t = dict(zip(SAVED, saved[4 + n:4 + 2 * n])) if compute_text else None
        cd = vbar.dtype
        pv, pt = _upcast(visual_params, cd), _upcast(text_params, cd)
        dvbar, dtbar = torch.zeros_like(vbar), torch.zeros_like(tbar)
        grads_v = grads_t = None  # zeros only for a side no gradient reaches (not filled to be replaced)
        if grad_visual_out is not None:  # the broadcast over B is summed back here
            dv_own, dt_cross, grads_v = side_backward(grad_visual_out.sum(1, dtype=cd), vbar, tbar, pv,
                                                      n_head_visual, cache_v)
            dvbar, dtbar = dvbar + dv_own, dtbar + dt_cross
        if grad_text_out is not None and compute_text:
            dt_own, dv_cross, grads_t = side_backward(grad_text_out.sum(1, dtype=cd), tbar, vbar, pt,
                                                      n_head_text, cache_t)
            dvbar, dtbar = dvbar + dv_cross, dtbar + dt_own
        if grads_v is None:
            grads_v = [torch.zeros_like(t) for t in pv]
        if grads_t is None:
            grads_t = [torch.zeros_like(t) for t in pt] if compute_text else [t.new_empty(0) for t in pt]
        dvisual, dtext = pool_bwd(dvbar, visual, fusing, vidx), pool_bwd(dtbar, text, fusing, tidx)
    return (dvisual, dtext,
            [g.to(p.dtype) for g, p in zip(grads_v, visual_params)],
            [g.to(p.dtype) for g, p in zip(grads_t, text_params)])


CMPA.implement("reference", cmpa_fwd, cmpa_bwd, forward_fake=cmpa_fwd_fake)


def cmpa_eager(visual: Tensor, text: Tensor, visual_params, text_params, n_head_visual: int, n_head_text: int,
               fusing: str, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """The same math as plain differentiable PyTorch in the inputs' own dtype, outside any custom op:
    the "eager PyTorch" and "torch.compile of the reference" baselines of the benchmarks."""
    vbar = visual.mean(1) if fusing == "mean" else visual[:, 0] if fusing == "first" else visual.max(1).values
    tbar = text.mean(1) if fusing == "mean" else text[:, 0] if fusing == "first" else text.max(1).values
    out_v, _ = side_forward(vbar, tbar, CMPASideParams(*visual_params), n_head_visual, eps)
    out_t, _ = side_forward(tbar, vbar, CMPASideParams(*text_params), n_head_text, eps)
    return out_v.unsqueeze(1).expand_as(visual), out_t.unsqueeze(1).expand_as(text)
