"""Prompt insertion fused with LayerNorm, in Triton: the triton backend of the op insert_prompts (declared in
fastprompt/ops/insert_prompts.py; the math: fastprompt/reference/insert_prompts.py).

Forward, one kernel: each program takes BLOCK_R rows of one sequence, reads each row once from x or from
the prompts (whichever the row comes from), writes it to y, and writes its LayerNorm to y_ln; it keeps
the row's mean and 1/std for the backward. One read of x, one write each of y and y_ln.

Backward, one kernel plus torch's sums of the per-program partials: each program walks tiles of rows,
rebuilds the rows of y from x and the prompts (one read, as the forward), forms
    dy_total = dy + rstd·(dŷ − mean(dŷ) − x̂·mean(dŷ·x̂)),  dŷ = dy_ln·w
and routes it: to dx at the row x came from (zero for the rows a replacement overwrote) and to the
prompt row it came from. The LayerNorm affine gradients Σ dy_ln·x̂ and Σ dy_ln, and for shared prompts
the sum over the N sequences, are written as per-program partials and summed by torch afterwards, so
the result does not depend on scheduling (no atomics).
"""

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastprompt.ops.insert_prompts import INSERT_PROMPTS, out_len
from fastprompt.ops.outputs import empty

from ._common import dtype_reason, implement, ln_backward_rows, next_pow2, sm_count, store_rows_and_layer_norm

MAX_WIDTH = 16384  # one row is one block


# ---- block sizes -----------------------------------------------------------------------------------------------

class Config(NamedTuple):
    block_r: int  # rows of a tile
    block_d: int  # lanes of a row: next_pow2(D), the whole row
    num_warps: int
    programs_per_sm: int  # the backward's grid (it walks the tiles)


