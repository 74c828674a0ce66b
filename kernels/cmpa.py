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

The two sides are data, as in csrc/cmpa.cu: every stage is written once for one side (`_<stage>_side`), and
its kernel runs it for the visual side on the first programs and for the text side on the rest. What a stage
reads of a side comes as tuples: a `SideView` (its sizes and its two fp32 workspaces, whose slots the stage
finds with the layout helpers below), the weights the stage uses (`Linear`, `LayerNorm`) and, in the backward,
where their gradients go. The forward keeps its intermediates (all M-row sized) in one fp32 workspace per side,
which is what it saves for the backward; intermediates are fp32 whatever the input dtype, dot operands take the
weights' dtype. fp32 dots are IEEE unless torch allows TF32.
"""

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastprompt.ops.cmpa import CMPA, CMPASideParams
from fastprompt.ops.cmpa_layout import forward_size, offsets
from fastprompt.ops.outputs import empty

from ._common import dot_precision, dtype_reason, implement, next_pow2

MAX_PROMPTS = 64
MAX_WIDTH = 1024
FUSING_CODES = {"mean": 0, "first": 1, "max": 2}


# ---- block sizes -----------------------------------------------------------------------------------------------

class Config(NamedTuple):
    block_n: int  # output columns per GEMM program
    block_w: int  # rows and columns of a weight-gradient tile
    block_k: int  # K step
    pool_block_d: int  # columns per program of the pooling, its backward and the upstream-gradient sum
    pool_block_b: int  # rows (of B or C) per step there
    num_warps: int


# First choices for Hopper (H100), not yet timed there; Ampere takes the same. Narrow output tiles spread every
# GEMM stage's weight reads over many programs (both sides in every launch: 40 to 160 programs per ViT-B/16 GEMM
# stage), which is what the stages' time is at M ≤ 64 rows; the M rows fit one block (BLOCK_M = next_pow2(M),
# at least 16 for tl.dot).
CONFIG = Config(block_n=32, block_w=32, block_k=64, pool_block_d=128, pool_block_b=32, num_warps=4)


def _block_m(m: int) -> int:
    return max(16, next_pow2(m))


def _tiles(n: int, block: int = CONFIG.block_n) -> int:
    """⌈n / block⌉ on the host: triton.cdiv is a constexpr function, a few µs a call, and a forward + backward
    of CMPA counts tiles about 50 times."""
    return -(-n // block)


# ---- what a stage reads of a side ------------------------------------------------------------------------------

class SideView(NamedTuple):
    """One side's sizes and fp32 workspaces, as every stage reads them (the kernels see a tuple)."""

    d: int        # width
    f: int        # MLP width
    heads: int
    head_dim: int
    scale: float  # 1/√head_dim
    ws: Tensor    # the forward workspace (fastprompt/ops/cmpa_layout.py)
    bws: Tensor   # the backward workspace (`backward_layout`; the forward launches pass ws, unused)


class Linear(NamedTuple):  # an nn.Linear's weight (N, K) and bias (N,), or where their gradients go
    weight: Tensor
    bias: Tensor


class LayerNorm(NamedTuple):  # a LayerNorm's affine, or where its gradients go
    weight: Tensor
    bias: Tensor


class Rows(NamedTuple):
    """An (M, B, D) tensor of any strides (an input, or an upstream gradient) and B."""

    x: Tensor
    s_m: int
    s_b: int
    s_d: int
    nb: int


def backward_layout(m: int, d: int, d_other: int, f: int) -> dict[str, tuple[int, int]]:
    """name -> (offset, size) in the backward workspace of one side (the helpers `_dy` ... `_dother` below)."""
    sizes = [("dy", m * d), ("dh", m * f), ("dc", m * d), ("dx1", m * d), ("do", m * d), ("dqkv", 3 * m * d),
             ("da", m * d), ("db", m * d), ("dxbar_ln", m * d), ("dother", m * d_other)]
    return offsets(sizes)


# The slots of the workspaces, from a side's sizes: fastprompt/ops/cmpa_layout.py's forward layout and
# `backward_layout` (tests/ops/test_cmpa.py checks the two against each other).

@triton.jit
def _xbar(s, M):
    return s.ws


@triton.jit
def _p(s, M):
    return s.ws + M * s.d


@triton.jit
def _stats(s, M):
    """6 rows of M: mean and 1/std of LN1(p), of LN1(X̄) and of LN2(x1)."""
    return s.ws + 2 * M * s.d


@triton.jit
def _qkv(s, M):
    return _stats(s, M) + 6 * M


@triton.jit
def _probs(s, M):
    return _qkv(s, M) + 3 * M * s.d


@triton.jit
def _o(s, M):
    return _probs(s, M) + s.heads * M * M


@triton.jit
def _x1(s, M):
    return _o(s, M) + M * s.d


@triton.jit
def _h(s, M):
    return _x1(s, M) + M * s.d


@triton.jit
def _dy(s, M):
    return s.bws


@triton.jit
def _dh(s, M):
    return s.bws + M * s.d


@triton.jit
def _dc(s, M):
    return _dh(s, M) + M * s.f


@triton.jit
def _dx1(s, M):
    return _dc(s, M) + M * s.d


@triton.jit
def _do(s, M):
    return _dx1(s, M) + M * s.d


@triton.jit
def _dqkv(s, M):
    return _do(s, M) + M * s.d


@triton.jit
def _da(s, M):
    return _dqkv(s, M) + 3 * M * s.d


@triton.jit
def _db(s, M):
    return _da(s, M) + M * s.d


@triton.jit
def _dxbar_ln(s, M):
    return _db(s, M) + M * s.d


@triton.jit
def _dother(s, M):
    return _dxbar_ln(s, M) + M * s.d


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


# ---- F1 pooling (and B1, the upstream gradients' sum; B8, the pooling's backward) --------------------------------

