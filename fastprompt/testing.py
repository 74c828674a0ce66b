"""Numerical comparison rules of DESIGN.md, shared by the tests, the demo and the GPU check.

fp32:       ‖out − ref‖ ≤ 1e-5·‖ref‖ + 1e-6·√numel, with ref evaluated in float64. The absolute term keeps
            exactly-zero references meaningful (the query-path gradients at M = 1).
fp16/bf16:  ‖out − ref‖ ≤ 2·‖eager − ref‖ + the fp32 bound, where eager is the plain PyTorch implementation
            run in the same low precision (flash-attention's rule).
"""

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .ops.outputs import poison_, poisoned_outputs  # noqa: F401  (re-exported for the tests)

RTOL_FP32 = 1e-5
ATOL_PER_SQRT_NUMEL = 1e-6


def error_norm(out: Tensor, ref: Tensor) -> float:
    """‖out − ref‖ in float64; inf when out holds a NaN or an inf (an unwritten, poisoned element)."""
    if out.shape != ref.shape:
        raise AssertionError(f"shape {tuple(out.shape)} differs from the reference's {tuple(ref.shape)}")
    diff = out.detach().double() - ref.detach().double()
    if not torch.isfinite(diff).all():
        return math.inf
    return diff.norm().item()


def fp32_bound(ref: Tensor) -> float:
    return RTOL_FP32 * ref.detach().double().norm().item() + ATOL_PER_SQRT_NUMEL * math.sqrt(ref.numel())


class Verdict(NamedTuple):
    ok: bool
    rel: float  # ‖out − ref‖ / ‖ref‖
    text: str


def check_close(name: str, out: Tensor, ref: Tensor, eager: Optional[Tensor] = None) -> Verdict:
    """Whether `out` is within DESIGN.md's tolerance of the float64 reference `ref`, and a one-line verdict.

    `eager` (the plain PyTorch result in the same low precision) is needed for fp16 / bf16 outputs.
    """
    err = error_norm(out, ref)
    bound = fp32_bound(ref)
    if out.dtype in (torch.float16, torch.bfloat16):
        if eager is None:
            raise ValueError("a low-precision comparison needs the eager low-precision result")
        bound += 2 * error_norm(eager, ref)
    ok = err <= bound
    rel = err / max(ref.detach().double().norm().item(), 1e-300)
    return Verdict(ok, rel, f"{name}: |err| {err:.3e} (rel {rel:.2e}) {'<=' if ok else '>'} bound {bound:.3e}")


def assert_close(name: str, out: Tensor, ref: Tensor, eager: Optional[Tensor] = None) -> None:
    verdict = check_close(name, out, ref, eager)
    if not verdict.ok:
        raise AssertionError(verdict.text)

