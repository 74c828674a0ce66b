"""Prompt insertion fused with the block's LayerNorm, reference implementation (DESIGN.md, op 3).

  x        (N, L, D) residual stream, batch first
  prompts  (M, D) shared by all N, or (N, M, D)
  start    an int, or `starts` (N,) int64 per-sequence offsets
  mode "replace": y = x with rows [s, s+M) set to the prompts          (N, L, D)
  mode "insert":  y = cat(x[:, :s], prompts, x[:, s:])                 (N, L+M, D)
  y_ln = LayerNorm(y; ln_weight, ln_bias, eps) when LayerNorm parameters are given

Backward: dy_total = dy + LN_bwd(dy_ln); the prompts get dy_total at their rows (summed over N when
shared); x gets dy_total at the rows it landed on, and zero at the rows a replacement overwrote.

The raw ops are declared in fastprompt/ops/insert_prompts.py. The packed variant is
fastprompt/reference/insert_prompts_packed.py, which shares the LayerNorm parts below.
"""

from typing import Optional

import torch
from torch import Tensor

from ..ops.insert_prompts import INSERT_PROMPTS, out_len
from ..ops.outputs import empty
from ._math import compute_dtype, layer_norm_bwd, layer_norm_fwd, no_autocast


def row_maps(n: int, length: int, m: int, start: int, starts: Optional[Tensor], mode: str, device):
    """Index maps between x, the prompts and y.

    prompt_pos (N, M): the row of y that prompt row j lands on, s + j.
    x_pos (N, L):      the row of y that x's row i lands on: i (replace), i or i + M (insert).
    """
    s = starts.to(device=device, dtype=torch.int64) if starts is not None else torch.full(
        (n,), start, dtype=torch.int64, device=device)
    prompt_pos = s[:, None] + torch.arange(m, device=device)
    i = torch.arange(length, device=device).expand(n, length)
    x_pos = i if mode == "replace" else torch.where(i < s[:, None], i, i + m)
    return prompt_pos, x_pos


def _rows(index: Tensor, d: int) -> Tensor:
    return index[..., None].expand(*index.shape, d)


def build_stream(x: Tensor, prompts: Tensor, start: int, starts: Optional[Tensor], mode: str) -> Tensor:
    """y, in x's dtype (it only moves values)."""
    n, length, d = x.shape
    m = prompts.shape[-2]
    prompt_pos, x_pos = row_maps(n, length, m, start, starts, mode, x.device)
    y = empty(n, out_len(length, m, mode), d, like=x)
    y.scatter_(1, _rows(x_pos, d), x)
    y.scatter_(1, _rows(prompt_pos, d), prompts.expand(n, m, d).to(x.dtype))
    return y


def layer_norm_or_empty(y: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], eps: float) -> Tensor:
    """y_ln of both forwards (N × L and packed): LayerNorm(y) in the compute dtype, rounded to y's; an empty
    tensor when no LayerNorm parameter is given."""
    if ln_weight is None and ln_bias is None:
        return y.new_empty(0)
    with no_autocast(y.device):
        cd = compute_dtype(y.dtype)
        w = ln_weight.to(cd) if ln_weight is not None else None
        b = ln_bias.to(cd) if ln_bias is not None else None
        y_ln, _, _ = layer_norm_fwd(y.to(cd), w, b, eps)
    return y_ln.to(y.dtype)


def insert_prompts_fwd(x: Tensor, prompts: Tensor, start: int, starts: Optional[Tensor], ln_weight: Optional[Tensor],
                       ln_bias: Optional[Tensor], eps: float, mode: str) -> tuple[Tensor, Tensor, list[Tensor]]:
    y = build_stream(x, prompts, start, starts, mode)
    return y, layer_norm_or_empty(y, ln_weight, ln_bias, eps), []


def insert_prompts_fwd_fake(x, prompts, start, starts, ln_weight, ln_bias, eps, mode):
    """This forward saves nothing (the backward recomputes y and its statistics)."""
    n, length, d = x.shape
    y = x.new_empty(n, out_len(length, prompts.shape[-2], mode), d)
    y_ln = x.new_empty(0) if ln_weight is None and ln_bias is None else torch.empty_like(y)
    return y, y_ln, []


def through_layer_norm(dy: Tensor, grad_y_ln: Optional[Tensor], y: Tensor, ln_weight: Optional[Tensor],
                        ln_bias: Optional[Tensor], eps: float) -> tuple[Tensor, list[Tensor]]:
    """Both backwards' LayerNorm part, in y's (compute) dtype: dy_total = dy + LN_bwd(dy_ln), and the affine's
    gradients (zero without dy_ln) in the parameters' dtypes."""
    w = ln_weight.to(y.dtype) if ln_weight is not None else None
    _, mean, rstd = layer_norm_fwd(y, w, None, eps)
    if grad_y_ln is not None:
        dy_from_ln, dw, db = layer_norm_bwd(grad_y_ln.to(y.dtype), y, mean, rstd, w)
        dy = dy + dy_from_ln
    else:
        dw = torch.zeros_like(w) if w is not None else None
        db = y.new_zeros(y.shape[-1])
    return dy, [g.to(p.dtype) for g, p in ((dw, ln_weight), (db, ln_bias)) if p is not None]


def insert_prompts_bwd(grad_y: Optional[Tensor], grad_y_ln: Optional[Tensor], x: Tensor, prompts: Tensor, start: int,
                       starts: Optional[Tensor], ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                       saved: list[Tensor], eps: float, mode: str) -> tuple[Tensor, Tensor, list[Tensor]]:
    n, length, d = x.shape
    m = prompts.shape[-2]
    with no_autocast(x.device):
        cd = compute_dtype(x.dtype)
        dy = grad_y.to(cd) if grad_y is not None else x.new_zeros(n, out_len(length, m, mode), d, dtype=cd)
        ln_grads = []
        if grad_y_ln is not None or ln_weight is not None or ln_bias is not None:
            y = build_stream(x, prompts, start, starts, mode).to(cd)
            dy, ln_grads = through_layer_norm(dy, grad_y_ln, y, ln_weight, ln_bias, eps)
        prompt_pos, x_pos = row_maps(n, length, m, start, starts, mode, x.device)
        dprompts = dy.gather(1, _rows(prompt_pos, d))
        if prompts.dim() == 2:
            dprompts = dprompts.sum(0)
        dx = dy.gather(1, _rows(x_pos, d))
        if mode == "replace":  # the rows the prompts overwrote never reach y
            dx.scatter_(1, _rows(prompt_pos, d), 0.0)
    return dx.to(x.dtype), dprompts.to(prompts.dtype), ln_grads


INSERT_PROMPTS.implement("reference", insert_prompts_fwd, insert_prompts_bwd, forward_fake=insert_prompts_fwd_fake)


def insert_eager(x: Tensor, prompts: Tensor, start: int, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                 eps: float = 1e-5, mode: str = "replace") -> tuple[Tensor, Optional[Tensor]]:
    """What eager prompt-learning code does, as the benchmark baseline: torch.cat (a full copy of the
    stream), then a LayerNorm pass (another full read and write)."""
    m = prompts.shape[-2]
    p = prompts.expand(x.shape[0], m, x.shape[2]) if prompts.dim() == 2 else prompts
    tail = x[:, start + m:] if mode == "replace" else x[:, start:]
    y = torch.cat([x[:, :start], p, tail], dim=1)
    if ln_weight is None and ln_bias is None:
        return y, None
    return y, torch.nn.functional.layer_norm(y, (x.shape[-1],), ln_weight, ln_bias, eps)
