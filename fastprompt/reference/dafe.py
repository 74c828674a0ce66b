"""Deep Adaptive Feature Enhancement (DAFE) layer fusion, reference implementation (DESIGN.md, op 2).

  prev (N, M, D)   the previous block's output at the prompt rows (instance level)
  task (M, D) or (N, M, D)   the fresh learnable prompt of this block (task level)

  gate modes "channel" (k = D) and "token" (k = 1):
    h    = LayerNorm(prev; ln_weight, ln_bias, eps)
    z    = h W_gᵀ + b_g + task U_gᵀ            (N, M, k)
    gate = σ(z)                                 (a token gate is broadcast over D)
  gate mode "scalar":
    gate = σ(α)                                 (no LayerNorm, one learnable scalar)
  out = gate·prev + (1 − gate)·task            (1 − gate computed as σ(−z), see dafe_forward)

The raw ops are declared in fastprompt/ops/dafe.py (with the order of the parameter lists they take).
"""

import torch
from torch import Tensor

from ..ops.dafe import DAFE
from ._math import compute_dtype, layer_norm_bwd, layer_norm_fwd, linear, linear_bwd, no_autocast


def dafe_forward(prev: Tensor, task: Tensor, params: list[Tensor], gate: str, eps: float):
    """Returns out, gate = σ(z) and its complement 1 − gate = σ(−z) (N, M, k), in the dtype given.

    The complement is computed as σ(−z), not 1 − σ(z): for a saturated gate 1 − σ(z) cancels
    catastrophically (σ(8) = 0.99966 leaves 1 − σ(8) with 4 correct digits in fp32), and the backward
    multiplies by it (dz = dgate·σ(z)·σ(−z)).
    """
    if gate == "scalar":
        (alpha,) = params
        z = alpha.reshape(1, 1, 1)
    else:
        ln_w, ln_b, w_prev, b_prev, w_task = params
        h, _, _ = layer_norm_fwd(prev, ln_w, ln_b, eps)
        z = linear(h, w_prev, b_prev) + linear(task, w_task, None)
    g, g_bar = torch.sigmoid(z), torch.sigmoid(-z)
    return g * prev + g_bar * task, g, g_bar


def dafe_backward(dout: Tensor, prev: Tensor, task: Tensor, params: list[Tensor], gate: str, eps: float):
    """Returns dprev (N, M, D), dtask (task's shape) and the parameter gradients (list, params' order).

    dgate = dout·(prev − task)   (summed over D for a token or scalar gate)
    dz    = dgate·σ(z)·σ(−z)
    dprev = dout·σ(z) + LN_bwd(dz W_g) ;  dtask = dout·σ(−z) + dz U_g
    dW_g  = dzᵀ h ; db_g = Σ dz ; dU_g = dzᵀ task ; dα = Σ dz
    """
    shared = task.dim() == 2
    task_b = task.expand_as(prev) if shared else task
    _, g, g_bar = dafe_forward(prev, task, params, gate, eps)
    dgate = dout * (prev - task_b)
    dprev = dout * g
    dtask = dout * g_bar
    if gate == "scalar":
        dz = dgate.sum() * g * g_bar
        grads = [dz.reshape(params[0].shape)]
    else:
        ln_w, ln_b, w_prev, b_prev, w_task = params
        if gate == "token":
            dgate = dgate.sum(-1, keepdim=True)
        dz = dgate * g * g_bar
        h, mean, rstd = layer_norm_fwd(prev, ln_w, ln_b, eps)
        dh, dw_prev, db_prev = linear_bwd(dz, h, w_prev)
        dtask_gate, dw_task, _ = linear_bwd(dz, task_b, w_task)
        dprev_ln, dln_w, dln_b = layer_norm_bwd(dh, prev, mean, rstd, ln_w)
        dprev = dprev + dprev_ln
        dtask = dtask + dtask_gate
        grads = [dln_w, dln_b, dw_prev, db_prev, dw_task]
    if shared:  # a prompt shared by all N sequences collects the gradient of every one
        dtask = dtask.sum(0)
    return dprev, dtask, grads


def dafe_fwd(prev: Tensor, task: Tensor, params: list[Tensor], gate: str, eps: float) -> tuple[Tensor, list[Tensor]]:
    with no_autocast(prev.device):
        cd = compute_dtype(prev.dtype)
        out, _, _ = dafe_forward(prev.to(cd), task.to(cd), [p.to(cd) for p in params], gate, eps)
    return out.to(prev.dtype), []


def dafe_fwd_fake(prev, task, params, gate, eps):
    """This forward saves nothing (the backward recomputes the gate)."""
    return torch.empty_like(prev, memory_format=torch.contiguous_format), []


def dafe_bwd(grad_out: Tensor, prev: Tensor, task: Tensor, params: list[Tensor], saved: list[Tensor], gate: str,
             eps: float) -> tuple[Tensor, Tensor, list[Tensor]]:
    with no_autocast(prev.device):
        cd = compute_dtype(prev.dtype)
        dprev, dtask, grads = dafe_backward(grad_out.to(cd), prev.to(cd), task.to(cd), [p.to(cd) for p in params],
                                            gate, eps)
    return dprev.to(prev.dtype), dtask.to(task.dtype), [g.to(p.dtype) for g, p in zip(grads, params)]


DAFE.implement("reference", dafe_fwd, dafe_bwd, forward_fake=dafe_fwd_fake)


def dafe_eager(prev: Tensor, task: Tensor, params: list[Tensor], gate: str, eps: float = 1e-5) -> Tensor:
    """The same math as plain differentiable PyTorch in the inputs' own dtype (benchmark baseline)."""
    return dafe_forward(prev, task, params, gate, eps)[0]
