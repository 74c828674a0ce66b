"""Prompt insertion fused with LayerNorm: input checks, the autograd Functions over the backends' raw
ops (N × L streams, and packed streams with cu_seqlens), and the functional form. The math is in
fastprompt/reference/insert.py."""

from typing import Optional, Union

import torch
from torch import Tensor

from .. import _validation as v
from ..backends import _impls, select
from ..reference.insert import MODES, out_len

OP = "insert_prompts"
PACKED = "insert_prompts_packed"  # the packed variant's name in the dispatch (its raw ops: fastprompt::<PACKED>_*)


def _affine_grads(dln, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor]):
    """(dw, db) from a raw backward's list, which holds the gradients of the LayerNorm parameters given."""
    dln = list(dln)
    dw = dln.pop(0) if ln_weight is not None else None
    db = dln.pop(0) if ln_bias is not None else None
    return dw, db


class InsertPromptsFunction(torch.autograd.Function):
    """Prompt insertion through one backend's `fastprompt::insert_prompts_{fwd,bwd}_<backend>` pair."""

    @staticmethod
    def forward(ctx, x: Tensor, prompts: Tensor, starts: Optional[Tensor], ln_weight: Optional[Tensor],
                ln_bias: Optional[Tensor], backend: str, start: int, eps: float, mode: str):
        y, y_ln, saved = _impls[("insert_prompts", backend)].forward(x, prompts, start, starts, ln_weight, ln_bias,
                                                                     eps, mode)
        ctx.save_for_backward(x, prompts, starts, ln_weight, ln_bias, *saved)
        ctx.config = (backend, start, eps, mode)
        ctx.set_materialize_grads(False)
        if ln_weight is None and ln_bias is None:
            ctx.mark_non_differentiable(y_ln)
        return y, y_ln

    @staticmethod
    def backward(ctx, grad_y: Optional[Tensor], grad_y_ln: Optional[Tensor]):
        backend, start, eps, mode = ctx.config
        x, prompts, starts, ln_weight, ln_bias, *saved = ctx.saved_tensors
        if grad_y is None and grad_y_ln is None:
            return (None,) * 9
        if grad_y_ln is not None and grad_y_ln.numel() == 0:  # the placeholder of a LayerNorm-free call
            grad_y_ln = None
        dx, dprompts, dln = _impls[("insert_prompts", backend)].backward(
            grad_y, grad_y_ln, x, prompts, start, starts, ln_weight, ln_bias, saved, eps, mode)
        dw, db = _affine_grads(dln, ln_weight, ln_bias)
        return dx, dprompts, None, dw, db, None, None, None, None


class InsertPromptsPackedFunction(torch.autograd.Function):
    """The packed variant through one backend's `fastprompt::insert_prompts_packed_{fwd,bwd}_<backend>` pair."""

    @staticmethod
    def forward(ctx, x: Tensor, prompts: Tensor, cu_seqlens: Tensor, starts: Optional[Tensor],
                ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], backend: str, start: int, eps: float):
        y, y_ln, saved = _impls[(PACKED, backend)].forward(x, prompts, cu_seqlens, start, starts, ln_weight,
                                                           ln_bias, eps)
        ctx.save_for_backward(x, prompts, cu_seqlens, starts, ln_weight, ln_bias, *saved)
        ctx.config = (backend, start, eps)
        ctx.set_materialize_grads(False)
        if ln_weight is None and ln_bias is None:
            ctx.mark_non_differentiable(y_ln)
        return y, y_ln

    @staticmethod
    def backward(ctx, grad_y: Optional[Tensor], grad_y_ln: Optional[Tensor]):
        backend, start, eps = ctx.config
        x, prompts, cu_seqlens, starts, ln_weight, ln_bias, *saved = ctx.saved_tensors
        if grad_y is None and grad_y_ln is None:
            return (None,) * 9
        if grad_y_ln is not None and grad_y_ln.numel() == 0:  # the placeholder of a LayerNorm-free call
            grad_y_ln = None
        dx, dprompts, dln = _impls[(PACKED, backend)].backward(
            grad_y, grad_y_ln, x, prompts, cu_seqlens, start, starts, ln_weight, ln_bias, saved, eps)
        dw, db = _affine_grads(dln, ln_weight, ln_bias)
        return dx, dprompts, None, None, dw, db, None, None, None


