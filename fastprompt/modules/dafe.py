"""`DeepAdaptiveFeatureEnhancement`: DAFE layer fusion of MAP-DAFE as a module (DESIGN.md, op 2)."""

import torch
from torch import Tensor, nn

from ..ops import dafe_fusion
from ..ops.dafe import GATES


class DeepAdaptiveFeatureEnhancement(nn.Module):
    """Gate the previous block's prompt rows (instance level) with this block's fresh prompt (task level).

    out = gate·prev + (1 − gate)·task, gate = σ(norm(prev) W_gᵀ + b_g + task U_gᵀ).

    Args:
        dim: prompt width D.
        gate: "channel" (one gate per channel, W_g and U_g are D×D), "token" (one gate per token, 1×D)
            or "scalar" (gate = σ(alpha), one learnable scalar, no LayerNorm).
        eps: LayerNorm epsilon.
        backend: "auto", "reference", "triton" or "cuda".

    Parameters (names fixed so checkpoints are portable): `norm` (nn.LayerNorm(dim)), `gate_prev`
    (nn.Linear(dim, k): W_g, b_g), `gate_task` (nn.Linear(dim, k, bias=False): U_g), k = dim or 1;
    `alpha` for the scalar gate. Initialisation: every gate starts at exactly 0.5 (gate weights and bias
    zero, alpha zero), an even blend of prev and task, so the three modes start from the same function.

    forward(prev (N, M, D), task (M, D) or (N, M, D)) -> out (N, M, D).
    """

    def __init__(self, dim: int, gate: str = "channel", *, eps: float = 1e-5, backend: str = "auto"):
        super().__init__()
        if gate not in GATES:
            raise ValueError(f"DeepAdaptiveFeatureEnhancement: gate must be one of {GATES}, got {gate!r}")
        self.dim, self.gate, self.backend = dim, gate, backend
        if gate == "scalar":
            self.alpha = nn.Parameter(torch.zeros(()))
        else:
            k = dim if gate == "channel" else 1
            self.norm = nn.LayerNorm(dim, eps=eps)
            self.gate_prev = nn.Linear(dim, k)
            self.gate_task = nn.Linear(dim, k, bias=False)
            for p in (self.gate_prev.weight, self.gate_prev.bias, self.gate_task.weight):
                nn.init.zeros_(p)

    def forward(self, prev: Tensor, task: Tensor) -> Tensor:
        if self.gate == "scalar":
            return dafe_fusion(prev, task, gate="scalar", alpha=self.alpha, backend=self.backend)
        return dafe_fusion(prev, task, gate=self.gate, ln_weight=self.norm.weight, ln_bias=self.norm.bias,
                           gate_prev_weight=self.gate_prev.weight, gate_prev_bias=self.gate_prev.bias,
                           gate_task_weight=self.gate_task.weight, eps=self.norm.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, gate={self.gate!r}, backend={self.backend!r}"
