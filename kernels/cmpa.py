"""Cross-modal prompt attention in Triton: the triton backend of the op cmpa (declared in fastprompt/ops/cmpa.py;
the math: fastprompt/reference/cmpa.py).

The compute is tiny (M ≤ 64 prompt rows) and the weights are large (≈ 11 M parameters at ViT-B/16
widths), so every GEMM stage is a "tiny-M" GEMM: a program owns a tile of output columns (or, for a
weight gradient, a tile of the weight) and loops over K; the M rows fit one block. Stages are separated by
LayerNorms, softmaxes and row reductions, each a grid-wide dependency; Triton has no grid barrier, so each
stage is one launch, and both sides (visual and text) run in the same launches: a program's id says which
side and which tile it works on. Small row-wise work (LayerNorm statistics, the attention of a head,
QuickGELU) is recomputed by every program that needs it, as the prologue of its GEMM, rather than given a
launch of its own.

Forward, 6 launches:
  F1 pool            V̄ = pool_B(V), T̄ = pool_C(T)  (mean / first / max with the argmax kept)
  F2 proj            p = Ō W_pᵀ + b_p                (Ō: the other side's pooled rows)
  F3 qkv             q = LN1(p) W_qᵀ + b_q ; [k | v] = LN1(X̄) W_{k,v}ᵀ + b_{k,v}   (LN1 in the prologue)
  F4 attention+out   x1 = X̄ + Σ_h softmax(q_h k_hᵀ/√d) v_h W_o[:, h]ᵀ + b_o    (attention in the prologue)
  F5 fc              h = LN2(x1) W_fcᵀ + b_fc                               (LN2 in the prologue)
  F6 c_proj          out = x1 + QuickGELU(h) W_cᵀ + b_c                      (QuickGELU in the prologue)
Backward, 8 launches:
  B1 dY = Σ_B dOut                        B5 attention backward, per head → dq, dk, dv
  B2 dh = (dY W_c)·g'(h) ; dW_c, db_c     B6 da = dq W_q, db = dk W_k + dv W_v ; dW_in, db_in
  B3 dc = dh W_fc ; dW_fc, db_fc          B7 LN1 backward (both uses) ; dŌ = dp W_p ; dW_p, db_p, dγ1, dβ1
  B4 dx1 = dY + LN2_bwd(dc) ; do = dx1 W_o ; dW_o, db_o, dγ2, dβ2
  B8 dV = pool_bwd(dx1 + LN1_bwd(db) + dŌ of the other side), written at the input's shape
Every sum is done inside one program (over the M rows, or over K), so results do not depend on
scheduling: deterministic without atomics.

The forward keeps its intermediates (all M-row sized) in one fp32 workspace per side, which is what it
saves for the backward; intermediates are fp32 whatever the input dtype, dot operands take the weights'
dtype. fp32 dots are IEEE unless torch allows TF32.

Configs: output tiles of 32 columns (weight-gradient tiles 32 × 32), K steps of 64, 4 warps; pooling and
its backward in 128-column × 32-row tiles. With both sides in every launch a ViT-B/16 GEMM stage has
40 to 160 programs. First choices for Hopper (H100), not yet measured there; Ampere the same, not yet
measured.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastprompt.ops.cmpa import CMPA, CMPASideParams
from fastprompt.ops.cmpa_layout import forward_layout, offsets
from fastprompt.ops.outputs import empty

from ._common import dot_precision, dtype_reason, implement, next_pow2

MAX_PROMPTS = 64
MAX_WIDTH = 1024
FUSING_CODES = {"mean": 0, "first": 1, "max": 2}

BLOCK_N = 32  # output columns per GEMM program
BLOCK_W = 32  # weight-gradient tile (rows and columns)
BLOCK_K = 64  # K step
POOL_BLOCK_D = 128
POOL_BLOCK_B = 32


# ---- workspace layouts (fp32, row-major, one flat buffer per side) -----------------------------

def _fwd_layout(m: int, d: int, h: int, f: int) -> dict[str, tuple[int, int]]:
    """name -> (offset, size) in the forward workspace of one side (shared with the CUDA kernels)."""
    return forward_layout(m, d, h, f)


def _bwd_layout(m: int, d: int, d_other: int, f: int) -> dict[str, tuple[int, int]]:
    sizes = [("dy", m * d), ("dh", m * f), ("dc", m * d), ("dx1", m * d), ("do", m * d), ("dqkv", 3 * m * d),
             ("da", m * d), ("db", m * d), ("dxbar_ln", m * d), ("dother", m * d_other)]
    return offsets(sizes)


# ---- helpers --------------------------------------------------------------------------------------

@triton.jit
def _tile(ptr, rows, cols, n_rows, n_cols, ld):
    """fp32 tile of a row-major (n_rows, n_cols) buffer with leading dimension ld (zero outside)."""
    m = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    return tl.load(ptr + rows[:, None] * ld + cols[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _store_tile(ptr, val, rows, cols, n_rows, n_cols, ld):
    m = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    tl.store(ptr + rows[:, None] * ld + cols[None, :], val.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def _row_stats(ptr, M, D, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """LayerNorm mean and 1/std of the M rows of a row-major (M, D) fp32 buffer."""
    rows = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        acc += tl.sum(_tile(ptr, rows, k0 + tl.arange(0, BLOCK_K), M, D, D), 1)
    mean = acc / D
    acc = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = _tile(ptr, rows, cols, M, D, D)
        diff = tl.where((cols < D)[None, :], x - mean[:, None], 0.0)
        acc += tl.sum(diff * diff, 1)
    return mean, 1.0 / tl.sqrt(acc / D + eps)


@triton.jit
def _ln_tile(ptr, rows, cols, M, D, mean, rstd, w_ptr, b_ptr):
    """LN(x) on a tile: (x − mean)·rstd·w + b, fp32, zero outside."""
    x = _tile(ptr, rows, cols, M, D, D)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    m = (rows < M)[:, None] & (cols < D)[None, :]
    return tl.where(m, (x - mean[:, None]) * rstd[:, None] * w[None, :] + b[None, :], 0.0)


@triton.jit
def _wt_tile(w_ptr, kc, ncols, K, N):
    """Wᵀ tile (K-chunk × N-tile) of an nn.Linear weight W (N, K), row-major."""
    m = (kc < K)[:, None] & (ncols < N)[None, :]
    return tl.load(w_ptr + ncols[None, :] * K + kc[:, None], mask=m, other=0.0)


@triton.jit
def _w_tile(w_ptr, nc, kcols, N, K):
    """W tile (N-chunk × K-tile) of W (N, K), row-major: for dX = dY W."""
    m = (nc < N)[:, None] & (kcols < K)[None, :]
    return tl.load(w_ptr + nc[:, None] * K + kcols[None, :], mask=m, other=0.0)


@triton.jit
def _bias(b_ptr, cols, N):
    return tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)


@triton.jit
def _quick_gelu(h):
    return h * tl.sigmoid(1.702 * h)


@triton.jit
def _quick_gelu_grad(h):
    s = tl.sigmoid(1.702 * h)
    return s + 1.702 * h * s * (1.0 - s)


@triton.jit
def _head_probs(qkv_ptr, h, M, D, HD, scale, BLOCK_M: tl.constexpr, BLOCK_HD: tl.constexpr, PREC: tl.constexpr):
    """P_h = softmax(q_h k_hᵀ·scale) (BLOCK_M × BLOCK_M, zero outside M × M), from the fp32 qkv rows."""
    rows = tl.arange(0, BLOCK_M)
    s = tl.zeros((BLOCK_M, BLOCK_M), tl.float32)
    for c0 in range(0, HD, BLOCK_HD):
        c = c0 + tl.arange(0, BLOCK_HD)
        cm = c < HD
        q = tl.load(qkv_ptr + rows[:, None] * (3 * D) + h * HD + c[None, :], mask=(rows < M)[:, None] & cm[None, :],
                    other=0.0)
        k = tl.load(qkv_ptr + rows[:, None] * (3 * D) + D + h * HD + c[None, :],
                    mask=(rows < M)[:, None] & cm[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), s, input_precision="ieee")
    s = tl.where((rows < M)[None, :], s * scale, float("-inf"))
    s = s - tl.max(s, 1)[:, None]
    e = tl.exp(s)
    p = e / tl.sum(e, 1)[:, None]
    return tl.where((rows < M)[:, None], p, 0.0)


# ---- F1 pooling (and B8, its backward) ------------------------------------------------------------

@triton.jit
def _pool_side(x_ptr, sm, sb, sd, xbar_ptr, idx_ptr, M, NB, D, pid,
               FUSING: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    n_dt = tl.cdiv(D, BLOCK_D)
    m = pid // n_dt
    cols = (pid % n_dt) * BLOCK_D + tl.arange(0, BLOCK_D)
    cm = cols < D
    base = x_ptr + m.to(tl.int64) * sm + cols * sd
    if FUSING == 1:  # first
        acc = tl.load(base, mask=cm, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK_D,), tl.float32)
        if FUSING == 2:
            acc += float("-inf")
        best = tl.zeros((BLOCK_D,), tl.int32)
        for b0 in range(0, NB, BLOCK_B):
            bs = b0 + tl.arange(0, BLOCK_B)
            msk = (bs < NB)[:, None] & cm[None, :]
            x = tl.load(base[None, :] + bs.to(tl.int64)[:, None] * sb, mask=msk, other=0.0).to(tl.float32)
            if FUSING == 0:
                acc += tl.sum(x, 0)
            else:
                x = tl.where(msk, x, float("-inf"))
                # torch.max semantics: a NaN is the maximum (the first NaN's index), else the first index of
                # the largest value; a later chunk wins only if strictly larger, or NaN over a number
                nan = x != x
                has_nan = tl.max(nan.to(tl.int32), 0) > 0
                first_nan = tl.min(tl.where(nan, bs[:, None], 2147483647), 0)
                chunk_max = tl.max(tl.where(nan, float("-inf"), x), 0)
                chunk_idx = tl.min(tl.where(x == chunk_max[None, :], bs[:, None], 2147483647), 0)
                chunk_idx = tl.where(has_nan, first_nan, chunk_idx)
                chunk_max = tl.where(has_nan, float("nan"), chunk_max)
                take = (chunk_max > acc) | (has_nan & (acc == acc))
                best = tl.where(take, chunk_idx, best)
                acc = tl.where(take, chunk_max, acc)
        if FUSING == 0:
            acc = acc / NB
        else:
            tl.store(idx_ptr + m * D + cols, best, mask=cm)
    tl.store(xbar_ptr + m * D + cols, acc, mask=cm)


@triton.jit
def _pool_kernel(v_ptr, svm, svb, svd, vbar_ptr, vidx_ptr, Bv, Dv,
                 t_ptr, stm, stb, std, tbar_ptr, tidx_ptr, Bt, Dt, M, n_v,
                 FUSING: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    if pid < n_v:
        _pool_side(v_ptr, svm, svb, svd, vbar_ptr, vidx_ptr, M, Bv, Dv, pid, FUSING, BLOCK_B, BLOCK_D)
    else:
        _pool_side(t_ptr, stm, stb, std, tbar_ptr, tidx_ptr, M, Bt, Dt, pid - n_v, FUSING, BLOCK_B, BLOCK_D)


@triton.jit
def _reduce_grad_side(g_ptr, sm, sb, sd, dy_ptr, M, NB, D, pid, HAS_G: tl.constexpr, BLOCK_B: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """B1: dY[m, :] = Σ_b dOut[m, b, :] (the broadcast's backward); zero for an output without gradient."""
    n_dt = tl.cdiv(D, BLOCK_D)
    m = pid // n_dt
    cols = (pid % n_dt) * BLOCK_D + tl.arange(0, BLOCK_D)
    cm = cols < D
    acc = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_G:
        base = g_ptr + m.to(tl.int64) * sm + cols * sd
        for b0 in range(0, NB, BLOCK_B):
            bs = b0 + tl.arange(0, BLOCK_B)
            msk = (bs < NB)[:, None] & cm[None, :]
            x = tl.load(base[None, :] + bs.to(tl.int64)[:, None] * sb, mask=msk, other=0.0)
            acc += tl.sum(x.to(tl.float32), 0)
    tl.store(dy_ptr + m * D + cols, acc, mask=cm)


@triton.jit
def _reduce_grad_kernel(gv_ptr, svm, svb, svd, dyv_ptr, Bv, Dv, HAS_GV: tl.constexpr,
                        gt_ptr, stm, stb, std, dyt_ptr, Bt, Dt, HAS_GT: tl.constexpr, M, n_v,
                        BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    if pid < n_v:
        _reduce_grad_side(gv_ptr, svm, svb, svd, dyv_ptr, M, Bv, Dv, pid, HAS_GV, BLOCK_B, BLOCK_D)
    else:
        _reduce_grad_side(gt_ptr, stm, stb, std, dyt_ptr, M, Bt, Dt, pid - n_v, HAS_GT, BLOCK_B, BLOCK_D)


@triton.jit
def _pool_bwd_side(dx_ptr, dx1_ptr, dln_ptr, dother_ptr, idx_ptr, M, NB, D, pid, HAS_OWN: tl.constexpr,
                   HAS_CROSS: tl.constexpr, FUSING: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """B8: dX̄ = dx1 + dX̄_ln (this side's own stages) + dŌ (the other side's projection), spread back over B."""
    n_dt = tl.cdiv(D, BLOCK_D)
    n_bt = tl.cdiv(NB, BLOCK_B)
    m = pid // (n_dt * n_bt)
    rest = pid % (n_dt * n_bt)
    cols = (rest // n_bt) * BLOCK_D + tl.arange(0, BLOCK_D)
    bs = (rest % n_bt) * BLOCK_B + tl.arange(0, BLOCK_B)
    cm = cols < D
    g = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_OWN:
        g += tl.load(dx1_ptr + m * D + cols, mask=cm, other=0.0) + tl.load(dln_ptr + m * D + cols, mask=cm, other=0.0)
    if HAS_CROSS:
        g += tl.load(dother_ptr + m * D + cols, mask=cm, other=0.0)
    if FUSING == 0:
        val = tl.zeros((BLOCK_B, BLOCK_D), tl.float32) + (g / NB)[None, :]
    elif FUSING == 1:
        val = tl.where((bs == 0)[:, None], g[None, :], 0.0)
    else:
        best = tl.load(idx_ptr + m * D + cols, mask=cm, other=-1)
        val = tl.where(bs[:, None] == best[None, :], g[None, :], 0.0)
    msk = (bs < NB)[:, None] & cm[None, :]
    offs = (m.to(tl.int64) * NB + bs.to(tl.int64))[:, None] * D + cols[None, :]
    tl.store(dx_ptr + offs, val.to(dx_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _pool_bwd_kernel(dv_ptr, wsv_ptr, vidx_ptr, Bv, Dv, o_dx1_v, o_dln_v,
                     dt_ptr, wst_ptr, tidx_ptr, Bt, Dt, o_dx1_t, o_dln_t, o_dother_v, o_dother_t, M, n_v,
                     TEXT_SIDE: tl.constexpr, FUSING: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """Without the text side (TEXT_SIDE False) the text input's gradient comes from the visual projection
    alone, and the visual input gets nothing through a text-side projection."""
    pid = tl.program_id(0)
    if pid < n_v:  # the visual side's dŌ comes from the text side's projection, and vice versa
        _pool_bwd_side(dv_ptr, wsv_ptr + o_dx1_v, wsv_ptr + o_dln_v, wst_ptr + o_dother_t, vidx_ptr, M, Bv, Dv, pid,
                       True, TEXT_SIDE, FUSING, BLOCK_B, BLOCK_D)
    else:
        _pool_bwd_side(dt_ptr, wst_ptr + o_dx1_t, wst_ptr + o_dln_t, wsv_ptr + o_dother_v, tidx_ptr, M, Bt, Dt,
                       pid - n_v, TEXT_SIDE, True, FUSING, BLOCK_B, BLOCK_D)


# ---- F2..F6: the forward GEMM stages (one side each; the kernels below run both) ----------------

@triton.jit
def _proj_side(other_ptr, w_ptr, b_ptr, p_ptr, M, D, DO, pid,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    """F2: p = Ō W_pᵀ + b_p."""
    rows = tl.arange(0, BLOCK_M)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, DO, BLOCK_K):
        kc = k0 + tl.arange(0, BLOCK_K)
        a = _tile(other_ptr, rows, kc, M, DO, DO).to(w_ptr.dtype.element_ty)
        acc = tl.dot(a, _wt_tile(w_ptr, kc, cols, DO, D), acc, input_precision=PREC)
    _store_tile(p_ptr, acc + _bias(b_ptr, cols, D)[None, :], rows, cols, M, D, D)


@triton.jit
def _ln_linear(src_ptr, M, D, eps, lnw_ptr, lnb_ptr, w_ptr, b_ptr, N, out_ptr, ld_out, pid, stats_ptr, STORE_STATS,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    """out[:, tile] = LN(src) Wᵀ + b for W (N, D); LayerNorm statistics recomputed in the prologue."""
    rows = tl.arange(0, BLOCK_M)
    mean, rstd = _row_stats(src_ptr, M, D, eps, BLOCK_M, BLOCK_K)
    if STORE_STATS:
        tl.store(stats_ptr + rows, mean, mask=rows < M)
        tl.store(stats_ptr + M + rows, rstd, mask=rows < M)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kc = k0 + tl.arange(0, BLOCK_K)
        a = _ln_tile(src_ptr, rows, kc, M, D, mean, rstd, lnw_ptr, lnb_ptr).to(w_ptr.dtype.element_ty)
        acc = tl.dot(a, _wt_tile(w_ptr, kc, cols, D, N), acc, input_precision=PREC)
    _store_tile(out_ptr, acc + _bias(b_ptr, cols, N)[None, :], rows, cols, M, N, ld_out)


@triton.jit
def _qkv_side(ws_ptr, o_xbar, o_p, o_stats, o_qkv, lnw_ptr, lnb_ptr, w_ptr, b_ptr, M, D, eps, pid,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    """F3: q = LN1(p) W_qᵀ + b_q (the first ⌈D/BLOCK_N⌉ programs); [k | v] = LN1(X̄) W_{k,v}ᵀ + b_{k,v}."""
    n_q = tl.cdiv(D, BLOCK_N)
    if pid < n_q:
        _ln_linear(ws_ptr + o_p, M, D, eps, lnw_ptr, lnb_ptr, w_ptr, b_ptr, D, ws_ptr + o_qkv, 3 * D, pid,
                   ws_ptr + o_stats, pid == 0, BLOCK_M, BLOCK_N, BLOCK_K, PREC)
    else:
        _ln_linear(ws_ptr + o_xbar, M, D, eps, lnw_ptr, lnb_ptr, w_ptr + D * D, b_ptr + D, 2 * D,
                   ws_ptr + o_qkv + D, 3 * D, pid - n_q, ws_ptr + o_stats + 2 * M, pid == n_q,
                   BLOCK_M, BLOCK_N, BLOCK_K, PREC)


@triton.jit
def _attn_out_side(ws_ptr, o_xbar, o_qkv, o_probs, o_o, o_x1, wo_ptr, bo_ptr, M, D, H, HD, scale, pid,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HD: tl.constexpr, PREC: tl.constexpr):
    """F4: x1 = X̄ + Σ_h (P_h v_h) W_o[:, h]ᵀ + b_o, the attention of each head computed as the K step's
    prologue. Program 0 keeps P and the attention output o for the backward."""
    rows = tl.arange(0, BLOCK_M)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    qkv_ptr = ws_ptr + o_qkv
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for h in range(H):
        p = _head_probs(qkv_ptr, h, M, D, HD, scale, BLOCK_M, BLOCK_HD, PREC)
        if pid == 0:
            _store_tile(ws_ptr + o_probs + h * M * M, p, rows, rows, M, M, M)
        for c0 in range(0, HD, BLOCK_HD):
            c = c0 + tl.arange(0, BLOCK_HD)
            v = tl.load(qkv_ptr + rows[:, None] * (3 * D) + 2 * D + h * HD + c[None, :],
                        mask=(rows < M)[:, None] & (c < HD)[None, :], other=0.0)
            o = tl.dot(p, v, input_precision="ieee")
            if pid == 0:
                _store_tile(ws_ptr + o_o + h * HD, o, rows, c, M, HD, D)
            wm = (c < HD)[:, None] & (cols < D)[None, :]
            wt = tl.load(wo_ptr + cols[None, :] * D + h * HD + c[:, None], mask=wm, other=0.0)
            acc = tl.dot(o.to(wo_ptr.dtype.element_ty), wt, acc, input_precision=PREC)
    x1 = _tile(ws_ptr + o_xbar, rows, cols, M, D, D) + acc + _bias(bo_ptr, cols, D)[None, :]
    _store_tile(ws_ptr + o_x1, x1, rows, cols, M, D, D)


@triton.jit
def _cproj_side(ws_ptr, o_h, o_x1, wc_ptr, bc_ptr, out_ptr, M, D, F, pid,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    """F6: out = x1 + QuickGELU(h) W_cᵀ + b_c."""
    rows = tl.arange(0, BLOCK_M)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, F, BLOCK_K):
        kc = k0 + tl.arange(0, BLOCK_K)
        g = _quick_gelu(_tile(ws_ptr + o_h, rows, kc, M, F, F)).to(wc_ptr.dtype.element_ty)
        acc = tl.dot(g, _wt_tile(wc_ptr, kc, cols, F, D), acc, input_precision=PREC)
    out = _tile(ws_ptr + o_x1, rows, cols, M, D, D) + acc + _bias(bc_ptr, cols, D)[None, :]
    _store_tile(out_ptr, out, rows, cols, M, D, D)


@triton.jit
def _proj_kernel(wsv_ptr, wst_ptr, o_xbar_v, o_p_v, o_xbar_t, o_p_t, wpv_ptr, bpv_ptr, wpt_ptr, bpt_ptr,
                 M, Dv, Dt, n_v, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PREC: tl.constexpr):
    pid = tl.program_id(0)
    if pid < n_v:  # the visual query comes from the pooled text, and vice versa
        _proj_side(wst_ptr + o_xbar_t, wpv_ptr, bpv_ptr, wsv_ptr + o_p_v, M, Dv, Dt, pid,
                   BLOCK_M, BLOCK_N, BLOCK_K, PREC)
    else:
        _proj_side(wsv_ptr + o_xbar_v, wpt_ptr, bpt_ptr, wst_ptr + o_p_t, M, Dt, Dv, pid - n_v,
                   BLOCK_M, BLOCK_N, BLOCK_K, PREC)


@triton.jit
def _qkv_kernel(wsv_ptr, o_xbar_v, o_p_v, o_stats_v, o_qkv_v, lnwv_ptr, lnbv_ptr, winv_ptr, binv_ptr, Dv,
                wst_ptr, o_xbar_t, o_p_t, o_stats_t, o_qkv_t, lnwt_ptr, lnbt_ptr, wint_ptr, bint_ptr, Dt,
                M, eps, n_v, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                PREC: tl.constexpr):
    pid = tl.program_id(0)
    if pid < n_v:
        _qkv_side(wsv_ptr, o_xbar_v, o_p_v, o_stats_v, o_qkv_v, lnwv_ptr, lnbv_ptr, winv_ptr, binv_ptr, M, Dv, eps,
                  pid, BLOCK_M, BLOCK_N, BLOCK_K, PREC)
    else:
        _qkv_side(wst_ptr, o_xbar_t, o_p_t, o_stats_t, o_qkv_t, lnwt_ptr, lnbt_ptr, wint_ptr, bint_ptr, M, Dt, eps,
                  pid - n_v, BLOCK_M, BLOCK_N, BLOCK_K, PREC)


@triton.jit
def _attn_out_kernel(wsv_ptr, o_xbar_v, o_qkv_v, o_probs_v, o_o_v, o_x1_v, wov_ptr, bov_ptr, Dv, Hv, HDv, scale_v,
                     wst_ptr, o_xbar_t, o_qkv_t, o_probs_t, o_o_t, o_x1_t, wot_ptr, bot_ptr, Dt, Ht, HDt, scale_t,
                     M, n_v, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HD_V: tl.constexpr,
                     BLOCK_HD_T: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    if pid < n_v:
        _attn_out_side(wsv_ptr, o_xbar_v, o_qkv_v, o_probs_v, o_o_v, o_x1_v, wov_ptr, bov_ptr, M, Dv, Hv, HDv,
                       scale_v, pid, BLOCK_M, BLOCK_N, BLOCK_HD_V, PREC)
    else:
        _attn_out_side(wst_ptr, o_xbar_t, o_qkv_t, o_probs_t, o_o_t, o_x1_t, wot_ptr, bot_ptr, M, Dt, Ht, HDt,
                       scale_t, pid - n_v, BLOCK_M, BLOCK_N, BLOCK_HD_T, PREC)


@triton.jit
def _fc_kernel(wsv_ptr, o_x1_v, o_stats_v, o_h_v, lnwv_ptr, lnbv_ptr, wfv_ptr, bfv_ptr, Dv, Fv,
               wst_ptr, o_x1_t, o_stats_t, o_h_t, lnwt_ptr, lnbt_ptr, wft_ptr, bft_ptr, Dt, Ft,
               M, eps, n_v, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               PREC: tl.constexpr):
    """F5: h = LN2(x1) W_fcᵀ + b_fc."""
    pid = tl.program_id(0)
    if pid < n_v:
        _ln_linear(wsv_ptr + o_x1_v, M, Dv, eps, lnwv_ptr, lnbv_ptr, wfv_ptr, bfv_ptr, Fv, wsv_ptr + o_h_v, Fv, pid,
                   wsv_ptr + o_stats_v + 4 * M, pid == 0, BLOCK_M, BLOCK_N, BLOCK_K, PREC)
    else:
        _ln_linear(wst_ptr + o_x1_t, M, Dt, eps, lnwt_ptr, lnbt_ptr, wft_ptr, bft_ptr, Ft, wst_ptr + o_h_t, Ft,
                   pid - n_v, wst_ptr + o_stats_t + 4 * M, pid == n_v, BLOCK_M, BLOCK_N, BLOCK_K, PREC)


@triton.jit
def _cproj_kernel(wsv_ptr, o_h_v, o_x1_v, wcv_ptr, bcv_ptr, outv_ptr, Dv, Fv,
                  wst_ptr, o_h_t, o_x1_t, wct_ptr, bct_ptr, outt_ptr, Dt, Ft,
                  M, n_v, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    if pid < n_v:
        _cproj_side(wsv_ptr, o_h_v, o_x1_v, wcv_ptr, bcv_ptr, outv_ptr, M, Dv, Fv, pid, BLOCK_M, BLOCK_N, BLOCK_K, PREC)
    else:
        _cproj_side(wst_ptr, o_h_t, o_x1_t, wct_ptr, bct_ptr, outt_ptr, M, Dt, Ft, pid - n_v, BLOCK_M, BLOCK_N,
                    BLOCK_K, PREC)


# ---- B2..B7: the backward GEMM stages ---------------------------------------------------------------
# Each stage has two program families: "input" programs own a tile of output columns of a gradient that
# flows on (K loop over the layer's width), "weight" programs own a BLOCK_W × BLOCK_W tile of a weight
# gradient (K = the M prompt rows); the weight programs of the first column tile also write the bias
# and LayerNorm gradients of their rows.

@triton.jit
def _mlp_out_bwd_side(wsf_ptr, o_h, wsb_ptr, o_dy, o_dh, wc_ptr, dwc_ptr, dbc_ptr, M, D, F, pid,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr,
                      PREC: tl.constexpr):
    """B2: dh = (dY W_c)·g'(h) ; dW_c = dYᵀ g(h) ; db_c = Σ_m dY."""
    rows = tl.arange(0, BLOCK_M)
    dt = wc_ptr.dtype.element_ty
    n_in = tl.cdiv(F, BLOCK_N)
    if pid < n_in:
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, D, BLOCK_K):
            kc = k0 + tl.arange(0, BLOCK_K)
            acc = tl.dot(_tile(wsb_ptr + o_dy, rows, kc, M, D, D).to(dt), _w_tile(wc_ptr, kc, cols, D, F), acc,
                         input_precision=PREC)
        dh = acc * _quick_gelu_grad(_tile(wsf_ptr + o_h, rows, cols, M, F, F))
        _store_tile(wsb_ptr + o_dh, dh, rows, cols, M, F, F)
    else:
        q = pid - n_in
        n_ct = tl.cdiv(F, BLOCK_W)
        wr = (q // n_ct) * BLOCK_W + tl.arange(0, BLOCK_W)
        wc = (q % n_ct) * BLOCK_W + tl.arange(0, BLOCK_W)
        dy = _tile(wsb_ptr + o_dy, rows, wr, M, D, D)
        g = _quick_gelu(_tile(wsf_ptr + o_h, rows, wc, M, F, F))
        dw = tl.dot(tl.trans(dy.to(dt)), g.to(dt), input_precision=PREC)
        _store_tile(dwc_ptr, dw, wr, wc, D, F, F)
        if q % n_ct == 0:
            tl.store(dbc_ptr + wr, tl.sum(dy, 0).to(dbc_ptr.dtype.element_ty), mask=wr < D)


@triton.jit
def _fc_bwd_side(wsf_ptr, o_x1, o_stats, wsb_ptr, o_dh, o_dc, lnw_ptr, lnb_ptr, wf_ptr, dwf_ptr, dbf_ptr, M, D, F,
                 eps, pid, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_W: tl.constexpr, PREC: tl.constexpr):
    """B3: dc = dh W_fc ; dW_fc = dhᵀ LN2(x1) ; db_fc = Σ_m dh."""
    rows = tl.arange(0, BLOCK_M)
    dt = wf_ptr.dtype.element_ty
    n_in = tl.cdiv(D, BLOCK_N)
    if pid < n_in:
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, F, BLOCK_K):
            kc = k0 + tl.arange(0, BLOCK_K)
            acc = tl.dot(_tile(wsb_ptr + o_dh, rows, kc, M, F, F).to(dt), _w_tile(wf_ptr, kc, cols, F, D), acc,
                         input_precision=PREC)
        _store_tile(wsb_ptr + o_dc, acc, rows, cols, M, D, D)
    else:
        q = pid - n_in
        n_ct = tl.cdiv(D, BLOCK_W)
        wr = (q // n_ct) * BLOCK_W + tl.arange(0, BLOCK_W)
        wc = (q % n_ct) * BLOCK_W + tl.arange(0, BLOCK_W)
        mean = tl.load(wsf_ptr + o_stats + 4 * M + rows, mask=rows < M, other=0.0)
        rstd = tl.load(wsf_ptr + o_stats + 5 * M + rows, mask=rows < M, other=0.0)
        c = _ln_tile(wsf_ptr + o_x1, rows, wc, M, D, mean, rstd, lnw_ptr, lnb_ptr)
        dh = _tile(wsb_ptr + o_dh, rows, wr, M, F, F)
        _store_tile(dwf_ptr, tl.dot(tl.trans(dh.to(dt)), c.to(dt), input_precision=PREC), wr, wc, F, D, D)
        if q % n_ct == 0:
            tl.store(dbf_ptr + wr, tl.sum(dh, 0).to(dbf_ptr.dtype.element_ty), mask=wr < F)


@triton.jit
def _ln_bwd_consts(dz_ptr, x_ptr, mean, rstd, lnw_ptr, M, D, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """c1 = mean_D(dẑ·x̂), c2 = mean_D(dẑ) with dẑ = dz·γ, x̂ = (x − mean)·rstd: the row constants of
    dx = rstd·(dẑ − c2 − x̂·c1)."""
    rows = tl.arange(0, BLOCK_M)
    c1 = tl.zeros((BLOCK_M,), tl.float32)
    c2 = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kc = k0 + tl.arange(0, BLOCK_K)
        dzh = _tile(dz_ptr, rows, kc, M, D, D) * tl.load(lnw_ptr + kc, mask=kc < D, other=0.0).to(tl.float32)[None, :]
        xh = tl.where((kc < D)[None, :], (_tile(x_ptr, rows, kc, M, D, D) - mean[:, None]) * rstd[:, None], 0.0)
        c1 += tl.sum(dzh * xh, 1)
        c2 += tl.sum(dzh, 1)
    return c1 / D, c2 / D


@triton.jit
def _ln_bwd_tile(dz_ptr, x_ptr, rows, cols, M, D, mean, rstd, c1, c2, lnw_ptr):
    """(dx, x̂, dz) on a tile of the LayerNorm backward, fp32, zero outside."""
    dz = _tile(dz_ptr, rows, cols, M, D, D)
    m = (rows < M)[:, None] & (cols < D)[None, :]
    xh = tl.where(m, (_tile(x_ptr, rows, cols, M, D, D) - mean[:, None]) * rstd[:, None], 0.0)
    dzh = dz * tl.load(lnw_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    dx = tl.where(m, (dzh - c2[:, None] - xh * c1[:, None]) * rstd[:, None], 0.0)
    return dx, xh, dz


@triton.jit
def _out_bwd_side(wsf_ptr, o_x1, o_stats, o_o, wsb_ptr, o_dy, o_dc, o_dx1, o_do, lnw_ptr, wo_ptr,
                  dwo_ptr, dbo_ptr, dlnw_ptr, dlnb_ptr, M, D, pid,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr,
                  PREC: tl.constexpr):
    """B4: dx1 = dY + LN2_bwd(dc) (rebuilt tile by tile) ; do = dx1 W_o ; dW_o = dx1ᵀ o ; db_o = Σ dx1 ;
    dγ2 = Σ dc·x̂, dβ2 = Σ dc."""
    rows = tl.arange(0, BLOCK_M)
    dt = wo_ptr.dtype.element_ty
    mean = tl.load(wsf_ptr + o_stats + 4 * M + rows, mask=rows < M, other=0.0)
    rstd = tl.load(wsf_ptr + o_stats + 5 * M + rows, mask=rows < M, other=0.0)
    c1, c2 = _ln_bwd_consts(wsb_ptr + o_dc, wsf_ptr + o_x1, mean, rstd, lnw_ptr, M, D, BLOCK_M, BLOCK_K)
    n_in = tl.cdiv(D, BLOCK_N)
    if pid < n_in:
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, D, BLOCK_K):
            kc = k0 + tl.arange(0, BLOCK_K)
            dx, _, _ = _ln_bwd_tile(wsb_ptr + o_dc, wsf_ptr + o_x1, rows, kc, M, D, mean, rstd, c1, c2, lnw_ptr)
            dx1 = dx + _tile(wsb_ptr + o_dy, rows, kc, M, D, D)
            acc = tl.dot(dx1.to(dt), _w_tile(wo_ptr, kc, cols, D, D), acc, input_precision=PREC)
        _store_tile(wsb_ptr + o_do, acc, rows, cols, M, D, D)
    else:
        q = pid - n_in
        n_ct = tl.cdiv(D, BLOCK_W)
        wr = (q // n_ct) * BLOCK_W + tl.arange(0, BLOCK_W)
        wc = (q % n_ct) * BLOCK_W + tl.arange(0, BLOCK_W)
        dx, xh, dc = _ln_bwd_tile(wsb_ptr + o_dc, wsf_ptr + o_x1, rows, wr, M, D, mean, rstd, c1, c2, lnw_ptr)
        dx1 = dx + _tile(wsb_ptr + o_dy, rows, wr, M, D, D)
        o = _tile(wsf_ptr + o_o, rows, wc, M, D, D)
        _store_tile(dwo_ptr, tl.dot(tl.trans(dx1.to(dt)), o.to(dt), input_precision=PREC), wr, wc, D, D, D)
        if q % n_ct == 0:
            rm = wr < D
            _store_tile(wsb_ptr + o_dx1, dx1, rows, wr, M, D, D)
            tl.store(dbo_ptr + wr, tl.sum(dx1, 0).to(dbo_ptr.dtype.element_ty), mask=rm)
            tl.store(dlnw_ptr + wr, tl.sum(dc * xh, 0).to(dlnw_ptr.dtype.element_ty), mask=rm)
            tl.store(dlnb_ptr + wr, tl.sum(dc, 0).to(dlnb_ptr.dtype.element_ty), mask=rm)


@triton.jit
def _attn_bwd_side(wsf_ptr, o_qkv, o_probs, wsb_ptr, o_do, o_dqkv, M, D, HD, scale, h,
                   BLOCK_M: tl.constexpr, BLOCK_HD: tl.constexpr):
    """B5, one head: dv = Pᵀ do ; dP = do vᵀ ; dS = P ⊙ (dP − rowsum(dP ⊙ P)) ; dq = dS k·scale ;
    dk = dSᵀ q·scale."""
    rows = tl.arange(0, BLOCK_M)
    rm = rows < M
    p = _tile(wsf_ptr + o_probs + h * M * M, rows, rows, M, M, M)
    qkv = wsf_ptr + o_qkv
    dqkv = wsb_ptr + o_dqkv
    dp = tl.zeros((BLOCK_M, BLOCK_M), tl.float32)
    for c0 in range(0, HD, BLOCK_HD):
        c = c0 + tl.arange(0, BLOCK_HD)
        m = rm[:, None] & (c < HD)[None, :]
        do = tl.load(wsb_ptr + o_do + rows[:, None] * D + h * HD + c[None, :], mask=m, other=0.0)
        v = tl.load(qkv + rows[:, None] * (3 * D) + 2 * D + h * HD + c[None, :], mask=m, other=0.0)
        dp = tl.dot(do, tl.trans(v), dp, input_precision="ieee")
        dv = tl.dot(tl.trans(p), do, input_precision="ieee")
        tl.store(dqkv + rows[:, None] * (3 * D) + 2 * D + h * HD + c[None, :], dv, mask=m)
    ds = p * (dp - tl.sum(dp * p, 1)[:, None]) * scale
    for c0 in range(0, HD, BLOCK_HD):
        c = c0 + tl.arange(0, BLOCK_HD)
        m = rm[:, None] & (c < HD)[None, :]
        q = tl.load(qkv + rows[:, None] * (3 * D) + h * HD + c[None, :], mask=m, other=0.0)
        k = tl.load(qkv + rows[:, None] * (3 * D) + D + h * HD + c[None, :], mask=m, other=0.0)
        tl.store(dqkv + rows[:, None] * (3 * D) + h * HD + c[None, :], tl.dot(ds, k, input_precision="ieee"), mask=m)
        tl.store(dqkv + rows[:, None] * (3 * D) + D + h * HD + c[None, :],
                 tl.dot(tl.trans(ds), q, input_precision="ieee"), mask=m)


@triton.jit
def _in_bwd_side(wsf_ptr, o_p, o_xbar, o_stats, wsb_ptr, o_dqkv, o_da, o_db, lnw_ptr, lnb_ptr, win_ptr,
                 dwin_ptr, dbin_ptr, M, D, pid,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr,
                 PREC: tl.constexpr):
    """B6: da = dq W_q ; db = dk W_k + dv W_v ; dW_in = [dqᵀ a ; dkᵀ b ; dvᵀ b] with a = LN1(p), b = LN1(X̄) ;
    db_in = Σ_m dqkv."""
    rows = tl.arange(0, BLOCK_M)
    dt = win_ptr.dtype.element_ty
    dqkv = wsb_ptr + o_dqkv
    n_in = tl.cdiv(D, BLOCK_N)
    if pid < n_in:
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        acc_a = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        acc_b = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, D, BLOCK_K):
            kc = k0 + tl.arange(0, BLOCK_K)
            acc_a = tl.dot(_tile(dqkv, rows, kc, M, D, 3 * D).to(dt), _w_tile(win_ptr, kc, cols, D, D), acc_a,
                           input_precision=PREC)
            acc_b = tl.dot(_tile(dqkv + D, rows, kc, M, D, 3 * D).to(dt), _w_tile(win_ptr + D * D, kc, cols, D, D),
                           acc_b, input_precision=PREC)
            acc_b = tl.dot(_tile(dqkv + 2 * D, rows, kc, M, D, 3 * D).to(dt),
                           _w_tile(win_ptr + 2 * D * D, kc, cols, D, D), acc_b, input_precision=PREC)
        _store_tile(wsb_ptr + o_da, acc_a, rows, cols, M, D, D)
        _store_tile(wsb_ptr + o_db, acc_b, rows, cols, M, D, D)
    else:
        q = pid - n_in
        n_ct = tl.cdiv(D, BLOCK_W)
        wr = (q // n_ct) * BLOCK_W + tl.arange(0, BLOCK_W)  # rows of W_in, in [0, 3D)
        wc = (q % n_ct) * BLOCK_W + tl.arange(0, BLOCK_W)
        st = wsf_ptr + o_stats
        rm = rows < M
        a = _ln_tile(wsf_ptr + o_p, rows, wc, M, D, tl.load(st + rows, mask=rm, other=0.0),
                     tl.load(st + M + rows, mask=rm, other=0.0), lnw_ptr, lnb_ptr)
        b = _ln_tile(wsf_ptr + o_xbar, rows, wc, M, D, tl.load(st + 2 * M + rows, mask=rm, other=0.0),
                     tl.load(st + 3 * M + rows, mask=rm, other=0.0), lnw_ptr, lnb_ptr)
        g = _tile(dqkv, rows, wr, M, 3 * D, 3 * D)
        # rows of W_q take a, rows of W_k and W_v take b: a tile may straddle the boundary
        g_q = tl.where((wr < D)[None, :], g, 0.0)
        g_kv = tl.where((wr >= D)[None, :], g, 0.0)
        dw = tl.dot(tl.trans(g_q.to(dt)), a.to(dt), input_precision=PREC)
        dw = tl.dot(tl.trans(g_kv.to(dt)), b.to(dt), dw, input_precision=PREC)
        _store_tile(dwin_ptr, dw, wr, wc, 3 * D, D, D)
        if q % n_ct == 0:
            tl.store(dbin_ptr + wr, tl.sum(g, 0).to(dbin_ptr.dtype.element_ty), mask=wr < 3 * D)


@triton.jit
def _proj_bwd_side(wsf_ptr, o_p, o_xbar, o_stats, other_ptr, wsb_ptr, o_da, o_db, o_dxbar_ln, o_dother,
                   lnw_ptr, wp_ptr, dwp_ptr, dbp_ptr, dlnw_ptr, dlnb_ptr, M, D, DO, pid,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr,
                   PREC: tl.constexpr):
    """B7: dp = LN1_bwd(da; p), dX̄_ln = LN1_bwd(db; X̄) ; dŌ = dp W_p ; dW_p = dpᵀ Ō ; db_p = Σ dp ;
    dγ1 = Σ da·â + db·b̂, dβ1 = Σ da + db."""
    rows = tl.arange(0, BLOCK_M)
    rm = rows < M
    dt = wp_ptr.dtype.element_ty
    st = wsf_ptr + o_stats
    mean_a = tl.load(st + rows, mask=rm, other=0.0)
    rstd_a = tl.load(st + M + rows, mask=rm, other=0.0)
    c1a, c2a = _ln_bwd_consts(wsb_ptr + o_da, wsf_ptr + o_p, mean_a, rstd_a, lnw_ptr, M, D, BLOCK_M, BLOCK_K)
    n_in = tl.cdiv(DO, BLOCK_N)
    if pid < n_in:
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, D, BLOCK_K):
            kc = k0 + tl.arange(0, BLOCK_K)
            dp, _, _ = _ln_bwd_tile(wsb_ptr + o_da, wsf_ptr + o_p, rows, kc, M, D, mean_a, rstd_a, c1a, c2a, lnw_ptr)
            acc = tl.dot(dp.to(dt), _w_tile(wp_ptr, kc, cols, D, DO), acc, input_precision=PREC)
        _store_tile(wsb_ptr + o_dother, acc, rows, cols, M, DO, DO)
    else:
        q = pid - n_in
        n_ct = tl.cdiv(DO, BLOCK_W)
        wr = (q // n_ct) * BLOCK_W + tl.arange(0, BLOCK_W)
        wc = (q % n_ct) * BLOCK_W + tl.arange(0, BLOCK_W)
        dp, xa, da = _ln_bwd_tile(wsb_ptr + o_da, wsf_ptr + o_p, rows, wr, M, D, mean_a, rstd_a, c1a, c2a, lnw_ptr)
        other = _tile(other_ptr, rows, wc, M, DO, DO)
        _store_tile(dwp_ptr, tl.dot(tl.trans(dp.to(dt)), other.to(dt), input_precision=PREC), wr, wc, D, DO, DO)
        if q % n_ct == 0:
            mean_b = tl.load(st + 2 * M + rows, mask=rm, other=0.0)
            rstd_b = tl.load(st + 3 * M + rows, mask=rm, other=0.0)
            c1b, c2b = _ln_bwd_consts(wsb_ptr + o_db, wsf_ptr + o_xbar, mean_b, rstd_b, lnw_ptr, M, D, BLOCK_M,
                                      BLOCK_K)
            dxb, xb, db = _ln_bwd_tile(wsb_ptr + o_db, wsf_ptr + o_xbar, rows, wr, M, D, mean_b, rstd_b, c1b, c2b,
                                       lnw_ptr)
            _store_tile(wsb_ptr + o_dxbar_ln, dxb, rows, wr, M, D, D)
            rmw = wr < D
            tl.store(dbp_ptr + wr, tl.sum(dp, 0).to(dbp_ptr.dtype.element_ty), mask=rmw)
            tl.store(dlnw_ptr + wr, tl.sum(da * xa + db * xb, 0).to(dlnw_ptr.dtype.element_ty), mask=rmw)
            tl.store(dlnb_ptr + wr, tl.sum(da + db, 0).to(dlnb_ptr.dtype.element_ty), mask=rmw)


@triton.jit
def _mlp_out_bwd_kernel(wsfv, o_h_v, wsbv, o_dy_v, o_dh_v, wcv, dwcv, dbcv, Dv, Fv,
                        wsft, o_h_t, wsbt, o_dy_t, o_dh_t, wct, dwct, dbct, Dt, Ft, M, n_v,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr,
                        PREC: tl.constexpr):
    pid = tl.program_id(0)
    if pid < n_v:
        _mlp_out_bwd_side(wsfv, o_h_v, wsbv, o_dy_v, o_dh_v, wcv, dwcv, dbcv, M, Dv, Fv, pid,
                          BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_W, PREC)
    else:
        _mlp_out_bwd_side(wsft, o_h_t, wsbt, o_dy_t, o_dh_t, wct, dwct, dbct, M, Dt, Ft, pid - n_v,
                          BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_W, PREC)


@triton.jit
def _fc_bwd_kernel(wsfv, o_x1_v, o_stats_v, wsbv, o_dh_v, o_dc_v, lnwv, lnbv, wfv, dwfv, dbfv, Dv, Fv,
                   wsft, o_x1_t, o_stats_t, wsbt, o_dh_t, o_dc_t, lnwt, lnbt, wft, dwft, dbft, Dt, Ft, M, eps, n_v,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr,
                   PREC: tl.constexpr):
    pid = tl.program_id(0)
    if pid < n_v:
        _fc_bwd_side(wsfv, o_x1_v, o_stats_v, wsbv, o_dh_v, o_dc_v, lnwv, lnbv, wfv, dwfv, dbfv, M, Dv, Fv, eps, pid,
                     BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_W, PREC)
    else:
        _fc_bwd_side(wsft, o_x1_t, o_stats_t, wsbt, o_dh_t, o_dc_t, lnwt, lnbt, wft, dwft, dbft, M, Dt, Ft, eps,
                     pid - n_v, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_W, PREC)


@triton.jit
def _out_bwd_kernel(wsfv, o_x1_v, o_stats_v, o_o_v, wsbv, o_dy_v, o_dc_v, o_dx1_v, o_do_v, lnwv, wov, dwov, dbov,
                    dlnwv, dlnbv, Dv,
                    wsft, o_x1_t, o_stats_t, o_o_t, wsbt, o_dy_t, o_dc_t, o_dx1_t, o_do_t, lnwt, wot, dwot, dbot,
                    dlnwt, dlnbt, Dt, M, n_v,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr,
                    PREC: tl.constexpr):
    pid = tl.program_id(0)
    if pid < n_v:
        _out_bwd_side(wsfv, o_x1_v, o_stats_v, o_o_v, wsbv, o_dy_v, o_dc_v, o_dx1_v, o_do_v, lnwv, wov, dwov, dbov,
                      dlnwv, dlnbv, M, Dv, pid, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_W, PREC)
    else:
        _out_bwd_side(wsft, o_x1_t, o_stats_t, o_o_t, wsbt, o_dy_t, o_dc_t, o_dx1_t, o_do_t, lnwt, wot, dwot, dbot,
                      dlnwt, dlnbt, M, Dt, pid - n_v, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_W, PREC)


@triton.jit
def _attn_bwd_kernel(wsfv, o_qkv_v, o_probs_v, wsbv, o_do_v, o_dqkv_v, Dv, HDv, scale_v,
                     wsft, o_qkv_t, o_probs_t, wsbt, o_do_t, o_dqkv_t, Dt, HDt, scale_t, M, n_v,
                     BLOCK_M: tl.constexpr, BLOCK_HD_V: tl.constexpr, BLOCK_HD_T: tl.constexpr):
    pid = tl.program_id(0)
    if pid < n_v:
        _attn_bwd_side(wsfv, o_qkv_v, o_probs_v, wsbv, o_do_v, o_dqkv_v, M, Dv, HDv, scale_v, pid, BLOCK_M,
                       BLOCK_HD_V)
    else:
        _attn_bwd_side(wsft, o_qkv_t, o_probs_t, wsbt, o_do_t, o_dqkv_t, M, Dt, HDt, scale_t, pid - n_v, BLOCK_M,
                       BLOCK_HD_T)


@triton.jit
def _in_bwd_kernel(wsfv, o_p_v, o_xbar_v, o_stats_v, wsbv, o_dqkv_v, o_da_v, o_db_v, lnwv, lnbv, winv, dwinv, dbinv,
                   Dv,
                   wsft, o_p_t, o_xbar_t, o_stats_t, wsbt, o_dqkv_t, o_da_t, o_db_t, lnwt, lnbt, wint, dwint, dbint,
                   Dt, M, n_v,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr,
                   PREC: tl.constexpr):
    pid = tl.program_id(0)
    if pid < n_v:
        _in_bwd_side(wsfv, o_p_v, o_xbar_v, o_stats_v, wsbv, o_dqkv_v, o_da_v, o_db_v, lnwv, lnbv, winv, dwinv,
                     dbinv, M, Dv, pid, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_W, PREC)
    else:
        _in_bwd_side(wsft, o_p_t, o_xbar_t, o_stats_t, wsbt, o_dqkv_t, o_da_t, o_db_t, lnwt, lnbt, wint, dwint,
                     dbint, M, Dt, pid - n_v, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_W, PREC)


@triton.jit
def _proj_bwd_kernel(wsfv, o_p_v, o_xbar_v, o_stats_v, wsbv, o_da_v, o_db_v, o_dxbar_ln_v, o_dother_v, lnwv, wpv,
                     dwpv, dbpv, dlnwv, dlnbv, Dv,
                     wsft, o_p_t, o_xbar_t, o_stats_t, wsbt, o_da_t, o_db_t, o_dxbar_ln_t, o_dother_t, lnwt, wpt,
                     dwpt, dbpt, dlnwt, dlnbt, Dt, M, n_v,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr,
                     PREC: tl.constexpr):
    pid = tl.program_id(0)
    if pid < n_v:  # the visual projection reads the pooled text (Ō), and vice versa
        _proj_bwd_side(wsfv, o_p_v, o_xbar_v, o_stats_v, wsft + o_xbar_t, wsbv, o_da_v, o_db_v, o_dxbar_ln_v,
                       o_dother_v, lnwv, wpv, dwpv, dbpv, dlnwv, dlnbv, M, Dv, Dt, pid,
                       BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_W, PREC)
    else:
        _proj_bwd_side(wsft, o_p_t, o_xbar_t, o_stats_t, wsfv + o_xbar_v, wsbt, o_da_t, o_db_t, o_dxbar_ln_t,
                       o_dother_t, lnwt, wpt, dwpt, dbpt, dlnwt, dlnbt, M, Dt, Dv, pid - n_v,
                       BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_W, PREC)


# ---- launchers and raw ops -------------------------------------------------------------------------

class _Side:
    """Geometry of one side: x (M, B, D), its 14 parameters, its heads and the other side's width."""

    def __init__(self, x: Tensor, params: list[Tensor], n_head: int, d_other: int):
        self.m, self.nb, self.d = x.shape
        self.p = CMPASideParams(*(t.contiguous() for t in params))
        self.f = self.p.fc_weight.shape[0]
        self.h, self.hd = n_head, self.d // n_head
        self.d_other = d_other
        self.fwd = {k: v[0] for k, v in _fwd_layout(self.m, self.d, self.h, self.f).items()}
        self.bwd = {k: v[0] for k, v in _bwd_layout(self.m, self.d, d_other, self.f).items()}
        self.block_hd = max(16, min(64, next_pow2(self.hd)))
        self.scale = self.hd ** -0.5

    def pool_programs(self) -> int:
        return self.m * triton.cdiv(self.d, POOL_BLOCK_D)

    def pool_bwd_programs(self) -> int:
        return self.pool_programs() * triton.cdiv(self.nb, POOL_BLOCK_B)


def _tiles(n: int, block: int = BLOCK_N) -> int:
    return triton.cdiv(n, block)


def _block_m(m: int) -> int:
    return max(16, next_pow2(m))


def cmpa_fwd(visual: Tensor, text: Tensor, visual_params: list[Tensor], text_params: list[Tensor],
             n_head_visual: int, n_head_text: int, fusing: str, eps: float, compute_text: bool
             ) -> tuple[Tensor, Tensor, list[Tensor]]:
    sv = _Side(visual, visual_params, n_head_visual, text.shape[2])
    st = _Side(text, text_params, n_head_text, visual.shape[2])
    m = sv.m
    wsv = empty(sv.fwd["_total"], like=visual, dtype=torch.float32)
    # without the text side only its pooled rows (the head of its workspace) are computed and kept
    wst = empty(st.fwd["_total"] if compute_text else st.fwd["p"], like=text, dtype=torch.float32)
    is_max = fusing == "max"
    idx_v = empty(m, sv.d, like=visual, dtype=torch.int32) if is_max else visual.new_empty(0, dtype=torch.int32)
    idx_t = empty(m, st.d, like=text, dtype=torch.int32) if is_max else text.new_empty(0, dtype=torch.int32)
    out_v = empty(m, sv.d, like=visual)
    out_t = empty(m, st.d, like=text) if compute_text else text.new_empty(0)
    common = dict(BLOCK_M=_block_m(m), PREC=dot_precision(visual.dtype), num_warps=4)
    gemm = dict(common, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    fv, ft = sv.fwd, st.fwd
    text_side = 1 if compute_text else 0  # without the text side its programs are left out of F2..F6

    # F1: pooling
    n_v = sv.pool_programs()
    _pool_kernel[(n_v + st.pool_programs(),)](
        visual, *visual.stride(), wsv[fv["xbar"]:], idx_v if is_max else wsv, sv.nb, sv.d,
        text, *text.stride(), wst[ft["xbar"]:], idx_t if is_max else wst, st.nb, st.d, m, n_v,
        FUSING=FUSING_CODES[fusing], BLOCK_B=POOL_BLOCK_B, BLOCK_D=POOL_BLOCK_D)
    # F2: the query-side projections from the other modality
    n_v = _tiles(sv.d)
    _proj_kernel[(n_v + text_side * _tiles(st.d),)](
        wsv, wst, fv["xbar"], fv["p"], ft["xbar"], ft["p"], sv.p.proj_weight, sv.p.proj_bias, st.p.proj_weight,
        st.p.proj_bias, m, sv.d, st.d, n_v, **gemm)
    # F3: LN1 and the q, k, v projections
    n_v = _tiles(sv.d) + _tiles(2 * sv.d)
    _qkv_kernel[(n_v + text_side * (_tiles(st.d) + _tiles(2 * st.d)),)](
        wsv, fv["xbar"], fv["p"], fv["stats"], fv["qkv"], sv.p.ln1_weight, sv.p.ln1_bias, sv.p.in_proj_weight,
        sv.p.in_proj_bias, sv.d,
        wst, ft["xbar"], ft["p"], ft["stats"], ft["qkv"], st.p.ln1_weight, st.p.ln1_bias, st.p.in_proj_weight,
        st.p.in_proj_bias, st.d, m, eps, n_v, **gemm)
    # F4: attention and the output projection, residual
    n_v = _tiles(sv.d)
    _attn_out_kernel[(n_v + text_side * _tiles(st.d),)](
        wsv, fv["xbar"], fv["qkv"], fv["probs"], fv["o"], fv["x1"], sv.p.out_proj_weight, sv.p.out_proj_bias, sv.d,
        sv.h, sv.hd, sv.scale,
        wst, ft["xbar"], ft["qkv"], ft["probs"], ft["o"], ft["x1"], st.p.out_proj_weight, st.p.out_proj_bias, st.d,
        st.h, st.hd, st.scale, m, n_v, BLOCK_N=BLOCK_N, BLOCK_HD_V=sv.block_hd, BLOCK_HD_T=st.block_hd, **common)
    # F5: LN2 and c_fc
    n_v = _tiles(sv.f)
    _fc_kernel[(n_v + text_side * _tiles(st.f),)](
        wsv, fv["x1"], fv["stats"], fv["h"], sv.p.ln2_weight, sv.p.ln2_bias, sv.p.fc_weight, sv.p.fc_bias, sv.d, sv.f,
        wst, ft["x1"], ft["stats"], ft["h"], st.p.ln2_weight, st.p.ln2_bias, st.p.fc_weight, st.p.fc_bias, st.d, st.f,
        m, eps, n_v, **gemm)
    # F6: QuickGELU and c_proj, residual
    n_v = _tiles(sv.d)
    _cproj_kernel[(n_v + text_side * _tiles(st.d),)](
        wsv, fv["h"], fv["x1"], sv.p.cproj_weight, sv.p.cproj_bias, out_v, sv.d, sv.f,
        wst, ft["h"], ft["x1"], st.p.cproj_weight, st.p.cproj_bias, out_t if compute_text else out_v, st.d, st.f,
        m, n_v, **gemm)
    return out_v, out_t, [wsv, wst, idx_v, idx_t]


def _grads_like(params: CMPASideParams) -> CMPASideParams:
    return CMPASideParams(*(empty(*p.shape, like=p) for p in params))


def cmpa_bwd(grad_visual_out: Optional[Tensor], grad_text_out: Optional[Tensor], visual: Tensor, text: Tensor,
             visual_params: list[Tensor], text_params: list[Tensor], saved: list[Tensor], n_head_visual: int,
             n_head_text: int, fusing: str, eps: float, compute_text: bool
             ) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
    sv = _Side(visual, visual_params, n_head_visual, text.shape[2])
    st = _Side(text, text_params, n_head_text, visual.shape[2])
    m = sv.m
    wsv, wst, idx_v, idx_t = saved
    bwv = empty(sv.bwd["_total"], like=visual, dtype=torch.float32)
    bwt = empty(st.bwd["_total"], like=text, dtype=torch.float32) if compute_text else bwv  # bwv: unused then
    gv = _grads_like(sv.p)
    # without the text side its programs are left out of B1..B7 (its pointers below then go unused)
    gt = _grads_like(st.p) if compute_text else gv
    text_side = 1 if compute_text else 0
    common = dict(BLOCK_M=_block_m(m), PREC=dot_precision(visual.dtype), num_warps=4)
    gemm = dict(common, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_W=BLOCK_W)
    fv, ft, bv, bt = sv.fwd, st.fwd, sv.bwd, st.bwd

    # B1: sum the upstream gradients over the broadcast dimension
    n_v = sv.pool_programs()
    gvo = grad_visual_out if grad_visual_out is not None else visual
    gto = grad_text_out if grad_text_out is not None else text
    _reduce_grad_kernel[(n_v + text_side * st.pool_programs(),)](
        gvo, *gvo.stride(), bwv[bv["dy"]:], sv.nb, sv.d, grad_visual_out is not None,
        gto, *gto.stride(), bwt[bt["dy"]:], st.nb, st.d, grad_text_out is not None, m, n_v,
        BLOCK_B=POOL_BLOCK_B, BLOCK_D=POOL_BLOCK_D)
    # B2: through c_proj and QuickGELU
    n_v = _tiles(sv.f) + _tiles(sv.d, BLOCK_W) * _tiles(sv.f, BLOCK_W)
    n_t = _tiles(st.f) + _tiles(st.d, BLOCK_W) * _tiles(st.f, BLOCK_W)
    _mlp_out_bwd_kernel[(n_v + text_side * n_t,)](
        wsv, fv["h"], bwv, bv["dy"], bv["dh"], sv.p.cproj_weight, gv.cproj_weight, gv.cproj_bias, sv.d, sv.f,
        wst, ft["h"], bwt, bt["dy"], bt["dh"], st.p.cproj_weight, gt.cproj_weight, gt.cproj_bias, st.d, st.f,
        m, n_v, **gemm)
    # B3: through c_fc
    n_v = _tiles(sv.d) + _tiles(sv.f, BLOCK_W) * _tiles(sv.d, BLOCK_W)
    n_t = _tiles(st.d) + _tiles(st.f, BLOCK_W) * _tiles(st.d, BLOCK_W)
    _fc_bwd_kernel[(n_v + text_side * n_t,)](
        wsv, fv["x1"], fv["stats"], bwv, bv["dh"], bv["dc"], sv.p.ln2_weight, sv.p.ln2_bias, sv.p.fc_weight,
        gv.fc_weight, gv.fc_bias, sv.d, sv.f,
        wst, ft["x1"], ft["stats"], bwt, bt["dh"], bt["dc"], st.p.ln2_weight, st.p.ln2_bias, st.p.fc_weight,
        gt.fc_weight, gt.fc_bias, st.d, st.f, m, eps, n_v, **gemm)
    # B4: through LN2 and the output projection
    n_v = _tiles(sv.d) + _tiles(sv.d, BLOCK_W) ** 2
    n_t = _tiles(st.d) + _tiles(st.d, BLOCK_W) ** 2
    _out_bwd_kernel[(n_v + text_side * n_t,)](
        wsv, fv["x1"], fv["stats"], fv["o"], bwv, bv["dy"], bv["dc"], bv["dx1"], bv["do"], sv.p.ln2_weight,
        sv.p.out_proj_weight, gv.out_proj_weight, gv.out_proj_bias, gv.ln2_weight, gv.ln2_bias, sv.d,
        wst, ft["x1"], ft["stats"], ft["o"], bwt, bt["dy"], bt["dc"], bt["dx1"], bt["do"], st.p.ln2_weight,
        st.p.out_proj_weight, gt.out_proj_weight, gt.out_proj_bias, gt.ln2_weight, gt.ln2_bias, st.d, m, n_v, **gemm)
    # B5: attention, one program per head
    _attn_bwd_kernel[(sv.h + text_side * st.h,)](
        wsv, fv["qkv"], fv["probs"], bwv, bv["do"], bv["dqkv"], sv.d, sv.hd, sv.scale,
        wst, ft["qkv"], ft["probs"], bwt, bt["do"], bt["dqkv"], st.d, st.hd, st.scale, m, sv.h,
        BLOCK_M=common["BLOCK_M"], BLOCK_HD_V=sv.block_hd, BLOCK_HD_T=st.block_hd, num_warps=4)
    # B6: through the q, k, v projections
    n_v = _tiles(sv.d) + _tiles(3 * sv.d, BLOCK_W) * _tiles(sv.d, BLOCK_W)
    n_t = _tiles(st.d) + _tiles(3 * st.d, BLOCK_W) * _tiles(st.d, BLOCK_W)
    _in_bwd_kernel[(n_v + text_side * n_t,)](
        wsv, fv["p"], fv["xbar"], fv["stats"], bwv, bv["dqkv"], bv["da"], bv["db"], sv.p.ln1_weight, sv.p.ln1_bias,
        sv.p.in_proj_weight, gv.in_proj_weight, gv.in_proj_bias, sv.d,
        wst, ft["p"], ft["xbar"], ft["stats"], bwt, bt["dqkv"], bt["da"], bt["db"], st.p.ln1_weight, st.p.ln1_bias,
        st.p.in_proj_weight, gt.in_proj_weight, gt.in_proj_bias, st.d, m, n_v, **gemm)
    # B7: through LN1 (both uses) and the cross-modal projection
    n_v = _tiles(st.d) + _tiles(sv.d, BLOCK_W) * _tiles(st.d, BLOCK_W)
    n_t = _tiles(sv.d) + _tiles(st.d, BLOCK_W) * _tiles(sv.d, BLOCK_W)
    _proj_bwd_kernel[(n_v + text_side * n_t,)](
        wsv, fv["p"], fv["xbar"], fv["stats"], bwv, bv["da"], bv["db"], bv["dxbar_ln"], bv["dother"],
        sv.p.ln1_weight, sv.p.proj_weight, gv.proj_weight, gv.proj_bias, gv.ln1_weight, gv.ln1_bias, sv.d,
        wst, ft["p"], ft["xbar"], ft["stats"], bwt, bt["da"], bt["db"], bt["dxbar_ln"], bt["dother"],
        st.p.ln1_weight, st.p.proj_weight, gt.proj_weight, gt.proj_bias, gt.ln1_weight, gt.ln1_bias, st.d,
        m, n_v, **gemm)
    # B8: back through the pooling, at the inputs' shapes
    dvisual, dtext = empty(m, sv.nb, sv.d, like=visual), empty(m, st.nb, st.d, like=text)
    n_v = sv.pool_bwd_programs()
    _pool_bwd_kernel[(n_v + st.pool_bwd_programs(),)](
        dvisual, bwv, idx_v if fusing == "max" else bwv, sv.nb, sv.d, bv["dx1"], bv["dxbar_ln"],
        dtext, bwt, idx_t if fusing == "max" else bwt, st.nb, st.d, bt["dx1"], bt["dxbar_ln"], bv["dother"],
        bt["dother"], m, n_v, TEXT_SIDE=compute_text, FUSING=FUSING_CODES[fusing], BLOCK_B=POOL_BLOCK_B,
        BLOCK_D=POOL_BLOCK_D)
    return dvisual, dtext, list(gv), (list(gt) if compute_text else [p.new_empty(0) for p in st.p])


def supports(problem: dict) -> Optional[str]:
    reason = dtype_reason(problem)
    if reason is not None:
        return reason
    if problem["m"] > MAX_PROMPTS:
        return f"the triton CMPA kernels take up to {MAX_PROMPTS} prompts, got M={problem['m']}"
    if max(problem["dv"], problem["dt"]) > MAX_WIDTH:
        return f"the triton CMPA kernels take widths up to {MAX_WIDTH}, got {problem['dv']} and {problem['dt']}"
    return None


implement(CMPA, cmpa_fwd, cmpa_bwd, supports)