@triton.jit
def _pool_side(s, x, idx_ptr, M, pid, FUSING: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """F1: X̄[m, cols] = pool_b x[m, b, cols] into the workspace, the argmax into idx_ptr for `max`."""
    D = s.d
    xbar_ptr = _xbar(s, M)
    n_dt = tl.cdiv(D, BLOCK_D)
    m = pid // n_dt
    cols = (pid % n_dt) * BLOCK_D + tl.arange(0, BLOCK_D)
    cm = cols < D
    base = x.x + m.to(tl.int64) * x.s_m + cols * x.s_d
    if FUSING == 1:  # first
        acc = tl.load(base, mask=cm, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK_D,), tl.float32)
        if FUSING == 2:
            acc += float("-inf")
        best = tl.zeros((BLOCK_D,), tl.int32)
        for b0 in range(0, x.nb, BLOCK_B):
            bs = b0 + tl.arange(0, BLOCK_B)
            msk = (bs < x.nb)[:, None] & cm[None, :]
            v = tl.load(base[None, :] + bs.to(tl.int64)[:, None] * x.s_b, mask=msk, other=0.0).to(tl.float32)
            if FUSING == 0:
                acc += tl.sum(v, 0)
            else:
                v = tl.where(msk, v, float("-inf"))
                # torch.max semantics: a NaN is the maximum (the first NaN's index), else the first index of
                # the largest value; a later chunk wins only if strictly larger, or NaN over a number
                nan = v != v
                has_nan = tl.max(nan.to(tl.int32), 0) > 0
                first_nan = tl.min(tl.where(nan, bs[:, None], 2147483647), 0)
                chunk_max = tl.max(tl.where(nan, float("-inf"), v), 0)
                chunk_idx = tl.min(tl.where(v == chunk_max[None, :], bs[:, None], 2147483647), 0)
                chunk_idx = tl.where(has_nan, first_nan, chunk_idx)
                chunk_max = tl.where(has_nan, float("nan"), chunk_max)
                take = (chunk_max > acc) | (has_nan & (acc == acc))
                best = tl.where(take, chunk_idx, best)
                acc = tl.where(take, chunk_max, acc)
        if FUSING == 0:
            acc = acc / x.nb
        else:
            tl.store(idx_ptr + m * D + cols, best, mask=cm)
    tl.store(xbar_ptr + m * D + cols, acc, mask=cm)


