"""DAFE layer fusion in Triton: the triton backend of the op dafe (declared in fastprompt/ops/dafe.py; the math:
fastprompt/reference/dafe.py).

Rows r = n·M + m of prev (N, M, D); the task row of r is m (shared) or r (per sample).

Forward
  channel gate, one kernel: a GEMM tile z[r-block, c-block] = LN(prev) W_gᵀ + task U_gᵀ whose prologue
    computes each row's LayerNorm statistics and normalises the prev tiles as they are loaded, and whose
    epilogue adds b_g and blends: out = σ(z)·prev + σ(−z)·task. z (fp32) and the statistics are kept for
    the backward.
  token and scalar gates, one row-wise kernel: z_r = Σ_d LN(prev)_rd w_d + task_rd u_d + b (token) or α.

Backward (dz = dout·(prev − task)·σ(z)σ(−z), summed over D for a token or scalar gate)
  channel: launch 1 runs two GEMM families side by side, each recomputing dz tile by tile from dout,
    prev, task and z: [dh | dtask_gate] = dz [W_g | U_g] (row tiles; the epilogue writes
    dtask = dout·σ(−z) + dz U_g and keeps dh), and [dW_g | dU_g] = dzᵀ [h | task], db = Σ dz (weight
    tiles, looping over the rows). Launch 2 is row-wise: dprev = dout·σ(z) + LN_bwd(dh), with per-program
    partials of the LayerNorm affine gradients.
  token and scalar: one row-wise kernel.
  Every sum over rows (affine and gate-bias gradients of the row-wise kernels, a shared task's sum over
  N) is written as per-program partials and summed by torch afterwards: deterministic, no atomics.
"""

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastprompt.ops.dafe import DAFE
from fastprompt.ops.outputs import empty

from ._common import dot_precision, dtype_reason, implement, ln_backward_rows, next_pow2

MAX_WIDTH = 8192


# ---- block sizes -----------------------------------------------------------------------------------------------
# First choices for Hopper (H100), from the compiler's figures (tools/triton_compile_check.py), not yet timed
# there; Ampere takes the same.

class GemmConfig(NamedTuple):  # the channel gate's GEMM kernels
    block_r: int  # rows of prev per tile
    block_n: int  # output columns per tile (and the weight-gradient tiles' rows)
    block_k: int  # K step
    num_stages: int
    num_warps: int


class RowwiseConfig(NamedTuple):  # the token and scalar gates, and the channel gate's LayerNorm backward
    fwd_block_r: int  # rows per program of the forward, which loops over D
    block_k: int  # its columns per step
    bwd_block_r: int  # rows per program of the backward, which holds whole rows
    block_d: int  # lanes of a whole row
    bwd_warps: int


def gemm_config(r: int, dtype: torch.dtype) -> GemmConfig:
    """16-bit: BLOCK_R 16 (32 from 1024 rows on, the text side), 64 output columns, 64-deep K steps, 3 stages:
    106 / 178 registers (forward / backward kernel) on sm_90 at width 768, no spills (tensor-core dots). fp32
    takes twice the shared memory per stage and, with IEEE dots (no tensor cores: one FMA per product, the
    operands broadcast in registers), far more registers; at width 768, 4 warps:
      the 16-bit tiles: the backward asks for 230 KB of shared memory (sm_90 has 227 KB)
      BLOCK_K 32, 2 stages: 255 + 312 B of spills / ptxas gives up at 32 + 5.6 KB of spills
      BLOCK_N 32, BLOCK_K 16, 3 stages: 128 / 147, no spills (255 in the forward at BLOCK_R 32)
    hence the last with BLOCK_R 16 for fp32 at any R."""
    if dtype == torch.float32:
        return GemmConfig(16, 32, 16, 3, 4)
    return GemmConfig(32 if r >= 1024 else 16, 64, 64, 3, 4)


