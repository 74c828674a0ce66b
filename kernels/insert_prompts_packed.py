"""Packed prompt insertion fused with LayerNorm, in Triton: the triton backend of the op insert_prompts_packed
(declared in fastprompt/ops/insert_prompts_packed.py; the math: fastprompt/reference/insert_prompts_packed.py).

x (T, D) holds N sequences back to back, sequence n in rows [cu[n], cu[n+1]); rows cu[n] + s_n + [0, M) are
replaced by the prompts (mode "replace": every row of y comes from the same row of x or from a prompt).

Each program finds the sequence of each of its rows by a binary search over cu_seqlens (ceil(log2 N) loads of
an (N+1)-entry array that stays in cache), so no per-row map is built beforehand: no extra launch, no host
sync, nothing but cu_seqlens read besides x and the prompts. The rest mirrors kernels/insert_prompts.py, whose
block sizes (`config`) these kernels take:

Forward, one kernel: BLOCK_R packed rows a program, each read once from x or from its prompt row, written
to y, and its LayerNorm to y_ln; mean and 1/std kept for the backward.

Backward, one kernel plus torch's sums of the per-program partials: programs walk tiles of rows, rebuild y,
form dy_total = dy + LN_bwd(dy_ln) and route it to dx (zero on the replaced rows) and to the prompt row it
came from, (N, M, D) (summed over N afterwards when the prompts are shared). No atomics.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastprompt.ops.insert_prompts_packed import INSERT_PROMPTS_PACKED
from fastprompt.ops.outputs import empty

from ._common import implement, ln_backward_rows, sm_count, store_rows_and_layer_norm
from .insert_prompts import config, finish_backward, prompt_strides, supports


@triton.jit
def _sequence_of(cu_ptr, rows, N, steps):
    """The sequence of each packed row: the last n < N with cu[n] <= row. `steps` = ceil(log2 N) halvings of
    [lo, hi), which starts as [0, N), leave hi = lo + 1 (empty sequences are stepped over: cu[n] = cu[n+1])."""
    lo = tl.zeros_like(rows)
    hi = lo + N
    for _ in range(steps):
        mid = (lo + hi) // 2
        right = tl.load(cu_ptr + mid) <= rows
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    return lo


@triton.jit
def _locate(cu_ptr, starts_ptr, rows, start, T, N, M, steps, HAS_STARTS: tl.constexpr):
    """For each packed row: whether it exists, whether a prompt replaces it, its sequence n and prompt row j."""
    row_ok = rows < T
    n = _sequence_of(cu_ptr, rows, N, steps)
    if HAS_STARTS:
        s = tl.load(starts_ptr + n)
    else:
        s = start
    j = rows - tl.load(cu_ptr + n) - s
    return row_ok, row_ok & (j >= 0) & (j < M), n, j


@triton.jit
def _load_packed_rows(x_ptr, p_ptr, rows, cols, row_ok, is_prompt, n, j, D, sxt, sxd, spn, spm, spd):
    """Rows `rows` of y as fp32: each from its row of x, or from prompt row j of sequence n."""
    col_ok = cols < D
    x_mask = (row_ok & ~is_prompt)[:, None] & col_ok[None, :]
    xv = tl.load(x_ptr + rows.to(tl.int64)[:, None] * sxt + cols[None, :] * sxd, mask=x_mask, other=0.0)
    # spn = 0 for shared prompts: every sequence reads the same M rows
    p_off = n.to(tl.int64) * spn + j.to(tl.int64) * spm
    pv = tl.load(p_ptr + p_off[:, None] + cols[None, :] * spd, mask=is_prompt[:, None] & col_ok[None, :], other=0.0)
    return tl.where(is_prompt[:, None], pv, xv).to(tl.float32)


@triton.jit
def _packed_fwd_kernel(x_ptr, p_ptr, cu_ptr, starts_ptr, w_ptr, b_ptr, y_ptr, yln_ptr, mean_ptr, rstd_ptr,
                       start, T, N, M, D, steps, eps, sxt, sxd, spn, spm, spd,
                       HAS_STARTS: tl.constexpr, HAS_LN: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok, is_prompt, n, j = _locate(cu_ptr, starts_ptr, rows, start, T, N, M, steps, HAS_STARTS)
    y = _load_packed_rows(x_ptr, p_ptr, rows, cols, row_ok, is_prompt, n, j, D, sxt, sxd, spn, spm, spd)
    mask = row_ok[:, None] & (cols < D)[None, :]
    store_rows_and_layer_norm(y, mask, row_ok, rows.to(tl.int64), cols, D, eps, y_ptr, yln_ptr, mean_ptr, rstd_ptr,
                              w_ptr, b_ptr, HAS_LN, HAS_W, HAS_B)


@triton.jit
def _packed_bwd_kernel(x_ptr, p_ptr, cu_ptr, starts_ptr, w_ptr, mean_ptr, rstd_ptr, dy_ptr, dyln_ptr,
                       dx_ptr, dp_ptr, dw_part_ptr, db_part_ptr,
                       start, T, N, M, D, steps, sxt, sxd, spn, spm, spd, sdyt, sdyd, sdlt, sdld,
                       HAS_STARTS: tl.constexpr, HAS_DY: tl.constexpr, HAS_DYLN: tl.constexpr,
                       HAS_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        w = tl.full((BLOCK_D,), 1.0, tl.float32)
    dw_acc = tl.zeros((BLOCK_D,), tl.float32)
    db_acc = tl.zeros((BLOCK_D,), tl.float32)
    for tile in range(pid, tl.cdiv(T, BLOCK_R), tl.num_programs(0)):
        rows = tile * BLOCK_R + tl.arange(0, BLOCK_R)
        rows64 = rows.to(tl.int64)
        row_ok, is_prompt, n, j = _locate(cu_ptr, starts_ptr, rows, start, T, N, M, steps, HAS_STARTS)
        mask = row_ok[:, None] & col_ok[None, :]
        dy_total = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
        if HAS_DY:
            dy_total += tl.load(dy_ptr + rows64[:, None] * sdyt + cols[None, :] * sdyd, mask=mask,
                                other=0.0).to(tl.float32)
        if HAS_DYLN:  # y itself (one read of x or the prompts) only where the LayerNorm backward needs x̂
            y = _load_packed_rows(x_ptr, p_ptr, rows, cols, row_ok, is_prompt, n, j, D, sxt, sxd, spn, spm, spd)
            mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (y - mean[:, None]) * rstd[:, None], 0.0)
            dyln = tl.load(dyln_ptr + rows64[:, None] * sdlt + cols[None, :] * sdld, mask=mask,
                           other=0.0).to(tl.float32)
            dw_acc += tl.sum(dyln * xhat, axis=0)
            db_acc += tl.sum(dyln, axis=0)
            dy_total += ln_backward_rows(xhat, dyln * w[None, :], rstd, mask, D)
        # x's row t lands on y's row t; a replaced row gets zero
        tl.store(dx_ptr + rows64[:, None] * D + cols[None, :],
                 tl.where(is_prompt[:, None], 0.0, dy_total).to(dx_ptr.dtype.element_ty), mask=mask)
        p_rows = n.to(tl.int64) * M + j.to(tl.int64)
        tl.store(dp_ptr + p_rows[:, None] * D + cols[None, :], dy_total.to(dp_ptr.dtype.element_ty),
                 mask=is_prompt[:, None] & col_ok[None, :])
    if HAS_DYLN:
        tl.store(dw_part_ptr + pid * D + cols, dw_acc, mask=col_ok)
        tl.store(db_part_ptr + pid * D + cols, db_acc, mask=col_ok)


def _search_steps(n: int) -> int:
    """ceil(log2 n): the halvings that narrow [0, n) to one sequence."""
    return (n - 1).bit_length()


def insert_prompts_packed_fwd(x: Tensor, prompts: Tensor, cu_seqlens: Tensor, start: int, starts: Optional[Tensor],
                              ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], eps: float
                              ) -> tuple[Tensor, Tensor, list[Tensor]]:
    total, d = x.shape
    n, m = cu_seqlens.shape[0] - 1, prompts.shape[-2]
    has_ln = ln_weight is not None or ln_bias is not None
    y = empty(total, d, like=x)
    if has_ln:
        y_ln = empty(total, d, like=x)
        mean, rstd = (empty(total, like=x, dtype=torch.float32) for _ in range(2))
    else:  # the kernel writes none of them; y stands in as their (unused) pointer
        y_ln, mean, rstd = x.new_empty(0), y, y
    cfg = config(d)
    _packed_fwd_kernel[(triton.cdiv(total, cfg.block_r),)](
        x, prompts, cu_seqlens, starts if starts is not None else cu_seqlens,
        ln_weight if ln_weight is not None else x, ln_bias if ln_bias is not None else x,
        y, y_ln if has_ln else y, mean, rstd, start, total, n, m, d, _search_steps(n), eps,
        *x.stride(), *prompt_strides(prompts),
        HAS_STARTS=starts is not None, HAS_LN=has_ln, HAS_W=ln_weight is not None, HAS_B=ln_bias is not None,
        BLOCK_R=cfg.block_r, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps)
    return y, y_ln, ([mean, rstd] if has_ln else [])


def insert_prompts_packed_bwd(grad_y: Optional[Tensor], grad_y_ln: Optional[Tensor], x: Tensor, prompts: Tensor,
                              cu_seqlens: Tensor, start: int, starts: Optional[Tensor], ln_weight: Optional[Tensor],
                              ln_bias: Optional[Tensor], saved: list[Tensor], eps: float
                              ) -> tuple[Tensor, Tensor, list[Tensor]]:
    total, d = x.shape
    n, m = cu_seqlens.shape[0] - 1, prompts.shape[-2]
    has_ln = ln_weight is not None or ln_bias is not None
    has_dyln = grad_y_ln is not None and has_ln
    shared = prompts.dim() == 2
    cfg = config(d, backward=True)
    grid = max(1, min(triton.cdiv(total, cfg.block_r), cfg.programs_per_sm * sm_count(x.device)))
    dx = empty(total, d, like=x)
    # shared prompts: one fp32 row block per sequence, summed by finish_backward; per-sample: written in place
    dp = empty(n, m, d, like=x, dtype=torch.float32) if shared else empty(n, m, d, like=prompts)
    dw_part = empty(grid, d, like=x, dtype=torch.float32) if has_dyln else dx  # dx: an unused pointer
    db_part = empty(grid, d, like=x, dtype=torch.float32) if has_dyln else dx
    mean, rstd = saved if has_ln else (x, x)
    sdy = grad_y.stride() if grad_y is not None else (0, 0)
    sdln = grad_y_ln.stride() if has_dyln else (0, 0)
    _packed_bwd_kernel[(grid,)](
        x, prompts, cu_seqlens, starts if starts is not None else cu_seqlens,
        ln_weight if ln_weight is not None else x, mean, rstd, grad_y if grad_y is not None else x,
        grad_y_ln if has_dyln else x, dx, dp, dw_part, db_part,
        start, total, n, m, d, _search_steps(n), *x.stride(), *prompt_strides(prompts), *sdy, *sdln,
        HAS_STARTS=starts is not None, HAS_DY=grad_y is not None, HAS_DYLN=has_dyln, HAS_W=ln_weight is not None,
        BLOCK_R=cfg.block_r, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps)
    return (dx, *finish_backward(dp, prompts, ln_weight, ln_bias, dw_part, db_part, has_dyln))


implement(INSERT_PROMPTS_PACKED, insert_prompts_packed_fwd, insert_prompts_packed_bwd, supports)