def config(d: int, backward: bool = False) -> Config:
    """First choices for Hopper (H100), not yet timed there; Ampere takes the same. A tile holds ~4096 elements
    (8 KB in bf16: at ViT-B/16's D = 768, 4 rows of 1024 lanes) on 4 warps. The backward holds about three tiles
    live (x̂, dy, dy_ln) plus the affine partial sums: at 4 warps and widths from 512 it needed all 255 registers
    and spilled (tools/triton_compile_check.py), so it spreads the tile over 8 warps there; it runs 4 programs
    per SM, each walking tiles, so that its per-program partial sums stay few. The packed kernels
    (kernels/insert_prompts_packed.py) take the same configs."""
    block_d = next_pow2(d)
    block_r = max(1, min(16, 4096 // block_d))
    return Config(block_r, block_d, 4 if block_d < (512 if backward else 2048) else 8, 4)


@triton.jit
def _load_rows(x_ptr, p_ptr, starts_ptr, n, rows, cols, start, L, M, D,
               sxn, sxl, sxd, spn, spm, spd,
               HAS_STARTS: tl.constexpr, INSERT: tl.constexpr, SHARED: tl.constexpr):
    """Rows `rows` of y for sequence n, as fp32, with where each row came from."""
    if HAS_STARTS:
        start = tl.load(starts_ptr + n)
    row_ok = rows < (L + M if INSERT else L)
    is_prompt = (rows >= start) & (rows < start + M)
    # the row of x that lands on y's row: the same row (replace), or shifted past the prompts (insert)
    if INSERT:
        src = tl.where(rows < start, rows, rows - M)
    else:
        src = rows
    col_ok = cols < D
    n64 = n.to(tl.int64)
    x_mask = (row_ok & ~is_prompt)[:, None] & col_ok[None, :]
    xv = tl.load(x_ptr + n64 * sxn + src.to(tl.int64)[:, None] * sxl + cols[None, :] * sxd, mask=x_mask, other=0.0)
    p_row = rows - start
    p_base = p_ptr if SHARED else p_ptr + n64 * spn
    p_mask = (row_ok & is_prompt)[:, None] & col_ok[None, :]
    pv = tl.load(p_base + p_row.to(tl.int64)[:, None] * spm + cols[None, :] * spd, mask=p_mask, other=0.0)
    y = tl.where(is_prompt[:, None], pv, xv).to(tl.float32)
    return y, row_ok, is_prompt, src, p_row


@triton.jit
def _insert_fwd_kernel(x_ptr, p_ptr, starts_ptr, w_ptr, b_ptr, y_ptr, yln_ptr, mean_ptr, rstd_ptr,
                       start, L, M, D, L_out, eps,
                       sxn, sxl, sxd, spn, spm, spd,
                       HAS_STARTS: tl.constexpr, INSERT: tl.constexpr, SHARED: tl.constexpr,
                       HAS_LN: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0)  # the sequence on the grid's first axis: CUDA caps the others at 65535
    rb = tl.program_id(1)
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    y, row_ok, _, _, _ = _load_rows(x_ptr, p_ptr, starts_ptr, n, rows, cols, start, L, M, D,
                                    sxn, sxl, sxd, spn, spm, spd, HAS_STARTS, INSERT, SHARED)
    mask = row_ok[:, None] & (cols < D)[None, :]
    store_rows_and_layer_norm(y, mask, row_ok, n.to(tl.int64) * L_out + rows, cols, D, eps, y_ptr, yln_ptr,
                              mean_ptr, rstd_ptr, w_ptr, b_ptr, HAS_LN, HAS_W, HAS_B)


@triton.jit
def _insert_bwd_kernel(x_ptr, p_ptr, starts_ptr, w_ptr, mean_ptr, rstd_ptr, dy_ptr, dyln_ptr,
                       dx_ptr, dp_ptr, dw_part_ptr, db_part_ptr,
                       start, N, L, M, D, L_out,
                       sxn, sxl, sxd, spn, spm, spd, sdyn, sdyl, sdyd, sdln, sdll, sdld,
                       HAS_STARTS: tl.constexpr, INSERT: tl.constexpr, SHARED: tl.constexpr,
                       HAS_DY: tl.constexpr, HAS_DYLN: tl.constexpr, HAS_W: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    n_progs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        w = tl.full((BLOCK_D,), 1.0, tl.float32)
    dw_acc = tl.zeros((BLOCK_D,), tl.float32)
    db_acc = tl.zeros((BLOCK_D,), tl.float32)
    tiles_per_seq = tl.cdiv(L_out, BLOCK_R)
    for tile in range(pid, N * tiles_per_seq, n_progs):
        n = tile // tiles_per_seq
        rows = (tile % tiles_per_seq) * BLOCK_R + tl.arange(0, BLOCK_R)
        n64 = n.to(tl.int64)
        dy_total = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
        row_ok = rows < L_out
        mask = row_ok[:, None] & col_ok[None, :]
        if HAS_DY:
            dy_total += tl.load(dy_ptr + n64 * sdyn + rows.to(tl.int64)[:, None] * sdyl + cols[None, :] * sdyd,
                                mask=mask, other=0.0).to(tl.float32)
        if HAS_DYLN:
            y, _, _, _, _ = _load_rows(x_ptr, p_ptr, starts_ptr, n, rows, cols, start, L, M, D,
                                       sxn, sxl, sxd, spn, spm, spd, HAS_STARTS, INSERT, SHARED)
            mean = tl.load(mean_ptr + n64 * L_out + rows, mask=row_ok, other=0.0)
            rstd = tl.load(rstd_ptr + n64 * L_out + rows, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (y - mean[:, None]) * rstd[:, None], 0.0)
            dyln = tl.load(dyln_ptr + n64 * sdln + rows.to(tl.int64)[:, None] * sdll + cols[None, :] * sdld,
                           mask=mask, other=0.0).to(tl.float32)
            dw_acc += tl.sum(dyln * xhat, axis=0)
            db_acc += tl.sum(dyln, axis=0)
            dy_total += ln_backward_rows(xhat, dyln * w[None, :], rstd, mask, D)
        if HAS_STARTS:
            s = tl.load(starts_ptr + n)
        else:
            s = start
        is_prompt = (rows >= s) & (rows < s + M)
        # x's rows: every row of x lands on exactly one row of y; a replaced row gets zero
        if INSERT:
            src = tl.where(rows < s, rows, rows - M)
            x_keep = row_ok & ~is_prompt
            dx_val = dy_total
        else:
            src = rows
            x_keep = row_ok
            dx_val = tl.where(is_prompt[:, None], 0.0, dy_total)
        tl.store(dx_ptr + (n64 * L + src.to(tl.int64))[:, None] * D + cols[None, :],
                 dx_val.to(dx_ptr.dtype.element_ty), mask=x_keep[:, None] & col_ok[None, :])
        # the prompt rows: per sequence, into (N, M, D) (summed over N afterwards when shared)
        p_rows = (n64 * M + (rows - s).to(tl.int64))
        tl.store(dp_ptr + p_rows[:, None] * D + cols[None, :], dy_total.to(dp_ptr.dtype.element_ty),
                 mask=(row_ok & is_prompt)[:, None] & col_ok[None, :])
    if HAS_DYLN:
        tl.store(dw_part_ptr + pid * D + cols, dw_acc, mask=col_ok)
        tl.store(db_part_ptr + pid * D + cols, db_acc, mask=col_ok)


def _starts_arg(starts: Optional[Tensor], x: Tensor) -> Tensor:
    return starts if starts is not None else x  # a placeholder pointer when HAS_STARTS is False


def prompt_strides(prompts: Tensor) -> tuple[int, int, int]:
    """The prompts' strides per sequence, row and column: shared prompts (m, D) repeat for every sequence."""
    return (0, *prompts.stride()) if prompts.dim() == 2 else prompts.stride()


def finish_backward(dp: Tensor, prompts: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                    dw_part: Tensor, db_part: Tensor, has_dyln: bool) -> tuple[Tensor, list[Tensor]]:
    """dprompts and the LayerNorm's gradients from what a backward kernel wrote: shared prompts' gradient is
    one fp32 block per sequence, summed here; the LayerNorm's, one fp32 row per program (zero without dy_ln)."""
    dprompts = dp.sum(0).to(prompts.dtype) if prompts.dim() == 2 else dp
    ln_grads = []
    for param, part in ((ln_weight, dw_part), (ln_bias, db_part)):
        if param is not None:
            ln_grads.append(part.sum(0).to(param.dtype) if has_dyln else torch.zeros_like(param))
    return dprompts, ln_grads


def insert_prompts_fwd(x: Tensor, prompts: Tensor, start: int, starts: Optional[Tensor], ln_weight: Optional[Tensor],
                       ln_bias: Optional[Tensor], eps: float, mode: str) -> tuple[Tensor, Tensor, list[Tensor]]:
    n, length, d = x.shape
    m = prompts.shape[-2]
    l_out = out_len(length, m, mode)
    has_ln = ln_weight is not None or ln_bias is not None
    y = empty(n, l_out, d, like=x)
    if has_ln:
        y_ln = empty(n, l_out, d, like=x)
        mean, rstd = (empty(n, l_out, like=x, dtype=torch.float32) for _ in range(2))
    else:  # the kernel writes none of them; y stands in as their (unused) pointer
        y_ln, mean, rstd = x.new_empty(0), y, y
    shared = prompts.dim() == 2
    cfg = config(d)
    _insert_fwd_kernel[(n, triton.cdiv(l_out, cfg.block_r))](
        x, prompts, _starts_arg(starts, x), ln_weight if ln_weight is not None else x,
        ln_bias if ln_bias is not None else x, y, y_ln if has_ln else y, mean, rstd,
        start, length, m, d, l_out, eps, *x.stride(), *prompt_strides(prompts),
        HAS_STARTS=starts is not None, INSERT=mode == "insert", SHARED=shared, HAS_LN=has_ln,
        HAS_W=ln_weight is not None, HAS_B=ln_bias is not None, BLOCK_R=cfg.block_r, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps)
    return y, y_ln, ([mean, rstd] if has_ln else [])


def insert_prompts_bwd(grad_y: Optional[Tensor], grad_y_ln: Optional[Tensor], x: Tensor, prompts: Tensor, start: int,
                       starts: Optional[Tensor], ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                       saved: list[Tensor], eps: float, mode: str) -> tuple[Tensor, Tensor, list[Tensor]]:
    n, length, d = x.shape
    m = prompts.shape[-2]
    l_out = out_len(length, m, mode)
    has_ln = ln_weight is not None or ln_bias is not None
    has_dyln = grad_y_ln is not None and has_ln
    shared = prompts.dim() == 2
    cfg = config(d, backward=True)
    n_tiles = n * triton.cdiv(l_out, cfg.block_r)
    grid = max(1, min(n_tiles, cfg.programs_per_sm * sm_count(x.device)))
    dx = empty(n, length, d, like=x)
    # shared prompts: one fp32 row block per sequence, summed by finish_backward; per-sample: written in place
    dp = empty(n, m, d, like=x, dtype=torch.float32) if shared else empty(n, m, d, like=prompts)
    dw_part = empty(grid, d, like=x, dtype=torch.float32) if has_dyln else dx  # dx: an unused pointer
    db_part = empty(grid, d, like=x, dtype=torch.float32) if has_dyln else dx
    mean, rstd = saved if has_ln else (x, x)
    sdy = grad_y.stride() if grad_y is not None else (0, 0, 0)
    sdln = grad_y_ln.stride() if has_dyln else (0, 0, 0)
    _insert_bwd_kernel[(grid,)](
        x, prompts, _starts_arg(starts, x), ln_weight if ln_weight is not None else x, mean, rstd,
        grad_y if grad_y is not None else x, grad_y_ln if has_dyln else x, dx, dp, dw_part, db_part,
        start, n, length, m, d, l_out, *x.stride(), *prompt_strides(prompts), *sdy, *sdln,
        HAS_STARTS=starts is not None, INSERT=mode == "insert", SHARED=shared, HAS_DY=grad_y is not None,
        HAS_DYLN=has_dyln, HAS_W=ln_weight is not None, BLOCK_R=cfg.block_r, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps)
    return (dx, *finish_backward(dp, prompts, ln_weight, ln_bias, dw_part, db_part, has_dyln))


def supports(problem: dict) -> Optional[str]:
    reason = dtype_reason(problem)
    if reason is None and problem["d"] > MAX_WIDTH:
        reason = f"the triton insertion kernel takes widths up to {MAX_WIDTH}, got {problem['d']}"
    return reason


implement(INSERT_PROMPTS, insert_prompts_fwd, insert_prompts_bwd, supports)