def rowwise_config(d: int) -> RowwiseConfig:
    """The forward: 16 rows, steps of up to 128 columns. The backward: whole rows, up to 16 of them and 8192
    elements a program; it holds several (BLOCK_R, BLOCK_D) tiles live, and at 4 warps and widths from 512 it
    needed all 255 registers and spilled, so 8 warps share the tile there."""
    block_d = next_pow2(d)
    return RowwiseConfig(16, min(128, block_d), max(1, min(16, 8192 // block_d)), block_d,
                         8 if block_d >= 512 else 4)


@triton.jit
def _row_offsets(rows, M, s_n, s_m):
    """Memory offsets of flattened rows r = n·M + m for strides (s_n, s_m)."""
    r64 = rows.to(tl.int64)
    return (r64 // M) * s_n + (r64 % M) * s_m


@triton.jit
def _row_stats(prev_ptr, p_rows, row_ok, D, spd, eps, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """LayerNorm mean and 1/std of BLOCK_R rows, in fp32, two passes over D."""
    acc = tl.zeros((BLOCK_R,), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        m = row_ok[:, None] & (cols < D)[None, :]
        acc += tl.sum(tl.load(prev_ptr + p_rows[:, None] + cols[None, :] * spd, mask=m, other=0.0).to(tl.float32), 1)
    mean = acc / D
    acc = tl.zeros((BLOCK_R,), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        m = row_ok[:, None] & (cols < D)[None, :]
        x = tl.load(prev_ptr + p_rows[:, None] + cols[None, :] * spd, mask=m, other=0.0).to(tl.float32)
        diff = tl.where(m, x - mean[:, None], 0.0)
        acc += tl.sum(diff * diff, 1)
    return mean, 1.0 / tl.sqrt(acc / D + eps)


@triton.jit
def _normalised(prev_ptr, p_rows, cols, m, mean, rstd, lnw_ptr, lnb_ptr, D, spd):
    """h = LN(prev) on a [rows, cols] tile, fp32 (zero outside the mask)."""
    x = tl.load(prev_ptr + p_rows[:, None] + cols[None, :] * spd, mask=m, other=0.0).to(tl.float32)
    w = tl.load(lnw_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    b = tl.load(lnb_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    return tl.where(m, (x - mean[:, None]) * rstd[:, None] * w[None, :] + b[None, :], 0.0)


@triton.jit
def _dz_tile(dout_ptr, prev_ptr, task_ptr, z_ptr, o_rows, p_rows, t_rows, rows, cols, m, D, sod, spd, std):
    """dz = dout·(prev − task)·σ(z)σ(−z) on a [rows, cols] tile of the channel gate, fp32."""
    dout = tl.load(dout_ptr + o_rows[:, None] + cols[None, :] * sod, mask=m, other=0.0).to(tl.float32)
    x = tl.load(prev_ptr + p_rows[:, None] + cols[None, :] * spd, mask=m, other=0.0).to(tl.float32)
    t = tl.load(task_ptr + t_rows[:, None] + cols[None, :] * std, mask=m, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], mask=m, other=0.0)
    return tl.where(m, dout * (x - t) * tl.sigmoid(z) * tl.sigmoid(-z), 0.0)


# ---- forward ------------------------------------------------------------------------------------

@triton.jit
def _dafe_fwd_channel_kernel(prev_ptr, task_ptr, lnw_ptr, lnb_ptr, wg_ptr, bg_ptr, ug_ptr,
                             out_ptr, z_ptr, mean_ptr, rstd_ptr,
                             R, M, D, eps, spn, spm, spd, stn, stm, std,
                             PREC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    p_rows = _row_offsets(rows, M, spn, spm)
    t_rows = _row_offsets(rows, M, stn, stm)
    mean, rstd = _row_stats(prev_ptr, p_rows, row_ok, D, spd, eps, BLOCK_R, BLOCK_K)
    ocols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ocol_ok = ocols < D
    dt = prev_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_R, BLOCK_N), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kc = k0 + tl.arange(0, BLOCK_K)
        m = row_ok[:, None] & (kc < D)[None, :]
        h = _normalised(prev_ptr, p_rows, kc, m, mean, rstd, lnw_ptr, lnb_ptr, D, spd)
        t = tl.load(task_ptr + t_rows[:, None] + kc[None, :] * std, mask=m, other=0.0)
        wm = (kc < D)[:, None] & ocol_ok[None, :]
        wg_t = tl.load(wg_ptr + ocols[None, :] * D + kc[:, None], mask=wm, other=0.0)  # W_gᵀ tile (K, N)
        ug_t = tl.load(ug_ptr + ocols[None, :] * D + kc[:, None], mask=wm, other=0.0)
        acc = tl.dot(h.to(dt), wg_t, acc, input_precision=PREC)
        acc = tl.dot(t, ug_t, acc, input_precision=PREC)
    z = acc + tl.load(bg_ptr + ocols, mask=ocol_ok, other=0.0).to(tl.float32)[None, :]
    m = row_ok[:, None] & ocol_ok[None, :]
    x = tl.load(prev_ptr + p_rows[:, None] + ocols[None, :] * spd, mask=m, other=0.0).to(tl.float32)
    t = tl.load(task_ptr + t_rows[:, None] + ocols[None, :] * std, mask=m, other=0.0).to(tl.float32)
    out = tl.sigmoid(z) * x + tl.sigmoid(-z) * t  # σ(−z), not 1 − σ(z): no cancellation
    offs = rows.to(tl.int64)[:, None] * D + ocols[None, :]
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=m)
    tl.store(z_ptr + offs, z, mask=m)
    if pid_n == 0:
        tl.store(mean_ptr + rows, mean, mask=row_ok)
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _dafe_fwd_rowwise_kernel(prev_ptr, task_ptr, lnw_ptr, lnb_ptr, w_ptr, b_ptr, u_ptr, alpha_ptr,
                             out_ptr, z_ptr, mean_ptr, rstd_ptr,
                             R, M, D, eps, spn, spm, spd, stn, stm, std,
                             TOKEN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    p_rows = _row_offsets(rows, M, spn, spm)
    t_rows = _row_offsets(rows, M, stn, stm)
    if TOKEN:
        # z_r = Σ_d LN(prev)_rd·w_d + task_rd·u_d + b
        mean, rstd = _row_stats(prev_ptr, p_rows, row_ok, D, spd, eps, BLOCK_R, BLOCK_K)
        z = tl.zeros((BLOCK_R,), tl.float32)
        for k0 in range(0, D, BLOCK_K):
            kc = k0 + tl.arange(0, BLOCK_K)
            m = row_ok[:, None] & (kc < D)[None, :]
            h = _normalised(prev_ptr, p_rows, kc, m, mean, rstd, lnw_ptr, lnb_ptr, D, spd)
            t = tl.load(task_ptr + t_rows[:, None] + kc[None, :] * std, mask=m, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + kc, mask=kc < D, other=0.0).to(tl.float32)
            u = tl.load(u_ptr + kc, mask=kc < D, other=0.0).to(tl.float32)
            z += tl.sum(h * w[None, :] + t * u[None, :], 1)
        z += tl.load(b_ptr).to(tl.float32)
        tl.store(z_ptr + rows, z, mask=row_ok)
        tl.store(mean_ptr + rows, mean, mask=row_ok)
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)
    else:
        z = tl.zeros((BLOCK_R,), tl.float32) + tl.load(alpha_ptr).to(tl.float32)
    g, g_bar = tl.sigmoid(z), tl.sigmoid(-z)
    for k0 in range(0, D, BLOCK_K):
        kc = k0 + tl.arange(0, BLOCK_K)
        m = row_ok[:, None] & (kc < D)[None, :]
        x = tl.load(prev_ptr + p_rows[:, None] + kc[None, :] * spd, mask=m, other=0.0).to(tl.float32)
        t = tl.load(task_ptr + t_rows[:, None] + kc[None, :] * std, mask=m, other=0.0).to(tl.float32)
        out = g[:, None] * x + g_bar[:, None] * t
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + kc[None, :], out.to(out_ptr.dtype.element_ty), mask=m)


# ---- backward -----------------------------------------------------------------------------------

@triton.jit
def _dafe_bwd_channel_gemm_kernel(dout_ptr, prev_ptr, task_ptr, z_ptr, mean_ptr, rstd_ptr, lnw_ptr, lnb_ptr,
                                  wg_ptr, ug_ptr, dh_ptr, dtask_ptr, dwg_ptr, dug_ptr, dbg_ptr,
                                  R, M, D, n_row_tiles, n_col_tiles,
                                  spn, spm, spd, stn, stm, std, son, som, sod,
                                  PREC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                                  BLOCK_K: tl.constexpr):
    # The two GEMMs side by side in one launch: the first n_row_tiles·n_col_tiles programs compute input
    # gradients, the rest weight gradients. Each branch is its own function: Triton requires a variable
    # assigned in both branches of an `if` to have one type, and the two tilings differ in shape.
    pid = tl.program_id(0)
    if pid < n_row_tiles * n_col_tiles:
        _dafe_bwd_input_grads(pid, dout_ptr, prev_ptr, task_ptr, z_ptr, wg_ptr, ug_ptr, dh_ptr, dtask_ptr,
                              R, M, D, n_col_tiles, spn, spm, spd, stn, stm, std, son, som, sod,
                              PREC, BLOCK_R, BLOCK_N, BLOCK_K)
    else:
        _dafe_bwd_weight_grads(pid - n_row_tiles * n_col_tiles, dout_ptr, prev_ptr, task_ptr, z_ptr, mean_ptr,
                               rstd_ptr, lnw_ptr, lnb_ptr, dwg_ptr, dug_ptr, dbg_ptr, R, M, D, n_col_tiles,
                               spn, spm, spd, stn, stm, std, son, som, sod, PREC, BLOCK_N, BLOCK_K)


@triton.jit
def _dafe_bwd_input_grads(pid, dout_ptr, prev_ptr, task_ptr, z_ptr, wg_ptr, ug_ptr, dh_ptr, dtask_ptr,
                          R, M, D, n_col_tiles, spn, spm, spd, stn, stm, std, son, som, sod,
                          PREC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    # [dh | dtask_gate][r-block, c-block] = Σ_k dz[r, k] [W_g | U_g][k, c]
    dt = prev_ptr.dtype.element_ty
    rows = (pid // n_col_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
    ocols = (pid % n_col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < R
    ocol_ok = ocols < D
    p_rows = _row_offsets(rows, M, spn, spm)
    t_rows = _row_offsets(rows, M, stn, stm)
    o_rows = _row_offsets(rows, M, son, som)
    acc_h = tl.zeros((BLOCK_R, BLOCK_N), tl.float32)
    acc_t = tl.zeros((BLOCK_R, BLOCK_N), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kc = k0 + tl.arange(0, BLOCK_K)
        m = row_ok[:, None] & (kc < D)[None, :]
        dz = _dz_tile(dout_ptr, prev_ptr, task_ptr, z_ptr, o_rows, p_rows, t_rows, rows, kc, m, D, sod, spd,
                      std).to(dt)
        wm = (kc < D)[:, None] & ocol_ok[None, :]
        acc_h = tl.dot(dz, tl.load(wg_ptr + kc[:, None] * D + ocols[None, :], mask=wm, other=0.0), acc_h,
                       input_precision=PREC)
        acc_t = tl.dot(dz, tl.load(ug_ptr + kc[:, None] * D + ocols[None, :], mask=wm, other=0.0), acc_t,
                       input_precision=PREC)
    m = row_ok[:, None] & ocol_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * D + ocols[None, :]
    tl.store(dh_ptr + offs, acc_h, mask=m)
    dout = tl.load(dout_ptr + o_rows[:, None] + ocols[None, :] * sod, mask=m, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs, mask=m, other=0.0)
    tl.store(dtask_ptr + offs, (dout * tl.sigmoid(-z) + acc_t).to(dtask_ptr.dtype.element_ty), mask=m)


@triton.jit
def _dafe_bwd_weight_grads(q, dout_ptr, prev_ptr, task_ptr, z_ptr, mean_ptr, rstd_ptr, lnw_ptr, lnb_ptr,
                           dwg_ptr, dug_ptr, dbg_ptr, R, M, D, n_col_tiles,
                           spn, spm, spd, stn, stm, std, son, som, sod,
                           PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # [dW_g | dU_g][k-block, c-block] = Σ_r dz[r, k]ᵀ [h | task][r, c] ; db_g = Σ_r dz[r, k]
    dt = prev_ptr.dtype.element_ty
    kc = (q // n_col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    ocols = (q % n_col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc_w = tl.zeros((BLOCK_N, BLOCK_N), tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_N), tl.float32)
    acc_b = tl.zeros((BLOCK_N,), tl.float32)
    for r0 in range(0, R, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        row_ok = rows < R
        p_rows = _row_offsets(rows, M, spn, spm)
        t_rows = _row_offsets(rows, M, stn, stm)
        o_rows = _row_offsets(rows, M, son, som)
        mk = row_ok[:, None] & (kc < D)[None, :]
        dz = _dz_tile(dout_ptr, prev_ptr, task_ptr, z_ptr, o_rows, p_rows, t_rows, rows, kc, mk, D, sod, spd,
                      std)
        acc_b += tl.sum(dz, 0)
        mc = row_ok[:, None] & (ocols < D)[None, :]
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        h = _normalised(prev_ptr, p_rows, ocols, mc, mean, rstd, lnw_ptr, lnb_ptr, D, spd)
        t = tl.load(task_ptr + t_rows[:, None] + ocols[None, :] * std, mask=mc, other=0.0)
        dz_t = tl.trans(dz.to(dt))
        acc_w = tl.dot(dz_t, h.to(dt), acc_w, input_precision=PREC)
        acc_u = tl.dot(dz_t, t, acc_u, input_precision=PREC)
    m = (kc < D)[:, None] & (ocols < D)[None, :]
    offs = kc[:, None] * D + ocols[None, :]
    tl.store(dwg_ptr + offs, acc_w.to(dwg_ptr.dtype.element_ty), mask=m)
    tl.store(dug_ptr + offs, acc_u.to(dug_ptr.dtype.element_ty), mask=m)
    if q % n_col_tiles == 0:
        tl.store(dbg_ptr + kc, acc_b.to(dbg_ptr.dtype.element_ty), mask=kc < D)


@triton.jit
def _dafe_bwd_channel_ln_kernel(dout_ptr, prev_ptr, z_ptr, mean_ptr, rstd_ptr, lnw_ptr, dh_ptr, dprev_ptr,
                                dlnw_part_ptr, dlnb_part_ptr, R, M, D, spn, spm, spd, son, som, sod,
                                BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """dprev = dout·σ(z) + LN_bwd(dh) over full rows; partials of dγ = Σ dh·x̂ and dβ = Σ dh."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < R
    col_ok = cols < D
    m = row_ok[:, None] & col_ok[None, :]
    p_rows = _row_offsets(rows, M, spn, spm)
    o_rows = _row_offsets(rows, M, son, som)
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
    x = tl.load(prev_ptr + p_rows[:, None] + cols[None, :] * spd, mask=m, other=0.0).to(tl.float32)
    xhat = tl.where(m, (x - mean[:, None]) * rstd[:, None], 0.0)
    dh = tl.load(dh_ptr + offs, mask=m, other=0.0)
    w = tl.load(lnw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dx = ln_backward_rows(xhat, dh * w[None, :], rstd, m, D)
    dout = tl.load(dout_ptr + o_rows[:, None] + cols[None, :] * sod, mask=m, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs, mask=m, other=0.0)
    tl.store(dprev_ptr + offs, (dout * tl.sigmoid(z) + dx).to(dprev_ptr.dtype.element_ty), mask=m)
    tl.store(dlnw_part_ptr + pid * D + cols, tl.sum(dh * xhat, 0), mask=col_ok)
    tl.store(dlnb_part_ptr + pid * D + cols, tl.sum(dh, 0), mask=col_ok)


@triton.jit
def _dafe_bwd_rowwise_kernel(dout_ptr, prev_ptr, task_ptr, z_ptr, mean_ptr, rstd_ptr, lnw_ptr, lnb_ptr,
                             w_ptr, u_ptr, alpha_ptr, dprev_ptr, dtask_ptr, part_ptr,
                             R, M, D, spn, spm, spd, stn, stm, std, son, som, sod,
                             TOKEN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Token gate: dz_r = Σ_d dout·(prev − task) · σ(z_r)σ(−z_r); dprev = dout·σ(z) + LN_bwd(dz_r·w);
    dtask = dout·σ(−z) + dz_r·u. Partials per program, one row each of part (5, P, D):
    [dw = Σ dz_r·h, du = Σ dz_r·task, dγ = Σ dz_r·w·x̂, dβ = Σ dz_r·w, db = Σ dz_r (column 0)].
    Scalar gate: dprev = dout·σ(α), dtask = dout·σ(−α), partial dα = Σ dz_r in part[4, pid, 0]."""
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < R
    col_ok = cols < D
    m = row_ok[:, None] & col_ok[None, :]
    p_rows = _row_offsets(rows, M, spn, spm)
    t_rows = _row_offsets(rows, M, stn, stm)
    o_rows = _row_offsets(rows, M, son, som)
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    dout = tl.load(dout_ptr + o_rows[:, None] + cols[None, :] * sod, mask=m, other=0.0).to(tl.float32)
    x = tl.load(prev_ptr + p_rows[:, None] + cols[None, :] * spd, mask=m, other=0.0).to(tl.float32)
    t = tl.load(task_ptr + t_rows[:, None] + cols[None, :] * std, mask=m, other=0.0).to(tl.float32)
    if TOKEN:
        z = tl.load(z_ptr + rows, mask=row_ok, other=0.0)
    else:
        z = tl.zeros((BLOCK_R,), tl.float32) + tl.load(alpha_ptr).to(tl.float32)
    g, g_bar = tl.sigmoid(z), tl.sigmoid(-z)
    dz = tl.where(row_ok, tl.sum(dout * (x - t), 1) * g * g_bar, 0.0)
    dprev = dout * g[:, None]
    dtask = dout * g_bar[:, None]
    if TOKEN:
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        xhat = tl.where(m, (x - mean[:, None]) * rstd[:, None], 0.0)
        lw = tl.load(lnw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        lb = tl.load(lnb_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        dh = dz[:, None] * w[None, :]  # d(z)/d(h) = w
        dprev += ln_backward_rows(xhat, dh * lw[None, :], rstd, m, D)
        dtask += dz[:, None] * u[None, :]
        h = tl.where(m, xhat * lw[None, :] + lb[None, :], 0.0)
        tl.store(part_ptr + (0 * P + pid) * D + cols, tl.sum(dz[:, None] * h, 0), mask=col_ok)
        tl.store(part_ptr + (1 * P + pid) * D + cols, tl.sum(dz[:, None] * t, 0), mask=col_ok)
        tl.store(part_ptr + (2 * P + pid) * D + cols, tl.sum(dh * xhat, 0), mask=col_ok)
        tl.store(part_ptr + (3 * P + pid) * D + cols, tl.sum(dh, 0), mask=col_ok)
    tl.store(part_ptr + (4 * P + pid) * D + cols, tl.where(cols == 0, tl.sum(dz, 0), 0.0), mask=col_ok)
    tl.store(dprev_ptr + offs, dprev.to(dprev_ptr.dtype.element_ty), mask=m)
    tl.store(dtask_ptr + offs, dtask.to(dtask_ptr.dtype.element_ty), mask=m)


# ---- launchers and raw ops ----------------------------------------------------------------------

def _rows_strides(t: Tensor, n: int) -> tuple[int, int, int]:
    """(stride over N, stride over M, stride over D) of a (N, M, D) or shared (M, D) tensor."""
    return (0, *t.stride()) if t.dim() == 2 else tuple(t.stride())


def dafe_fwd(prev: Tensor, task: Tensor, params: list[Tensor], gate: str, eps: float) -> tuple[Tensor, list[Tensor]]:
    n, m, d = prev.shape
    r = n * m
    out = empty(n, m, d, like=prev)
    strides = (*prev.stride(), *_rows_strides(task, n))
    if gate == "scalar":
        (alpha,) = params
        rows = rowwise_config(d)
        _dafe_fwd_rowwise_kernel[(triton.cdiv(r, rows.fwd_block_r),)](
            prev, task, prev, prev, prev, prev, prev, alpha, out, out, out, out, r, m, d, eps, *strides,
            TOKEN=False, BLOCK_R=rows.fwd_block_r, BLOCK_K=rows.block_k)
        return out, []
    ln_w, ln_b, w_prev, b_prev, w_task = params
    k = w_prev.shape[0]
    z = empty(n, m, k, like=prev, dtype=torch.float32)
    mean, rstd = (empty(r, like=prev, dtype=torch.float32) for _ in range(2))
    if gate == "token":
        rows = rowwise_config(d)
        _dafe_fwd_rowwise_kernel[(triton.cdiv(r, rows.fwd_block_r),)](
            prev, task, ln_w, ln_b, w_prev, b_prev, w_task, prev, out, z, mean, rstd, r, m, d, eps, *strides,
            TOKEN=True, BLOCK_R=rows.fwd_block_r, BLOCK_K=rows.block_k)
    else:
        gemm = gemm_config(r, prev.dtype)
        _dafe_fwd_channel_kernel[(triton.cdiv(r, gemm.block_r), triton.cdiv(d, gemm.block_n))](
            prev, task, ln_w, ln_b, w_prev.contiguous(), b_prev, w_task.contiguous(), out, z, mean, rstd,
            r, m, d, eps, *strides, PREC=dot_precision(prev.dtype), BLOCK_R=gemm.block_r, BLOCK_N=gemm.block_n,
            BLOCK_K=gemm.block_k, num_warps=gemm.num_warps, num_stages=gemm.num_stages)
    return out, [z, mean, rstd]


def dafe_bwd(grad_out: Tensor, prev: Tensor, task: Tensor, params: list[Tensor], saved: list[Tensor], gate: str,
             eps: float) -> tuple[Tensor, Tensor, list[Tensor]]:
    n, m, d = prev.shape
    r = n * m
    shared = task.dim() == 2
    dprev = empty(n, m, d, like=prev)
    # a shared task collects the gradient of every sequence: per-sequence rows in fp32, summed below
    dtask_rows = empty(n, m, d, like=prev, dtype=torch.float32) if shared else empty(n, m, d, like=task)
    strides = (*prev.stride(), *_rows_strides(task, n), *grad_out.stride())
    if gate == "channel":
        ln_w, ln_b, w_prev, b_prev, w_task = params
        z, mean, rstd = saved
        gemm = gemm_config(r, prev.dtype)
        dh = empty(n, m, d, like=prev, dtype=torch.float32)
        dw_prev, dw_task = empty(d, d, like=w_prev), empty(d, d, like=w_task)
        db_prev = empty(d, like=b_prev)
        row_tiles, col_tiles = triton.cdiv(r, gemm.block_r), triton.cdiv(d, gemm.block_n)
        _dafe_bwd_channel_gemm_kernel[(row_tiles * col_tiles + col_tiles * col_tiles,)](
            grad_out, prev, task, z, mean, rstd, ln_w, ln_b, w_prev.contiguous(), w_task.contiguous(), dh,
            dtask_rows, dw_prev, dw_task, db_prev, r, m, d, row_tiles, col_tiles, *strides,
            PREC=dot_precision(prev.dtype), BLOCK_R=gemm.block_r, BLOCK_N=gemm.block_n, BLOCK_K=gemm.block_k,
            num_warps=gemm.num_warps, num_stages=gemm.num_stages)
        rows = rowwise_config(d)
        programs = triton.cdiv(r, rows.bwd_block_r)
        parts = empty(2, programs, d, like=prev, dtype=torch.float32)
        _dafe_bwd_channel_ln_kernel[(programs,)](
            grad_out, prev, z, mean, rstd, ln_w, dh, dprev, parts[0], parts[1], r, m, d,
            *prev.stride(), *grad_out.stride(), BLOCK_R=rows.bwd_block_r, BLOCK_D=rows.block_d,
            num_warps=rows.bwd_warps)
        # one sum per gradient: views of one summed tensor would alias each other as op outputs
        grads = [parts[0].sum(0).to(ln_w.dtype), parts[1].sum(0).to(ln_b.dtype), dw_prev, db_prev, dw_task]
    else:
        token = gate == "token"
        rows = rowwise_config(d)
        programs = triton.cdiv(r, rows.bwd_block_r)
        parts = empty(5, programs, d, like=prev, dtype=torch.float32)
        if token:
            ln_w, ln_b, w_prev, b_prev, w_task = params
            z, mean, rstd = saved
            args = (z, mean, rstd, ln_w, ln_b, w_prev, w_task, prev)
        else:
            args = (prev, prev, prev, prev, prev, prev, prev, params[0])
        _dafe_bwd_rowwise_kernel[(programs,)](
            grad_out, prev, task, *args, dprev, dtask_rows, parts, r, m, d, *strides,
            TOKEN=token, BLOCK_R=rows.bwd_block_r, BLOCK_D=rows.block_d, num_warps=rows.bwd_warps)
        if token:
            grads = [parts[2].sum(0).to(ln_w.dtype), parts[3].sum(0).to(ln_b.dtype),
                     parts[0].sum(0, keepdim=True).to(w_prev.dtype), parts[4, :, :1].sum(0).to(b_prev.dtype),
                     parts[1].sum(0, keepdim=True).to(w_task.dtype)]
        else:
            grads = [parts[4, :, 0].sum().reshape(params[0].shape).to(params[0].dtype)]
    dtask = dtask_rows.sum(0).to(task.dtype) if shared else dtask_rows
    return dprev, dtask, grads


def supports(problem: dict) -> Optional[str]:
    reason = dtype_reason(problem)
    if reason is None and problem["d"] > MAX_WIDTH:
        reason = f"the triton DAFE kernels take widths up to {MAX_WIDTH}, got {problem['d']}"
    return reason


implement(DAFE, dafe_fwd, dafe_bwd, supports)
