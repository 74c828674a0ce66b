"""Prompt insertion fused with LayerNorm on packed sequences (`insert_prompts_packed`), declared: the raw ops'
schemas and fakes, the problem the backends read, and the checks every input passes before any backend runs.
The math is fastprompt/reference/insert_prompts_packed.py; users reach it through `insert_prompts(...,
cu_seqlens=)` (fastprompt/ops/functional.py).

x (T, D) holds N sequences back to back, sequence n in rows [cu[n], cu[n+1]); the prompts replace rows
cu[n] + s_n + [0, M) of each (mode "replace" only: every sequence keeps its length).
"""

from typing import Optional

import torch
from torch import Tensor

from .. import _validation as v
from ..declaration import Op
from .insert_prompts import check_layer_norm, check_start, input_grads_fake


def _forward_fake(x, prompts, cu_seqlens, start, starts, ln_weight, ln_bias, eps):
    """The kernel backends' forward: y, y_ln, and what they save, the LayerNorm's row statistics (fp32)."""
    if ln_weight is None and ln_bias is None:
        return x.new_empty(x.shape), x.new_empty(0), []
    stats = [x.new_empty(x.shape[0], dtype=torch.float32) for _ in range(2)]
    return x.new_empty(x.shape), x.new_empty(x.shape), stats


def _backward_fake(grad_y, grad_y_ln, x, prompts, cu_seqlens, start, starts, ln_weight, ln_bias, saved, eps):
    return input_grads_fake(x, prompts, ln_weight, ln_bias)


INSERT_PROMPTS_PACKED = Op(
    "insert_prompts_packed",
    # y (T, D), y_ln (empty without LayerNorm parameters), saved; cu_seqlens (N + 1,) int64
    forward="(Tensor x, Tensor prompts, Tensor cu_seqlens, SymInt start, Tensor? starts, Tensor? ln_weight, "
            "Tensor? ln_bias, float eps) -> (Tensor, Tensor, Tensor[])",
    backward="(Tensor? grad_y, Tensor? grad_y_ln, Tensor x, Tensor prompts, Tensor cu_seqlens, SymInt start, "
             "Tensor? starts, Tensor? ln_weight, Tensor? ln_bias, Tensor[] saved, float eps) "
             "-> (Tensor, Tensor, Tensor[])",
    forward_fake=_forward_fake,
    backward_fake=_backward_fake,
    # n sequences in t rows of width d, m prompt rows each
    problem=("dtype", "n", "t", "m", "d", "mode", "shared_prompts", "per_sequence_start", "layer_norm"),
)


def _check_cu_seqlens(op: str, cu_seqlens, device: torch.device) -> int:
    """Type, shape and device of cu_seqlens; returns N."""
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"{op}: cu_seqlens must be an int32 or int64 tensor (N + 1,), got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"{op}: cu_seqlens must be 1-D (N + 1,) with N >= 1 sequences, got shape "
                         f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"{op}: cu_seqlens is on {cu_seqlens.device} but x is on {device}")
    return cu_seqlens.shape[0] - 1


def _check_packed_values(op: str, cu: Tensor, start: int, starts: Optional[Tensor], total: int, m: int) -> None:
    """cu_seqlens runs from 0 to T without decreasing, and every sequence holds its M prompt rows. One host
    transfer (a device sync on CUDA) for all of it; more only on the way to an error."""
    lengths = cu[1:] - cu[:-1]
    room = lengths - m - (starts if starts is not None else start)  # rows left after the prompts, >= 0
    lo_start = starts.min() if starts is not None else torch.zeros((), dtype=torch.int64, device=cu.device)
    first, last, shortest, tight, least = torch.stack([cu[0], cu[-1], lengths.min(), room.min(), lo_start]).tolist()
    if first != 0:
        raise ValueError(f"{op}: cu_seqlens must start at 0, got {first}")
    if last != total:
        raise ValueError(f"{op}: cu_seqlens ends at {last} but x has T={total} rows")
    if shortest < 0:
        raise ValueError(f"{op}: cu_seqlens must not decrease (a sequence of length {shortest})")
    if least < 0:
        raise ValueError(f"{op}: start holds an offset of {least}; offsets must be >= 0")
    if tight < 0:
        n = int(room.argmin())
        s = int(starts[n]) if starts is not None else start
        raise ValueError(f"{op}: sequence {n} has length {int(lengths[n])}, too short for M={m} prompt rows from "
                         f"start={s}: start + M <= length must hold for every sequence")


def check_inputs(x: Tensor, prompts: Tensor, start, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                 mode: str, cu_seqlens, check_values: bool):
    """Checks everything the raw ops assume; returns (x, prompts, ln_weight, ln_bias) cast to the autocast dtype
    under autocast, cu_seqlens as dense int64, the int start and the per-sequence starts (or None), and the
    problem description."""
    op = INSERT_PROMPTS_PACKED.name
    v.check_tensor(op, "x", x, 2, "(T, D): packed sequences, with cu_seqlens")
    v.check_tensor(op, "prompts", prompts, (2, 3), "(M, D) or (N, M, D)")
    if mode != "replace":
        raise ValueError(f"{op}: packed streams (cu_seqlens) take mode 'replace' only, got {mode!r}")
    total, d = x.shape
    m = prompts.shape[-2]
    n = _check_cu_seqlens(op, cu_seqlens, x.device)
    if prompts.shape[-1] != d:
        raise ValueError(f"{op}: prompts have width {prompts.shape[-1]} but x has width {d}")
    if prompts.dim() == 3 and prompts.shape[0] != n:
        raise ValueError(f"{op}: per-sequence prompts have N={prompts.shape[0]} but cu_seqlens holds N={n} "
                         "sequences")
    v.check_nonempty(op, [("x", x), ("prompts", prompts)])
    check_layer_norm(op, ln_weight, ln_bias, d)
    named = v.present([("x", x), ("prompts", prompts), ("ln_weight", ln_weight), ("ln_bias", ln_bias)])
    device = v.check_same_device(op, named)
    # types here; the range against each sequence's length with cu_seqlens' values below
    if isinstance(start, int) and not isinstance(start, bool):
        if start < 0:
            raise ValueError(f"{op}: start={start} is out of range: start >= 0")
        starts = None
    else:
        start, starts = check_start(op, start, n, total, 0, mode, device, check_range=False)
    cu_seqlens = cu_seqlens.to(torch.int64).contiguous()  # the kernels index it densely
    if check_values and not torch.compiler.is_compiling():
        _check_packed_values(op, cu_seqlens, start, starts, total, m)
    x, prompts, ln_weight, ln_bias = v.cast_floating([x, prompts, ln_weight, ln_bias], v.autocast_dtype(device))
    dtype = v.check_dtypes(op, v.present([("x", x), ("prompts", prompts), ("ln_weight", ln_weight),
                                          ("ln_bias", ln_bias)]))
    problem = INSERT_PROMPTS_PACKED.problem_of(dtype=dtype, n=n, t=total, m=m, d=d, mode=mode,
                                               shared_prompts=prompts.dim() == 2,
                                               per_sequence_start=starts is not None,
                                               layer_norm=ln_weight is not None or ln_bias is not None)
    return (x, prompts, ln_weight, ln_bias), cu_seqlens, start, starts, device, problem