def _check_start(start, n: int, length: int, m: int, mode: str, device: torch.device, check_range: bool):
    """Returns (int start, per-sequence starts or None)."""
    hi = length - m if mode == "replace" else length
    rule = (f"0 <= start <= L - M = {hi} for mode 'replace'" if mode == "replace"
            else f"0 <= start <= L = {hi} for mode 'insert'")
    if isinstance(start, bool):
        raise TypeError(f"{OP}: start must be an int or an int64 tensor of shape (N,), got a bool")
    if isinstance(start, int):
        if not 0 <= start <= hi:
            raise ValueError(f"{OP}: start={start} is out of range: {rule}")
        return start, None
    if not isinstance(start, Tensor):
        raise TypeError(f"{OP}: start must be an int or an int64 tensor of shape (N,), got {type(start).__name__}")
    if start.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{OP}: a start tensor must be int64 (or int32), got {start.dtype}")
    v.check_shape(OP, "start", start, (n,), why="one offset per sequence")
    if start.device != device:
        raise ValueError(f"{OP}: start is on {start.device} but x is on {device}")
    # Range check on the host (a device sync on CUDA); torch.compile traces without it, and callers whose
    # offsets were validated once (the methods' static per-class offsets) skip it with check_start=False.
    if check_range and not torch.compiler.is_compiling():
        lo_val, hi_val = int(start.min()), int(start.max())
        if lo_val < 0 or hi_val > hi:
            raise ValueError(f"{OP}: start holds offsets from {lo_val} to {hi_val}, out of range: {rule}")
    return 0, start.to(torch.int64).contiguous()  # the kernels index it densely


def insert_prompts(x: Tensor, prompts: Tensor, start: Union[int, Tensor], ln_weight: Optional[Tensor] = None,
                   ln_bias: Optional[Tensor] = None, eps: float = 1e-5, mode: str = "replace", *,
                   cu_seqlens: Optional[Tensor] = None, backend: str = "auto",
                   check_start: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """Write prompt rows into a batch-first residual stream and apply the block's LayerNorm in one pass.

    Args:
        x: (N, L, D) residual stream, or with `cu_seqlens` (T, D) packed sequences. Any strides.
        prompts: (M, D) shared by all N sequences, or (N, M, D).
        start: first prompt row, an int or an int64 tensor (N,) of per-sequence offsets (packed: counted
            from each sequence's first row).
        ln_weight, ln_bias: (D,) the LayerNorm to apply to y (for example the block's ln_1); with
            neither given, no LayerNorm is computed and y_ln is None.
        eps: LayerNorm epsilon.
        mode: "replace" (rows [start, start+M) are overwritten, L unchanged) or "insert" (the prompts
            are inserted before row `start`, L grows by M). Packed streams take "replace" only.
        cu_seqlens: an int32 or int64 tensor (N+1,) on x's device: sequence n is rows [cu[n], cu[n+1]) of
            a packed x (T, D), cu[0] = 0, cu[N] = T; its rows cu[n] + start_n + [0, M) are replaced.
        backend: "auto", "reference", "triton" or "cuda".
        check_start: check the values of a start tensor and of cu_seqlens on the host (a sync on CUDA;
            skipped under torch.compile); pass False for layouts and offsets that were validated once already.

    Returns:
        (y, y_ln): the new stream (N, L or L+M, D), packed (T, D), and its LayerNorm (None without LayerNorm
        parameters).
    """
    if cu_seqlens is not None:
        return _insert_packed(x, prompts, start, ln_weight, ln_bias, eps, mode, cu_seqlens, backend, check_start)
    v.check_tensor(OP, "x", x, 3, "(N, L, D) batch first")
    v.check_tensor(OP, "prompts", prompts, (2, 3), "(M, D) or (N, M, D)")
    if mode not in MODES:
        raise ValueError(f"{OP}: mode must be one of {MODES}, got {mode!r}")
    n, length, d = x.shape
    m = prompts.shape[-2]
    if prompts.shape[-1] != d:
        raise ValueError(f"{OP}: prompts have width {prompts.shape[-1]} but x has width {d}")
    if prompts.dim() == 3 and prompts.shape[0] != n:
        raise ValueError(f"{OP}: per-sequence prompts have N={prompts.shape[0]} but x has N={n}")
    v.check_nonempty(OP, [("x", x), ("prompts", prompts)])
    if mode == "replace" and m > length:
        raise ValueError(f"{OP}: cannot replace M={m} rows of a stream of length L={length}")
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t is not None:
            v.check_tensor(OP, name, t)
            v.check_shape(OP, name, t, (d,), why=f"LayerNorm over width {d}")
    named = v.present([("x", x), ("prompts", prompts), ("ln_weight", ln_weight), ("ln_bias", ln_bias)])
    device = v.check_same_device(OP, named)
    start, starts = _check_start(start, n, length, m, mode, device, check_start)
    x, prompts, ln_weight, ln_bias = v.cast_floating([x, prompts, ln_weight, ln_bias], v.autocast_dtype(device))
    dtype = v.check_dtypes(OP, v.present([("x", x), ("prompts", prompts), ("ln_weight", ln_weight),
                                          ("ln_bias", ln_bias)]))
    problem = dict(dtype=dtype, n=n, l=length, l_out=out_len(length, m, mode), m=m, d=d, mode=mode,
                   shared_prompts=prompts.dim() == 2, per_sequence_start=starts is not None,
                   layer_norm=ln_weight is not None or ln_bias is not None)
    impl = select("insert_prompts", backend, device, problem)
    y, y_ln = InsertPromptsFunction.apply(x, prompts, starts, ln_weight, ln_bias, impl.backend, start, eps, mode)
    return y, (y_ln if problem["layer_norm"] else None)


# ---- the packed variant --------------------------------------------------------------------------------------

def _check_cu_seqlens(cu_seqlens, device: torch.device) -> int:
    """Type, shape and device of cu_seqlens; returns N."""
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"{OP}: cu_seqlens must be an int32 or int64 tensor (N + 1,), got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{OP}: cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"{OP}: cu_seqlens must be 1-D (N + 1,) with N >= 1 sequences, got shape "
                         f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"{OP}: cu_seqlens is on {cu_seqlens.device} but x is on {device}")
    return cu_seqlens.shape[0] - 1


