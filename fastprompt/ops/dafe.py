"""DAFE layer fusion: input checks, the autograd Function over the backends' raw ops, and the
functional form. The math is in fastprompt/reference/dafe.py."""

from typing import Optional

import torch
from torch import Tensor

from .. import _validation as v
from ..backends import _impls, select
from ..reference.dafe import GATES

OP = "dafe_fusion"


class DeepAdaptiveFeatureEnhancementFunction(torch.autograd.Function):
    """DAFE through one backend's `fastprompt::dafe_{fwd,bwd}_<backend>` pair."""

    @staticmethod
    def forward(ctx, prev: Tensor, task: Tensor, backend: str, gate: str, eps: float, *params: Tensor):
        out, saved = _impls[("dafe", backend)].forward(prev, task, list(params), gate, eps)
        ctx.save_for_backward(prev, task, *params, *saved)
        ctx.config = (backend, gate, eps, len(params))
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        backend, gate, eps, n_params = ctx.config
        prev, task, *rest = ctx.saved_tensors
        dprev, dtask, dparams = _impls[("dafe", backend)].backward(
            grad_out, prev, task, rest[:n_params], rest[n_params:], gate, eps)
        return (dprev, dtask, None, None, None) + tuple(dparams)


def dafe_fusion(prev: Tensor, task: Tensor, *, gate: str = "channel", ln_weight: Optional[Tensor] = None,
                ln_bias: Optional[Tensor] = None, gate_prev_weight: Optional[Tensor] = None,
                gate_prev_bias: Optional[Tensor] = None, gate_task_weight: Optional[Tensor] = None,
                alpha: Optional[Tensor] = None, eps: float = 1e-5, backend: str = "auto") -> Tensor:
    """Deep Adaptive Feature Enhancement: gate the previous block's prompt rows with the fresh prompt.

    out = gate·prev + (1 − gate)·task, with gate = σ(LN(prev) W_gᵀ + b_g + task U_gᵀ) per channel
    ("channel") or per token ("token"), or σ(α) ("scalar", no LayerNorm).

    Args:
        prev: (N, M, D) the previous block's output at the prompt rows. Any strides.
        task: (M, D) shared by all N, or (N, M, D): this block's learnable prompt.
        gate: "channel", "token" or "scalar".
        ln_weight, ln_bias: (D,) the LayerNorm applied to `prev` (channel and token gates).
        gate_prev_weight (k, D), gate_prev_bias (k,), gate_task_weight (k, D): W_g, b_g, U_g with
            k = D for "channel" and 1 for "token".
        alpha: 0-d tensor, the "scalar" gate's logit.
        backend: "auto", "reference", "triton" or "cuda".

    Returns:
        out (N, M, D).
    """
    v.check_tensor(OP, "prev", prev, 3, "(N, M, D)")
    v.check_tensor(OP, "task", task, (2, 3), "(M, D) or (N, M, D)")
    if gate not in GATES:
        raise ValueError(f"{OP}: gate must be one of {GATES}, got {gate!r}")
    n, m, d = prev.shape
    v.check_shape(OP, "task", task, (m, d) if task.dim() == 2 else (n, m, d), why="it must match prev (N, M, D)")
    v.check_nonempty(OP, [("prev", prev)])
    gate_params = dict(ln_weight=ln_weight, ln_bias=ln_bias, gate_prev_weight=gate_prev_weight,
                       gate_prev_bias=gate_prev_bias, gate_task_weight=gate_task_weight)
    if gate == "scalar":
        given = [name for name, t in gate_params.items() if t is not None]
        if given:
            raise ValueError(f"{OP}: the scalar gate takes only alpha, but {', '.join(given)} were given")
        v.check_tensor(OP, "alpha", alpha, 0, "(a 0-d tensor)")
        named = [("alpha", alpha)]
    else:
        if alpha is not None:
            raise ValueError(f"{OP}: alpha belongs to the scalar gate, not the {gate} gate")
        k = d if gate == "channel" else 1
        expected = dict(ln_weight=(d,), ln_bias=(d,), gate_prev_weight=(k, d), gate_prev_bias=(k,),
                        gate_task_weight=(k, d))
        for name, t in gate_params.items():
            if t is None:
                raise ValueError(f"{OP}: the {gate} gate needs {name} of shape {expected[name]}")
            v.check_tensor(OP, name, t)
            v.check_shape(OP, name, t, expected[name], why=f"{gate} gate, width {d}")
        named = list(gate_params.items())
    named = [("prev", prev), ("task", task)] + named
    device = v.check_same_device(OP, named)
    tensors = v.cast_floating([t for _, t in named], v.autocast_dtype(device))
    dtype = v.check_dtypes(OP, [(name, t) for (name, _), t in zip(named, tensors)])
    problem = dict(dtype=dtype, n=n, m=m, d=d, gate=gate, shared_task=task.dim() == 2)
    impl = select("dafe", backend, device, problem)
    return DeepAdaptiveFeatureEnhancementFunction.apply(tensors[0], tensors[1], impl.backend, gate, eps, *tensors[2:])
