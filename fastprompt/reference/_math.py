"""Forward and backward of the building blocks the reference ops are made of, in plain PyTorch.

The reference ops run below autograd (they are torch.library custom ops), so their backward passes
are written out here by hand. Every function works on tensors of any leading shape and computes in
the dtype it is given: the callers upcast to `compute_dtype(...)` first.
"""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16 / bf16 / fp32 compute in fp32 (the reference is the exact side); fp64 stays fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sum_leading(t: Tensor) -> Tensor:
    """Sum over every dimension but the last (the bias gradient of a linear or LN layer)."""
    return t.reshape(-1, t.shape[-1]).sum(0)


# ---- LayerNorm over the last dimension --------------------------------------------------------
#   mean = Σx / D ; rstd = 1 / sqrt(Σ(x - mean)² / D + eps) ; x̂ = (x - mean)·rstd ; y = x̂·w + b

def layer_norm_fwd(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).square().mean(-1, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    y = (x - mean) * rstd
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y, mean, rstd


def layer_norm_bwd(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None):
    """Returns dx, dweight (None without weight), dbias (the sum of dy; the caller drops it if unused).

    dx̂ = dy·w ;  dx = rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂))
    """
    xhat = (x - mean) * rstd
    dxhat = dy * weight if weight is not None else dy
    dx = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    dweight = sum_leading(dy * xhat) if weight is not None else None
    return dx, dweight, sum_leading(dy)


# ---- Linear: y = x Wᵀ + b ---------------------------------------------------------------------

def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    y = x @ weight.t()
    return y + bias if bias is not None else y


def linear_bwd(dy: Tensor, x: Tensor, weight: Tensor):
    """Returns dx = dy W, dW = dyᵀ x (summed over the leading dims), db = Σ dy."""
    dx = dy @ weight
    dw = dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
    return dx, dw, sum_leading(dy)


# ---- QuickGELU: g(h) = h·σ(1.702h) --------------------------------------------------------------

QUICK_GELU_ALPHA = 1.702


def quick_gelu(h: Tensor) -> Tensor:
    return h * torch.sigmoid(QUICK_GELU_ALPHA * h)


def quick_gelu_bwd(dg: Tensor, h: Tensor) -> Tensor:
    """g'(h) = σ(αh) + αh·σ(αh)(1 − σ(αh))."""
    s = torch.sigmoid(QUICK_GELU_ALPHA * h)
    return dg * (s + QUICK_GELU_ALPHA * h * s * (1 - s))


# ---- Multi-head scaled dot-product attention without mask -------------------------------------
#   q (Mq, D), k and v (Mk, D) split into H heads of width d = D/H:
#   S_h = q_h k_hᵀ / √d ; P_h = softmax(S_h) ; o_h = P_h v_h ; o = concat_h o_h

def _heads(t: Tensor, n_head: int) -> Tensor:
    m, d = t.shape
    return t.reshape(m, n_head, d // n_head).transpose(0, 1)  # (H, M, d)


def _merge_heads(t: Tensor) -> Tensor:
    h, m, d = t.shape
    return t.transpose(0, 1).reshape(m, h * d)


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, n_head: int):
    """Returns o (Mq, D) and the probabilities P (H, Mq, Mk)."""
    scale = (q.shape[-1] // n_head) ** -0.5
    s = _heads(q, n_head) @ _heads(k, n_head).transpose(1, 2) * scale
    p = torch.softmax(s, dim=-1)
    return _merge_heads(p @ _heads(v, n_head)), p


def attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, p: Tensor, n_head: int):
    """dv_h = P_hᵀ do_h ; dP_h = do_h v_hᵀ ; dS_h = P_h ⊙ (dP_h − rowsum(dP_h ⊙ P_h)) ;
    dq_h = dS_h k_h / √d ; dk_h = dS_hᵀ q_h / √d."""
    scale = (q.shape[-1] // n_head) ** -0.5
    do_h, q_h, k_h, v_h = (_heads(t, n_head) for t in (do, q, k, v))
    dv = p.transpose(1, 2) @ do_h
    dp = do_h @ v_h.transpose(1, 2)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dq = ds @ k_h * scale
    dk = ds.transpose(1, 2) @ q_h * scale
    return _merge_heads(dq), _merge_heads(dk), _merge_heads(dv)


def no_autocast(device: torch.device):
    """The reference computes in the dtypes it chose itself: an enclosing torch.autocast would
    otherwise recast its fp32 matmuls."""
    return torch.autocast(device_type=device.type, enabled=False)