def _check_packed_values(cu: Tensor, start: int, starts: Optional[Tensor], total: int, m: int) -> None:
    """cu_seqlens runs from 0 to T without decreasing, and every sequence holds its M prompt rows. One host
    transfer (a device sync on CUDA) for all of it; more only on the way to an error."""
    lengths = cu[1:] - cu[:-1]
    room = lengths - m - (starts if starts is not None else start)  # rows left after the prompts, >= 0
    lo_start = starts.min() if starts is not None else torch.zeros((), dtype=torch.int64, device=cu.device)
    first, last, shortest, tight, least = torch.stack([cu[0], cu[-1], lengths.min(), room.min(), lo_start]).tolist()
    if first != 0:
        raise ValueError(f"{OP}: cu_seqlens must start at 0, got {first}")
    if last != total:
        raise ValueError(f"{OP}: cu_seqlens ends at {last} but x has T={total} rows")
    if shortest < 0:
        raise ValueError(f"{OP}: cu_seqlens must not decrease (a sequence of length {shortest})")
    if least < 0:
        raise ValueError(f"{OP}: start holds an offset of {least}; offsets must be >= 0")
    if tight < 0:
        n = int(room.argmin())
        s = int(starts[n]) if starts is not None else start
        raise ValueError(f"{OP}: sequence {n} has length {int(lengths[n])}, too short for M={m} prompt rows from "
                         f"start={s}: start + M <= length must hold for every sequence")


def _insert_packed(x, prompts, start, ln_weight, ln_bias, eps, mode, cu_seqlens, backend, check_values):
    v.check_tensor(OP, "x", x, 2, "(T, D): packed sequences, with cu_seqlens")
    v.check_tensor(OP, "prompts", prompts, (2, 3), "(M, D) or (N, M, D)")
    if mode != "replace":
        raise ValueError(f"{OP}: packed streams (cu_seqlens) take mode 'replace' only, got {mode!r}")
    total, d = x.shape
    m = prompts.shape[-2]
    n = _check_cu_seqlens(cu_seqlens, x.device)
    if prompts.shape[-1] != d:
        raise ValueError(f"{OP}: prompts have width {prompts.shape[-1]} but x has width {d}")
    if prompts.dim() == 3 and prompts.shape[0] != n:
        raise ValueError(f"{OP}: per-sequence prompts have N={prompts.shape[0]} but cu_seqlens holds N={n} "
                         "sequences")
    v.check_nonempty(OP, [("x", x), ("prompts", prompts)])
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t is not None:
            v.check_tensor(OP, name, t)
            v.check_shape(OP, name, t, (d,), why=f"LayerNorm over width {d}")
    named = v.present([("x", x), ("prompts", prompts), ("ln_weight", ln_weight), ("ln_bias", ln_bias)])
    device = v.check_same_device(OP, named)
    # types here; the range against each sequence's length with cu_seqlens' values below
    if isinstance(start, int) and not isinstance(start, bool):
        if start < 0:
            raise ValueError(f"{OP}: start={start} is out of range: start >= 0")
        starts = None
    else:
        start, starts = _check_start(start, n, total, 0, mode, device, check_range=False)
    cu_seqlens = cu_seqlens.to(torch.int64).contiguous()  # the kernels index it densely
    if check_values and not torch.compiler.is_compiling():
        _check_packed_values(cu_seqlens, start, starts, total, m)
    x, prompts, ln_weight, ln_bias = v.cast_floating([x, prompts, ln_weight, ln_bias], v.autocast_dtype(device))
    dtype = v.check_dtypes(OP, v.present([("x", x), ("prompts", prompts), ("ln_weight", ln_weight),
                                          ("ln_bias", ln_bias)]))
    problem = dict(dtype=dtype, n=n, t=total, m=m, d=d, mode=mode, shared_prompts=prompts.dim() == 2,
                   per_sequence_start=starts is not None, layer_norm=ln_weight is not None or ln_bias is not None)
    impl = select(PACKED, backend, device, problem)
    y, y_ln = InsertPromptsPackedFunction.apply(x, prompts, cu_seqlens, starts, ln_weight, ln_bias, impl.backend,
                                                start, eps)
    return y, (y_ln if problem["layer_norm"] else None)
