"""DAFE layer fusion (`dafe`), declared: the raw ops' schemas and fakes, the problem the backends read, and the
checks every input passes before any backend runs. The math is fastprompt/reference/dafe.py; the functional
form is in fastprompt/ops/functional.py, the module in fastprompt/modules/dafe.py.

Parameter lists, in the order the raw ops take and return them:
  channel / token: [ln_weight (D), ln_bias (D), gate_prev_weight W_g (k, D), gate_prev_bias b_g (k),
                    gate_task_weight U_g (k, D)], k = D (channel) or 1 (token)
  scalar:          [alpha ()]
"""

from typing import Optional

import torch
from torch import Tensor

from .. import _validation as v
from ..declaration import Op

GATES = ("channel", "token", "scalar")


def _forward_fake(prev, task, params, gate, eps):
    """The kernel backends' forward: out, and what they save, the fp32 gate logits z (N, M, k) and the
    LayerNorm's row statistics (none for the scalar gate)."""
    n, m, d = prev.shape
    out = prev.new_empty(n, m, d)
    if gate == "scalar":
        return out, []
    k = params[2].shape[0]
    return out, [prev.new_empty(n, m, k, dtype=torch.float32), prev.new_empty(n * m, dtype=torch.float32),
                 prev.new_empty(n * m, dtype=torch.float32)]


def _backward_fake(grad_out, prev, task, params, saved, gate, eps):
    return (torch.empty_like(prev, memory_format=torch.contiguous_format),
            torch.empty_like(task, memory_format=torch.contiguous_format),
            [torch.empty_like(p) for p in params])


DAFE = Op(
    "dafe",
    forward="(Tensor prev, Tensor task, Tensor[] params, str gate, float eps) -> (Tensor, Tensor[])",
    backward="(Tensor grad_out, Tensor prev, Tensor task, Tensor[] params, Tensor[] saved, str gate, float eps) "
             "-> (Tensor, Tensor, Tensor[])",
    forward_fake=_forward_fake,
    backward_fake=_backward_fake,
    # prev (n, m, d); shared_task: task is (M, D), shared by the n sequences
    problem=("dtype", "n", "m", "d", "gate", "shared_task"),
)


def check_inputs(prev: Tensor, task: Tensor, gate: str, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                 gate_prev_weight: Optional[Tensor], gate_prev_bias: Optional[Tensor],
                 gate_task_weight: Optional[Tensor], alpha: Optional[Tensor]
                 ) -> tuple[list[Tensor], torch.device, dict]:
    """Checks everything the raw ops assume; returns the tensors (prev, task, then the gate's parameters in the
    raw ops' order, cast to the autocast dtype under autocast), their device and the problem description."""
    v.check_tensor(DAFE.name, "prev", prev, 3, "(N, M, D)")
    v.check_tensor(DAFE.name, "task", task, (2, 3), "(M, D) or (N, M, D)")
    if gate not in GATES:
        raise ValueError(f"{DAFE.name}: gate must be one of {GATES}, got {gate!r}")
    n, m, d = prev.shape
    v.check_shape(DAFE.name, "task", task, (m, d) if task.dim() == 2 else (n, m, d),
                  why="it must match prev (N, M, D)")
    v.check_nonempty(DAFE.name, [("prev", prev)])
    gate_params = dict(ln_weight=ln_weight, ln_bias=ln_bias, gate_prev_weight=gate_prev_weight,
                       gate_prev_bias=gate_prev_bias, gate_task_weight=gate_task_weight)
    if gate == "scalar":
        given = [name for name, t in gate_params.items() if t is not None]
        if given:
            raise ValueError(f"{DAFE.name}: the scalar gate takes only alpha, but {', '.join(given)} were given")
        v.check_tensor(DAFE.name, "alpha", alpha, 0, "(a 0-d tensor)")
        named = [("alpha", alpha)]
    else:
        if alpha is not None:
            raise ValueError(f"{DAFE.name}: alpha belongs to the scalar gate, not the {gate} gate")
        k = d if gate == "channel" else 1
        expected = dict(ln_weight=(d,), ln_bias=(d,), gate_prev_weight=(k, d), gate_prev_bias=(k,),
                        gate_task_weight=(k, d))
        for name, t in gate_params.items():
            if t is None:
                raise ValueError(f"{DAFE.name}: the {gate} gate needs {name} of shape {expected[name]}")
            v.check_tensor(DAFE.name, name, t)
            v.check_shape(DAFE.name, name, t, expected[name], why=f"{gate} gate, width {d}")
        named = list(gate_params.items())
    named = [("prev", prev), ("task", task)] + named
    device = v.check_same_device(DAFE.name, named)
    tensors = v.cast_floating([t for _, t in named], v.autocast_dtype(device))
    dtype = v.check_dtypes(DAFE.name, [(name, t) for (name, _), t in zip(named, tensors)])
    problem = DAFE.problem_of(dtype=dtype, n=n, m=m, d=d, gate=gate, shared_task=task.dim() == 2)
    return tensors, device, problem