@triton.jit
def _pool_kernel(v, t, v_x, t_x, v_idx, t_idx, M, n_v,
                 FUSING: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    if pid < n_v:
        _pool_side(v, v_x, v_idx, M, pid, FUSING, BLOCK_B, BLOCK_D)
    else:
        _pool_side(t, t_x, t_idx, M, pid - n_v, FUSING, BLOCK_B, BLOCK_D)


@triton.jit
def _reduce_grad_side(s, g, M, pid, HAS_G: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """B1: dY[m, :] = Σ_b dOut[m, b, :] (the broadcast's backward); zero for an output without gradient."""
    D = s.d
    n_dt = tl.cdiv(D, BLOCK_D)
    m = pid // n_dt
    cols = (pid % n_dt) * BLOCK_D + tl.arange(0, BLOCK_D)
    cm = cols < D
    acc = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_G:
        base = g.x + m.to(tl.int64) * g.s_m + cols * g.s_d
        for b0 in range(0, g.nb, BLOCK_B):
            bs = b0 + tl.arange(0, BLOCK_B)
            msk = (bs < g.nb)[:, None] & cm[None, :]
            x = tl.load(base[None, :] + bs.to(tl.int64)[:, None] * g.s_b, mask=msk, other=0.0)
            acc += tl.sum(x.to(tl.float32), 0)
    tl.store(_dy(s, M) + m * D + cols, acc, mask=cm)


@triton.jit
def _reduce_grad_kernel(v, t, v_grad, t_grad, M, n_v, V_HAS_GRAD: tl.constexpr, T_HAS_GRAD: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    if pid < n_v:
        _reduce_grad_side(v, v_grad, M, pid, V_HAS_GRAD, BLOCK_B, BLOCK_D)
    else:
        _reduce_grad_side(t, t_grad, M, pid - n_v, T_HAS_GRAD, BLOCK_B, BLOCK_D)


@triton.jit
def _pool_bwd_side(s, o, dx_ptr, idx_ptr, NB, M, pid, HAS_OWN: tl.constexpr, HAS_CROSS: tl.constexpr,
                   FUSING: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """B8: dX̄ = dx1 + dX̄_ln (this side's own stages) + dŌ (the other side's projection), spread back over B."""
    D = s.d
    n_dt = tl.cdiv(D, BLOCK_D)
    n_bt = tl.cdiv(NB, BLOCK_B)
    m = pid // (n_dt * n_bt)
    rest = pid % (n_dt * n_bt)
    cols = (rest // n_bt) * BLOCK_D + tl.arange(0, BLOCK_D)
    bs = (rest % n_bt) * BLOCK_B + tl.arange(0, BLOCK_B)
    cm = cols < D
    g = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_OWN:
        g += tl.load(_dx1(s, M) + m * D + cols, mask=cm, other=0.0) \
            + tl.load(_dxbar_ln(s, M) + m * D + cols, mask=cm, other=0.0)
    if HAS_CROSS:  # the other side's projection read this side's pooled rows
        g += tl.load(_dother(o, M) + m * D + cols, mask=cm, other=0.0)
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
def _pool_bwd_kernel(v, t, v_dx, t_dx, v_idx, t_idx, v_nb, t_nb, M, n_v, TEXT_SIDE: tl.constexpr,
                     FUSING: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """Without the text side (TEXT_SIDE False) the text input's gradient comes from the visual projection
    alone, and the visual input gets nothing through a text-side projection."""
    pid = tl.program_id(0)
    if pid < n_v:
        _pool_bwd_side(v, t, v_dx, v_idx, v_nb, M, pid, True, TEXT_SIDE, FUSING, BLOCK_B, BLOCK_D)
    else:
        _pool_bwd_side(t, v, t_dx, t_idx, t_nb, M, pid - n_v, TEXT_SIDE, True, FUSING, BLOCK_B, BLOCK_D)


# ---- F2..F6: the forward GEMM stages -------------------------------------------------------------

@triton.jit
def _proj_side(s, o, proj, M, pid, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               PREC: tl.constexpr):
    """F2: p = Ō W_pᵀ + b_p (Ō: the other side's pooled rows)."""
    D, DO = s.d, o.d
    rows = tl.arange(0, BLOCK_M)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, DO, BLOCK_K):
        kc = k0 + tl.arange(0, BLOCK_K)
        a = _tile(_xbar(o, M), rows, kc, M, DO, DO).to(proj.weight.dtype.element_ty)
        acc = tl.dot(a, _wt_tile(proj.weight, kc, cols, DO, D), acc, input_precision=PREC)
    _store_tile(_p(s, M), acc + _bias(proj.bias, cols, D)[None, :], rows, cols, M, D, D)


@triton.jit
def _proj_kernel(v, t, v_proj, t_proj, M, n_v, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    if pid < n_v:  # the visual query comes from the pooled text, and vice versa
        _proj_side(v, t, v_proj, M, pid, BLOCK_M, BLOCK_N, BLOCK_K, PREC)
    else:
        _proj_side(t, v, t_proj, M, pid - n_v, BLOCK_M, BLOCK_N, BLOCK_K, PREC)


@triton.jit
def _ln_linear(src_ptr, M, D, eps, ln, w_ptr, b_ptr, N, out_ptr, ld_out, pid, stats_ptr, STORE_STATS,
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
        a = _ln_tile(src_ptr, rows, kc, M, D, mean, rstd, ln.weight, ln.bias).to(w_ptr.dtype.element_ty)
        acc = tl.dot(a, _wt_tile(w_ptr, kc, cols, D, N), acc, input_precision=PREC)
    _store_tile(out_ptr, acc + _bias(b_ptr, cols, N)[None, :], rows, cols, M, N, ld_out)


@triton.jit
def _qkv_side(s, ln1, in_proj, M, eps, pid, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              PREC: tl.constexpr):
    """F3: q = LN1(p) W_qᵀ + b_q (the first ⌈D/BLOCK_N⌉ programs); [k | v] = LN1(X̄) W_{k,v}ᵀ + b_{k,v}."""
    D = s.d
    n_q = tl.cdiv(D, BLOCK_N)
    if pid < n_q:
        _ln_linear(_p(s, M), M, D, eps, ln1, in_proj.weight, in_proj.bias, D, _qkv(s, M), 3 * D, pid, _stats(s, M),
                   pid == 0, BLOCK_M, BLOCK_N, BLOCK_K, PREC)
    else:
        _ln_linear(_xbar(s, M), M, D, eps, ln1, in_proj.weight + D * D, in_proj.bias + D, 2 * D, _qkv(s, M) + D,
                   3 * D, pid - n_q, _stats(s, M) + 2 * M, pid == n_q, BLOCK_M, BLOCK_N, BLOCK_K, PREC)


@triton.jit
def _qkv_kernel(v, t, v_ln1, t_ln1, v_in, t_in, M, eps, n_v, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    if pid < n_v:
        _qkv_side(v, v_ln1, v_in, M, eps, pid, BLOCK_M, BLOCK_N, BLOCK_K, PREC)
    else:
        _qkv_side(t, t_ln1, t_in, M, eps, pid - n_v, BLOCK_M, BLOCK_N, BLOCK_K, PREC)


@triton.jit
def _attn_out_side(s, out_proj, M, pid, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HD: tl.constexpr,
                   PREC: tl.constexpr):
    """F4: x1 = X̄ + Σ_h (P_h v_h) W_o[:, h]ᵀ + b_o, the attention of each head computed as the K step's
    prologue. Program 0 keeps P and the attention output o for the backward."""
    D, HD = s.d, s.head_dim
    wo_ptr = out_proj.weight
    rows = tl.arange(0, BLOCK_M)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    qkv_ptr = _qkv(s, M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for h in range(s.heads):
        p = _head_probs(qkv_ptr, h, M, D, HD, s.scale, BLOCK_M, BLOCK_HD, PREC)
        if pid == 0:
            _store_tile(_probs(s, M) + h * M * M, p, rows, rows, M, M, M)
        for c0 in range(0, HD, BLOCK_HD):
            c = c0 + tl.arange(0, BLOCK_HD)
            v = tl.load(qkv_ptr + rows[:, None] * (3 * D) + 2 * D + h * HD + c[None, :],
                        mask=(rows < M)[:, None] & (c < HD)[None, :], other=0.0)
            o = tl.dot(p, v, input_precision="ieee")
            if pid == 0:
                _store_tile(_o(s, M) + h * HD, o, rows, c, M, HD, D)
            wm = (c < HD)[:, None] & (cols < D)[None, :]
            wt = tl.load(wo_ptr + cols[None, :] * D + h * HD + c[:, None], mask=wm, other=0.0)
            acc = tl.dot(o.to(wo_ptr.dtype.element_ty), wt, acc, input_precision=PREC)
    x1 = _tile(_xbar(s, M), rows, cols, M, D, D) + acc + _bias(out_proj.bias, cols, D)[None, :]
    _store_tile(_x1(s, M), x1, rows, cols, M, D, D)


@triton.jit
def _attn_out_kernel(v, t, v_out, t_out, M, n_v, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     V_BLOCK_HD: tl.constexpr, T_BLOCK_HD: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    if pid < n_v:
        _attn_out_side(v, v_out, M, pid, BLOCK_M, BLOCK_N, V_BLOCK_HD, PREC)
    else:
        _attn_out_side(t, t_out, M, pid - n_v, BLOCK_M, BLOCK_N, T_BLOCK_HD, PREC)


@triton.jit
def _fc_side(s, ln2, fc, M, eps, pid, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             PREC: tl.constexpr):
    """F5: h = LN2(x1) W_fcᵀ + b_fc."""
    _ln_linear(_x1(s, M), M, s.d, eps, ln2, fc.weight, fc.bias, s.f, _h(s, M), s.f, pid, _stats(s, M) + 4 * M,
               pid == 0, BLOCK_M, BLOCK_N, BLOCK_K, PREC)


@triton.jit
def _fc_kernel(v, t, v_ln2, t_ln2, v_fc, t_fc, M, eps, n_v, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    if pid < n_v:
        _fc_side(v, v_ln2, v_fc, M, eps, pid, BLOCK_M, BLOCK_N, BLOCK_K, PREC)
    else:
        _fc_side(t, t_ln2, t_fc, M, eps, pid - n_v, BLOCK_M, BLOCK_N, BLOCK_K, PREC)


@triton.jit
def _cproj_side(s, cproj, out_ptr, M, pid, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                PREC: tl.constexpr):
    """F6: out = x1 + QuickGELU(h) W_cᵀ + b_c."""
    D, F = s.d, s.f
    rows = tl.arange(0, BLOCK_M)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, F, BLOCK_K):
        kc = k0 + tl.arange(0, BLOCK_K)
        g = _quick_gelu(_tile(_h(s, M), rows, kc, M, F, F)).to(cproj.weight.dtype.element_ty)
        acc = tl.dot(g, _wt_tile(cproj.weight, kc, cols, F, D), acc, input_precision=PREC)
    out = _tile(_x1(s, M), rows, cols, M, D, D) + acc + _bias(cproj.bias, cols, D)[None, :]
    _store_tile(out_ptr, out, rows, cols, M, D, D)


@triton.jit
def _cproj_kernel(v, t, v_cproj, t_cproj, v_out, t_out, M, n_v, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    if pid < n_v:
        _cproj_side(v, v_cproj, v_out, M, pid, BLOCK_M, BLOCK_N, BLOCK_K, PREC)
    else:
        _cproj_side(t, t_cproj, t_out, M, pid - n_v, BLOCK_M, BLOCK_N, BLOCK_K, PREC)


# ---- B2..B7: the backward GEMM stages ---------------------------------------------------------------
# Each stage has two program families: "input" programs own a tile of output columns of a gradient that
# flows on (K loop over the layer's width), "weight" programs own a BLOCK_W × BLOCK_W tile of a weight
# gradient (K = the M prompt rows); the weight programs of the first column tile also write the bias
# and LayerNorm gradients of their rows.

@triton.jit
def _mlp_out_bwd_side(s, cproj, d_cproj, M, pid, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr, PREC: tl.constexpr):
    """B2: dh = (dY W_c)·g'(h) ; dW_c = dYᵀ g(h) ; db_c = Σ_m dY."""
    D, F = s.d, s.f
    rows = tl.arange(0, BLOCK_M)
    dt = cproj.weight.dtype.element_ty
    n_in = tl.cdiv(F, BLOCK_N)
    if pid < n_in:
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, D, BLOCK_K):
            kc = k0 + tl.arange(0, BLOCK_K)
            acc = tl.dot(_tile(_dy(s, M), rows, kc, M, D, D).to(dt), _w_tile(cproj.weight, kc, cols, D, F), acc,
                         input_precision=PREC)
        dh = acc * _quick_gelu_grad(_tile(_h(s, M), rows, cols, M, F, F))
        _store_tile(_dh(s, M), dh, rows, cols, M, F, F)
    else:
        q = pid - n_in
        n_ct = tl.cdiv(F, BLOCK_W)
        wr = (q // n_ct) * BLOCK_W + tl.arange(0, BLOCK_W)
        wc = (q % n_ct) * BLOCK_W + tl.arange(0, BLOCK_W)
        dy = _tile(_dy(s, M), rows, wr, M, D, D)
        g = _quick_gelu(_tile(_h(s, M), rows, wc, M, F, F))
        dw = tl.dot(tl.trans(dy.to(dt)), g.to(dt), input_precision=PREC)
        _store_tile(d_cproj.weight, dw, wr, wc, D, F, F)
        if q % n_ct == 0:
            tl.store(d_cproj.bias + wr, tl.sum(dy, 0).to(d_cproj.bias.dtype.element_ty), mask=wr < D)


@triton.jit
def _mlp_out_bwd_kernel(v, t, v_cproj, t_cproj, v_dcproj, t_dcproj, M, n_v, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    if pid < n_v:
        _mlp_out_bwd_side(v, v_cproj, v_dcproj, M, pid, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_W, PREC)
    else:
        _mlp_out_bwd_side(t, t_cproj, t_dcproj, M, pid - n_v, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_W, PREC)


@triton.jit
def _fc_bwd_side(s, ln2, fc, d_fc, M, pid, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_W: tl.constexpr, PREC: tl.constexpr):
    """B3: dc = dh W_fc ; dW_fc = dhᵀ LN2(x1) ; db_fc = Σ_m dh."""
    D, F = s.d, s.f
    rows = tl.arange(0, BLOCK_M)
    dt = fc.weight.dtype.element_ty
    n_in = tl.cdiv(D, BLOCK_N)
    if pid < n_in:
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, F, BLOCK_K):
            kc = k0 + tl.arange(0, BLOCK_K)
            acc = tl.dot(_tile(_dh(s, M), rows, kc, M, F, F).to(dt), _w_tile(fc.weight, kc, cols, F, D), acc,
                         input_precision=PREC)
        _store_tile(_dc(s, M), acc, rows, cols, M, D, D)
    else:
        q = pid - n_in
        n_ct = tl.cdiv(D, BLOCK_W)
        wr = (q // n_ct) * BLOCK_W + tl.arange(0, BLOCK_W)
        wc = (q % n_ct) * BLOCK_W + tl.arange(0, BLOCK_W)
        mean = tl.load(_stats(s, M) + 4 * M + rows, mask=rows < M, other=0.0)
        rstd = tl.load(_stats(s, M) + 5 * M + rows, mask=rows < M, other=0.0)
        c = _ln_tile(_x1(s, M), rows, wc, M, D, mean, rstd, ln2.weight, ln2.bias)
        dh = _tile(_dh(s, M), rows, wr, M, F, F)
        _store_tile(d_fc.weight, tl.dot(tl.trans(dh.to(dt)), c.to(dt), input_precision=PREC), wr, wc, F, D, D)
        if q % n_ct == 0:
            tl.store(d_fc.bias + wr, tl.sum(dh, 0).to(d_fc.bias.dtype.element_ty), mask=wr < F)


@triton.jit
def _fc_bwd_kernel(v, t, v_ln2, t_ln2, v_fc, t_fc, v_dfc, t_dfc, M, n_v, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    if pid < n_v:
        _fc_bwd_side(v, v_ln2, v_fc, v_dfc, M, pid, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_W, PREC)
    else:
        _fc_bwd_side(t, t_ln2, t_fc, t_dfc, M, pid - n_v, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_W, PREC)


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
def _out_bwd_side(s, ln2, out_proj, d_out, d_ln2, M, pid, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr, PREC: tl.constexpr):
    """B4: dx1 = dY + LN2_bwd(dc) (rebuilt tile by tile) ; do = dx1 W_o ; dW_o = dx1ᵀ o ; db_o = Σ dx1 ;
    dγ2 = Σ dc·x̂, dβ2 = Σ dc."""
    D = s.d
    rows = tl.arange(0, BLOCK_M)
    dt = out_proj.weight.dtype.element_ty
    mean = tl.load(_stats(s, M) + 4 * M + rows, mask=rows < M, other=0.0)
    rstd = tl.load(_stats(s, M) + 5 * M + rows, mask=rows < M, other=0.0)
    c1, c2 = _ln_bwd_consts(_dc(s, M), _x1(s, M), mean, rstd, ln2.weight, M, D, BLOCK_M, BLOCK_K)
    n_in = tl.cdiv(D, BLOCK_N)
    if pid < n_in:
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, D, BLOCK_K):
            kc = k0 + tl.arange(0, BLOCK_K)
            dx, _, _ = _ln_bwd_tile(_dc(s, M), _x1(s, M), rows, kc, M, D, mean, rstd, c1, c2, ln2.weight)
            dx1 = dx + _tile(_dy(s, M), rows, kc, M, D, D)
            acc = tl.dot(dx1.to(dt), _w_tile(out_proj.weight, kc, cols, D, D), acc, input_precision=PREC)
        _store_tile(_do(s, M), acc, rows, cols, M, D, D)
    else:
        q = pid - n_in
        n_ct = tl.cdiv(D, BLOCK_W)
        wr = (q // n_ct) * BLOCK_W + tl.arange(0, BLOCK_W)
        wc = (q % n_ct) * BLOCK_W + tl.arange(0, BLOCK_W)
        dx, xh, dc = _ln_bwd_tile(_dc(s, M), _x1(s, M), rows, wr, M, D, mean, rstd, c1, c2, ln2.weight)
        dx1 = dx + _tile(_dy(s, M), rows, wr, M, D, D)
        o = _tile(_o(s, M), rows, wc, M, D, D)
        _store_tile(d_out.weight, tl.dot(tl.trans(dx1.to(dt)), o.to(dt), input_precision=PREC), wr, wc, D, D, D)
        if q % n_ct == 0:
            rm = wr < D
            _store_tile(_dx1(s, M), dx1, rows, wr, M, D, D)
            tl.store(d_out.bias + wr, tl.sum(dx1, 0).to(d_out.bias.dtype.element_ty), mask=rm)
            tl.store(d_ln2.weight + wr, tl.sum(dc * xh, 0).to(d_ln2.weight.dtype.element_ty), mask=rm)
            tl.store(d_ln2.bias + wr, tl.sum(dc, 0).to(d_ln2.bias.dtype.element_ty), mask=rm)


@triton.jit
def _out_bwd_kernel(v, t, v_ln2, t_ln2, v_out, t_out, v_dout, t_dout, v_dln2, t_dln2, M, n_v,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr,
                    PREC: tl.constexpr):
    pid = tl.program_id(0)
    if pid < n_v:
        _out_bwd_side(v, v_ln2, v_out, v_dout, v_dln2, M, pid, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_W, PREC)
    else:
        _out_bwd_side(t, t_ln2, t_out, t_dout, t_dln2, M, pid - n_v, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_W, PREC)


@triton.jit
def _attn_bwd_side(s, M, h, BLOCK_M: tl.constexpr, BLOCK_HD: tl.constexpr):
    """B5, one head: dv = Pᵀ do ; dP = do vᵀ ; dS = P ⊙ (dP − rowsum(dP ⊙ P)) ; dq = dS k·scale ;
    dk = dSᵀ q·scale."""
    D, HD = s.d, s.head_dim
    rows = tl.arange(0, BLOCK_M)
    rm = rows < M
    p = _tile(_probs(s, M) + h * M * M, rows, rows, M, M, M)
    qkv = _qkv(s, M)
    dqkv = _dqkv(s, M)
    dp = tl.zeros((BLOCK_M, BLOCK_M), tl.float32)
    for c0 in range(0, HD, BLOCK_HD):
        c = c0 + tl.arange(0, BLOCK_HD)
        m = rm[:, None] & (c < HD)[None, :]
        do = tl.load(_do(s, M) + rows[:, None] * D + h * HD + c[None, :], mask=m, other=0.0)
        v = tl.load(qkv + rows[:, None] * (3 * D) + 2 * D + h * HD + c[None, :], mask=m, other=0.0)
        dp = tl.dot(do, tl.trans(v), dp, input_precision="ieee")
        dv = tl.dot(tl.trans(p), do, input_precision="ieee")
        tl.store(dqkv + rows[:, None] * (3 * D) + 2 * D + h * HD + c[None, :], dv, mask=m)
    ds = p * (dp - tl.sum(dp * p, 1)[:, None]) * s.scale
    for c0 in range(0, HD, BLOCK_HD):
        c = c0 + tl.arange(0, BLOCK_HD)
        m = rm[:, None] & (c < HD)[None, :]
        q = tl.load(qkv + rows[:, None] * (3 * D) + h * HD + c[None, :], mask=m, other=0.0)
        k = tl.load(qkv + rows[:, None] * (3 * D) + D + h * HD + c[None, :], mask=m, other=0.0)
        tl.store(dqkv + rows[:, None] * (3 * D) + h * HD + c[None, :], tl.dot(ds, k, input_precision="ieee"), mask=m)
        tl.store(dqkv + rows[:, None] * (3 * D) + D + h * HD + c[None, :],
                 tl.dot(tl.trans(ds), q, input_precision="ieee"), mask=m)


@triton.jit
def _attn_bwd_kernel(v, t, M, n_v, BLOCK_M: tl.constexpr, V_BLOCK_HD: tl.constexpr, T_BLOCK_HD: tl.constexpr):
    pid = tl.program_id(0)  # one program per head
    if pid < n_v:
        _attn_bwd_side(v, M, pid, BLOCK_M, V_BLOCK_HD)
    else:
        _attn_bwd_side(t, M, pid - n_v, BLOCK_M, T_BLOCK_HD)


@triton.jit
def _in_bwd_side(s, ln1, in_proj, d_in, M, pid, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr, PREC: tl.constexpr):
    """B6: da = dq W_q ; db = dk W_k + dv W_v ; dW_in = [dqᵀ a ; dkᵀ b ; dvᵀ b] with a = LN1(p), b = LN1(X̄) ;
    db_in = Σ_m dqkv."""
    D = s.d
    win_ptr = in_proj.weight
    rows = tl.arange(0, BLOCK_M)
    dt = win_ptr.dtype.element_ty
    dqkv = _dqkv(s, M)
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
        _store_tile(_da(s, M), acc_a, rows, cols, M, D, D)
        _store_tile(_db(s, M), acc_b, rows, cols, M, D, D)
    else:
        q = pid - n_in
        n_ct = tl.cdiv(D, BLOCK_W)
        wr = (q // n_ct) * BLOCK_W + tl.arange(0, BLOCK_W)  # rows of W_in, in [0, 3D)
        wc = (q % n_ct) * BLOCK_W + tl.arange(0, BLOCK_W)
        st = _stats(s, M)
        rm = rows < M
        a = _ln_tile(_p(s, M), rows, wc, M, D, tl.load(st + rows, mask=rm, other=0.0),
                     tl.load(st + M + rows, mask=rm, other=0.0), ln1.weight, ln1.bias)
        b = _ln_tile(_xbar(s, M), rows, wc, M, D, tl.load(st + 2 * M + rows, mask=rm, other=0.0),
                     tl.load(st + 3 * M + rows, mask=rm, other=0.0), ln1.weight, ln1.bias)
        g = _tile(dqkv, rows, wr, M, 3 * D, 3 * D)
        # rows of W_q take a, rows of W_k and W_v take b: a tile may straddle the boundary
        g_q = tl.where((wr < D)[None, :], g, 0.0)
        g_kv = tl.where((wr >= D)[None, :], g, 0.0)
        dw = tl.dot(tl.trans(g_q.to(dt)), a.to(dt), input_precision=PREC)
        dw = tl.dot(tl.trans(g_kv.to(dt)), b.to(dt), dw, input_precision=PREC)
        _store_tile(d_in.weight, dw, wr, wc, 3 * D, D, D)
        if q % n_ct == 0:
            tl.store(d_in.bias + wr, tl.sum(g, 0).to(d_in.bias.dtype.element_ty), mask=wr < 3 * D)


@triton.jit
def _in_bwd_kernel(v, t, v_ln1, t_ln1, v_in, t_in, v_din, t_din, M, n_v, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    if pid < n_v:
        _in_bwd_side(v, v_ln1, v_in, v_din, M, pid, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_W, PREC)
    else:
        _in_bwd_side(t, t_ln1, t_in, t_din, M, pid - n_v, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_W, PREC)


@triton.jit
def _proj_bwd_side(s, o, ln1, proj, d_proj, d_ln1, M, pid, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr, PREC: tl.constexpr):
    """B7: dp = LN1_bwd(da; p), dX̄_ln = LN1_bwd(db; X̄) ; dŌ = dp W_p ; dW_p = dpᵀ Ō ; db_p = Σ dp ;
    dγ1 = Σ da·â + db·b̂, dβ1 = Σ da + db (Ō: the other side's pooled rows)."""
    D, DO = s.d, o.d
    rows = tl.arange(0, BLOCK_M)
    rm = rows < M
    dt = proj.weight.dtype.element_ty
    st = _stats(s, M)
    mean_a = tl.load(st + rows, mask=rm, other=0.0)
    rstd_a = tl.load(st + M + rows, mask=rm, other=0.0)
    c1a, c2a = _ln_bwd_consts(_da(s, M), _p(s, M), mean_a, rstd_a, ln1.weight, M, D, BLOCK_M, BLOCK_K)
    n_in = tl.cdiv(DO, BLOCK_N)
    if pid < n_in:
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, D, BLOCK_K):
            kc = k0 + tl.arange(0, BLOCK_K)
            dp, _, _ = _ln_bwd_tile(_da(s, M), _p(s, M), rows, kc, M, D, mean_a, rstd_a, c1a, c2a, ln1.weight)
            acc = tl.dot(dp.to(dt), _w_tile(proj.weight, kc, cols, D, DO), acc, input_precision=PREC)
        _store_tile(_dother(s, M), acc, rows, cols, M, DO, DO)
    else:
        q = pid - n_in
        n_ct = tl.cdiv(DO, BLOCK_W)
        wr = (q // n_ct) * BLOCK_W + tl.arange(0, BLOCK_W)
        wc = (q % n_ct) * BLOCK_W + tl.arange(0, BLOCK_W)
        dp, xa, da = _ln_bwd_tile(_da(s, M), _p(s, M), rows, wr, M, D, mean_a, rstd_a, c1a, c2a, ln1.weight)
        other = _tile(_xbar(o, M), rows, wc, M, DO, DO)
        _store_tile(d_proj.weight, tl.dot(tl.trans(dp.to(dt)), other.to(dt), input_precision=PREC), wr, wc, D, DO,
                    DO)
        if q % n_ct == 0:
            mean_b = tl.load(st + 2 * M + rows, mask=rm, other=0.0)
            rstd_b = tl.load(st + 3 * M + rows, mask=rm, other=0.0)
            c1b, c2b = _ln_bwd_consts(_db(s, M), _xbar(s, M), mean_b, rstd_b, ln1.weight, M, D, BLOCK_M, BLOCK_K)
            dxb, xb, db = _ln_bwd_tile(_db(s, M), _xbar(s, M), rows, wr, M, D, mean_b, rstd_b, c1b, c2b,
                                       ln1.weight)
            _store_tile(_dxbar_ln(s, M), dxb, rows, wr, M, D, D)
            rmw = wr < D
            tl.store(d_proj.bias + wr, tl.sum(dp, 0).to(d_proj.bias.dtype.element_ty), mask=rmw)
            tl.store(d_ln1.weight + wr, tl.sum(da * xa + db * xb, 0).to(d_ln1.weight.dtype.element_ty), mask=rmw)
            tl.store(d_ln1.bias + wr, tl.sum(da + db, 0).to(d_ln1.bias.dtype.element_ty), mask=rmw)


@triton.jit
def _proj_bwd_kernel(v, t, v_ln1, t_ln1, v_proj, t_proj, v_dproj, t_dproj, v_dln1, t_dln1, M, n_v,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr,
                     PREC: tl.constexpr):
    pid = tl.program_id(0)
    if pid < n_v:  # the visual projection reads the pooled text (Ō), and vice versa
        _proj_bwd_side(v, t, v_ln1, v_proj, v_dproj, v_dln1, M, pid, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_W, PREC)
    else:
        _proj_bwd_side(t, v, t_ln1, t_proj, t_dproj, t_dln1, M, pid - n_v, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_W,
                       PREC)


# ---- launchers ---------------------------------------------------------------------------------------

class _Side:
    """One side on the host: its input x (M, B, D), its 14 parameters grouped by layer, its sizes, and the
    programs each stage gives it."""

    def __init__(self, x: Tensor, params: list[Tensor], n_head: int, d_other: int):
        self.m, self.nb, self.d = x.shape
        p = CMPASideParams(*(t.contiguous() for t in params))
        self.params = p
        self.proj, self.in_proj = Linear(p.proj_weight, p.proj_bias), Linear(p.in_proj_weight, p.in_proj_bias)
        self.out_proj, self.fc = Linear(p.out_proj_weight, p.out_proj_bias), Linear(p.fc_weight, p.fc_bias)
        self.cproj = Linear(p.cproj_weight, p.cproj_bias)
        self.ln1, self.ln2 = LayerNorm(p.ln1_weight, p.ln1_bias), LayerNorm(p.ln2_weight, p.ln2_bias)
        self.f = p.fc_weight.shape[0]
        self.heads, self.head_dim = n_head, self.d // n_head
        self.d_other = d_other
        self.block_hd = max(16, min(64, next_pow2(self.head_dim)))

    def fwd_size(self, compute: bool = True) -> int:
        """Floats of the forward workspace: all of it, or only the pooled rows when the side is not computed."""
        return forward_size(self.m, self.d, self.heads, self.f, compute)

    def bwd_size(self) -> int:
        return backward_layout(self.m, self.d, self.d_other, self.f)["_total"][0]

    def view(self, ws: Tensor, bws: Optional[Tensor] = None) -> SideView:
        return SideView(self.d, self.f, self.heads, self.head_dim, self.head_dim ** -0.5, ws,
                        ws if bws is None else bws)

    def pool_programs(self) -> int:
        return self.m * _tiles(self.d, CONFIG.pool_block_d)

    def pool_bwd_programs(self) -> int:
        return self.pool_programs() * _tiles(self.nb, CONFIG.pool_block_b)


def _rows(x: Tensor) -> Rows:
    return Rows(x, *x.stride(), x.shape[1])


def cmpa_fwd(visual: Tensor, text: Tensor, visual_params: list[Tensor], text_params: list[Tensor],
             n_head_visual: int, n_head_text: int, fusing: str, eps: float, compute_text: bool
             ) -> tuple[Tensor, Tensor, list[Tensor]]:
    sv = _Side(visual, visual_params, n_head_visual, text.shape[2])
    st = _Side(text, text_params, n_head_text, visual.shape[2])
    m = sv.m
    wsv = empty(sv.fwd_size(), like=visual, dtype=torch.float32)
    # without the text side only its pooled rows (the head of its workspace) are computed and kept
    wst = empty(st.fwd_size(compute_text), like=text, dtype=torch.float32)
    v, t = sv.view(wsv), st.view(wst)
    is_max = fusing == "max"
    idx_v = empty(m, sv.d, like=visual, dtype=torch.int32) if is_max else visual.new_empty(0, dtype=torch.int32)
    idx_t = empty(m, st.d, like=text, dtype=torch.int32) if is_max else text.new_empty(0, dtype=torch.int32)
    out_v = empty(m, sv.d, like=visual)
    out_t = empty(m, st.d, like=text) if compute_text else text.new_empty(0)
    common = dict(M=m, BLOCK_M=_block_m(m), PREC=dot_precision(visual.dtype), num_warps=CONFIG.num_warps)
    gemm = dict(common, BLOCK_N=CONFIG.block_n, BLOCK_K=CONFIG.block_k)
    text_side = 1 if compute_text else 0  # without the text side its programs are left out of F2..F6

    # F1: pooling (both sides always: the text side's pooled rows feed the visual query)
    n_v = sv.pool_programs()
    _pool_kernel[(n_v + st.pool_programs(),)](
        v=v, t=t, v_x=_rows(visual), t_x=_rows(text), v_idx=idx_v if is_max else wsv, t_idx=idx_t if is_max else wst,
        M=m, n_v=n_v, FUSING=FUSING_CODES[fusing], BLOCK_B=CONFIG.pool_block_b, BLOCK_D=CONFIG.pool_block_d)
    # F2: the query-side projections from the other modality
    n_v = _tiles(sv.d)
    _proj_kernel[(n_v + text_side * _tiles(st.d),)](v=v, t=t, v_proj=sv.proj, t_proj=st.proj, n_v=n_v, **gemm)
    # F3: LN1 and the q, k, v projections
    n_v = _tiles(sv.d) + _tiles(2 * sv.d)
    _qkv_kernel[(n_v + text_side * (_tiles(st.d) + _tiles(2 * st.d)),)](
        v=v, t=t, v_ln1=sv.ln1, t_ln1=st.ln1, v_in=sv.in_proj, t_in=st.in_proj, eps=eps, n_v=n_v, **gemm)
    # F4: attention and the output projection, residual
    n_v = _tiles(sv.d)
    _attn_out_kernel[(n_v + text_side * _tiles(st.d),)](
        v=v, t=t, v_out=sv.out_proj, t_out=st.out_proj, n_v=n_v, BLOCK_N=CONFIG.block_n, V_BLOCK_HD=sv.block_hd,
        T_BLOCK_HD=st.block_hd, **common)
    # F5: LN2 and c_fc
    n_v = _tiles(sv.f)
    _fc_kernel[(n_v + text_side * _tiles(st.f),)](
        v=v, t=t, v_ln2=sv.ln2, t_ln2=st.ln2, v_fc=sv.fc, t_fc=st.fc, eps=eps, n_v=n_v, **gemm)
    # F6: QuickGELU and c_proj, residual
    n_v = _tiles(sv.d)
    _cproj_kernel[(n_v + text_side * _tiles(st.d),)](
        v=v, t=t, v_cproj=sv.cproj, t_cproj=st.cproj, v_out=out_v, t_out=out_t if compute_text else out_v, n_v=n_v,
        **gemm)
    return out_v, out_t, [wsv, wst, idx_v, idx_t]


def _grads_like(side: _Side) -> tuple[CMPASideParams, dict]:
    """Where the backward writes a side's parameter gradients: in the op's order, and grouped by layer."""
    g = CMPASideParams(*(empty(*p.shape, like=p) for p in side.params))
    return g, dict(proj=Linear(g.proj_weight, g.proj_bias), in_proj=Linear(g.in_proj_weight, g.in_proj_bias),
                   out_proj=Linear(g.out_proj_weight, g.out_proj_bias), fc=Linear(g.fc_weight, g.fc_bias),
                   cproj=Linear(g.cproj_weight, g.cproj_bias), ln1=LayerNorm(g.ln1_weight, g.ln1_bias),
                   ln2=LayerNorm(g.ln2_weight, g.ln2_bias))


def cmpa_bwd(grad_visual_out: Optional[Tensor], grad_text_out: Optional[Tensor], visual: Tensor, text: Tensor,
             visual_params: list[Tensor], text_params: list[Tensor], saved: list[Tensor], n_head_visual: int,
             n_head_text: int, fusing: str, eps: float, compute_text: bool
             ) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
    sv = _Side(visual, visual_params, n_head_visual, text.shape[2])
    st = _Side(text, text_params, n_head_text, visual.shape[2])
    m = sv.m
    wsv, wst, idx_v, idx_t = saved
    bwv = empty(sv.bwd_size(), like=visual, dtype=torch.float32)
    bwt = empty(st.bwd_size(), like=text, dtype=torch.float32) if compute_text else bwv  # bwv: unused then
    v, t = sv.view(wsv, bwv), st.view(wst, bwt)
    gv, dv = _grads_like(sv)
    # without the text side its programs are left out of B1..B7 (its pointers below then go unused)
    gt, dt = _grads_like(st) if compute_text else (gv, dv)
    text_side = 1 if compute_text else 0
    common = dict(M=m, BLOCK_M=_block_m(m), PREC=dot_precision(visual.dtype), num_warps=CONFIG.num_warps)
    gemm = dict(common, BLOCK_N=CONFIG.block_n, BLOCK_K=CONFIG.block_k, BLOCK_W=CONFIG.block_w)
    bw = CONFIG.block_w

    # B1: sum the upstream gradients over the broadcast dimension
    n_v = sv.pool_programs()
    _reduce_grad_kernel[(n_v + text_side * st.pool_programs(),)](
        v=v, t=t, v_grad=_rows(grad_visual_out if grad_visual_out is not None else visual),
        t_grad=_rows(grad_text_out if grad_text_out is not None else text), M=m, n_v=n_v,
        V_HAS_GRAD=grad_visual_out is not None, T_HAS_GRAD=grad_text_out is not None,
        BLOCK_B=CONFIG.pool_block_b, BLOCK_D=CONFIG.pool_block_d)
    # B2: through c_proj and QuickGELU
    n_v = _tiles(sv.f) + _tiles(sv.d, bw) * _tiles(sv.f, bw)
    n_t = _tiles(st.f) + _tiles(st.d, bw) * _tiles(st.f, bw)
    _mlp_out_bwd_kernel[(n_v + text_side * n_t,)](
        v=v, t=t, v_cproj=sv.cproj, t_cproj=st.cproj, v_dcproj=dv["cproj"], t_dcproj=dt["cproj"], n_v=n_v, **gemm)
    # B3: through c_fc
    n_v = _tiles(sv.d) + _tiles(sv.f, bw) * _tiles(sv.d, bw)
    n_t = _tiles(st.d) + _tiles(st.f, bw) * _tiles(st.d, bw)
    _fc_bwd_kernel[(n_v + text_side * n_t,)](
        v=v, t=t, v_ln2=sv.ln2, t_ln2=st.ln2, v_fc=sv.fc, t_fc=st.fc, v_dfc=dv["fc"], t_dfc=dt["fc"], n_v=n_v,
        **gemm)
    # B4: through LN2 and the output projection
    n_v = _tiles(sv.d) + _tiles(sv.d, bw) ** 2
    n_t = _tiles(st.d) + _tiles(st.d, bw) ** 2
    _out_bwd_kernel[(n_v + text_side * n_t,)](
        v=v, t=t, v_ln2=sv.ln2, t_ln2=st.ln2, v_out=sv.out_proj, t_out=st.out_proj, v_dout=dv["out_proj"],
        t_dout=dt["out_proj"], v_dln2=dv["ln2"], t_dln2=dt["ln2"], n_v=n_v, **gemm)
    # B5: attention, one program per head
    _attn_bwd_kernel[(sv.heads + text_side * st.heads,)](
        v=v, t=t, M=m, n_v=sv.heads, BLOCK_M=common["BLOCK_M"], V_BLOCK_HD=sv.block_hd, T_BLOCK_HD=st.block_hd,
        num_warps=CONFIG.num_warps)
    # B6: through the q, k, v projections
    n_v = _tiles(sv.d) + _tiles(3 * sv.d, bw) * _tiles(sv.d, bw)
    n_t = _tiles(st.d) + _tiles(3 * st.d, bw) * _tiles(st.d, bw)
    _in_bwd_kernel[(n_v + text_side * n_t,)](
        v=v, t=t, v_ln1=sv.ln1, t_ln1=st.ln1, v_in=sv.in_proj, t_in=st.in_proj, v_din=dv["in_proj"],
        t_din=dt["in_proj"], n_v=n_v, **gemm)
    # B7: through LN1 (both uses) and the cross-modal projection
    n_v = _tiles(st.d) + _tiles(sv.d, bw) * _tiles(st.d, bw)
    n_t = _tiles(sv.d) + _tiles(st.d, bw) * _tiles(sv.d, bw)
    _proj_bwd_kernel[(n_v + text_side * n_t,)](
        v=v, t=t, v_ln1=sv.ln1, t_ln1=st.ln1, v_proj=sv.proj, t_proj=st.proj, v_dproj=dv["proj"],
        t_dproj=dt["proj"], v_dln1=dv["ln1"], t_dln1=dt["ln1"], n_v=n_v, **gemm)
    # B8: back through the pooling, at the inputs' shapes
    dvisual, dtext = empty(m, sv.nb, sv.d, like=visual), empty(m, st.nb, st.d, like=text)
    n_v = sv.pool_bwd_programs()
    _pool_bwd_kernel[(n_v + st.pool_bwd_programs(),)](
        v=v, t=t, v_dx=dvisual, t_dx=dtext, v_idx=idx_v if fusing == "max" else bwv,
        t_idx=idx_t if fusing == "max" else bwt, v_nb=sv.nb, t_nb=st.nb, M=m, n_v=n_v, TEXT_SIDE=compute_text,
        FUSING=FUSING_CODES[fusing], BLOCK_B=CONFIG.pool_block_b, BLOCK_D=CONFIG.pool_block_d)
    return dvisual, dtext, list(gv), (list(gt) if compute_text else [p.new_empty(0) for p in st.params])


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
