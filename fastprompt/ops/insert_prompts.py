"""Prompt insertion fused with LayerNorm on N × L streams (`insert_prompts`), declared: the raw ops' schemas and
fakes, the problem the backends read, and the checks every input passes before any backend runs. The math is
fastprompt/reference/insert_prompts.py; the functional form is in fastprompt/ops/functional.py (which
hands packed streams, `cu_seqlens=`, to the op insert_prompts_packed).

The raw forward returns y_ln as an empty tensor when no LayerNorm parameter is given (custom ops have no
optional outputs; flash-attention does the same for its unused outputs).
"""

from typing import Optional

import torch
from torch import Tensor

from .. import _validation as v
from ..declaration import Op

MODES = ("replace", "insert")


def out_len(length: int, m: int, mode: str) -> int:
    """The length of y: L for mode "replace", L + M for "insert"."""
    return length + m if mode == "insert" else length


def _forward_fake(x, prompts, start, starts, ln_weight, ln_bias, eps, mode):
    """The kernel backends' forward: y, y_ln, and what they save, the LayerNorm's row statistics (fp32)."""
    n, length, d = x.shape
    l_out = out_len(length, prompts.shape[-2], mode)
    if ln_weight is None and ln_bias is None:
        return x.new_empty(n, l_out, d), x.new_empty(0), []
    stats = [x.new_empty(n, l_out, dtype=torch.float32) for _ in range(2)]
    return x.new_empty(n, l_out, d), x.new_empty(n, l_out, d), stats


def input_grads_fake(x: Tensor, prompts: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor]):
    """What every backend's insertion backward returns (N × L and packed): gradients shaped like x, the prompts
    and the LayerNorm parameters given."""
    ln_grads = [torch.empty_like(p) for p in (ln_weight, ln_bias) if p is not None]
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(prompts, memory_format=torch.contiguous_format), ln_grads)


def _backward_fake(grad_y, grad_y_ln, x, prompts, start, starts, ln_weight, ln_bias, saved, eps, mode):
    return input_grads_fake(x, prompts, ln_weight, ln_bias)


INSERT_PROMPTS = Op(
    "insert_prompts",
    # y, y_ln (empty without LayerNorm parameters), saved; `starts` (N,) int64 replaces `start` when given
    forward="(Tensor x, Tensor prompts, SymInt start, Tensor? starts, Tensor? ln_weight, Tensor? ln_bias, float eps, "
            "str mode) -> (Tensor, Tensor, Tensor[])",
    # dx, dprompts, and the gradients of the LayerNorm parameters given
    backward="(Tensor? grad_y, Tensor? grad_y_ln, Tensor x, Tensor prompts, SymInt start, Tensor? starts, "
             "Tensor? ln_weight, Tensor? ln_bias, Tensor[] saved, float eps, str mode) -> (Tensor, Tensor, Tensor[])",
    forward_fake=_forward_fake,
    backward_fake=_backward_fake,
    # x (n, l, d), y (n, l_out, d), m prompt rows; shared_prompts: (M, D) for every sequence
    problem=("dtype", "n", "l", "l_out", "m", "d", "mode", "shared_prompts", "per_sequence_start", "layer_norm"),
)


def check_start(op: str, start, n: int, length: int, m: int, mode: str, device: torch.device, check_range: bool):
    """Returns (int start, per-sequence starts or None); `op` names the op in the messages."""
    hi = length - m if mode == "replace" else length
    rule = (f"0 <= start <= L - M = {hi} for mode 'replace'" if mode == "replace"
            else f"0 <= start <= L = {hi} for mode 'insert'")
    if isinstance(start, bool):
        raise TypeError(f"{op}: start must be an int or an int64 tensor of shape (N,), got a bool")
    if isinstance(start, int):
        if not 0 <= start <= hi:
            raise ValueError(f"{op}: start={start} is out of range: {rule}")
        return start, None
    if not isinstance(start, Tensor):
        raise TypeError(f"{op}: start must be an int or an int64 tensor of shape (N,), got {type(start).__name__}")
    if start.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: a start tensor must be int64 (or int32), got {start.dtype}")
    v.check_shape(op, "start", start, (n,), why="one offset per sequence")
    if start.device != device:
        raise ValueError(f"{op}: start is on {start.device} but x is on {device}")
    # Range check on the host (a device sync on CUDA); torch.compile traces without it, and callers whose
    # offsets were validated once (the methods' static per-class offsets) skip it with check_start=False.
    if check_range and not torch.compiler.is_compiling():
        lo_val, hi_val = int(start.min()), int(start.max())
        if lo_val < 0 or hi_val > hi:
            raise ValueError(f"{op}: start holds offsets from {lo_val} to {hi_val}, out of range: {rule}")
    return 0, start.to(torch.int64).contiguous()  # the kernels index it densely


def check_layer_norm(op: str, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], d: int) -> None:
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t is not None:
            v.check_tensor(op, name, t)
            v.check_shape(op, name, t, (d,), why=f"LayerNorm over width {d}")


def check_inputs(x: Tensor, prompts: Tensor, start, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                 mode: str, check_range: bool):
    """Checks everything the raw ops assume; returns (x, prompts, ln_weight, ln_bias) cast to the autocast dtype
    under autocast, the int start and the per-sequence starts (or None), and the problem description."""
    op = INSERT_PROMPTS.name
    v.check_tensor(op, "x", x, 3, "(N, L, D) batch first")
    v.check_tensor(op, "prompts", prompts, (2, 3), "(M, D) or (N, M, D)")
    if mode not in MODES:
        raise ValueError(f"{op}: mode must be one of {MODES}, got {mode!r}")
    n, length, d = x.shape
    m = prompts.shape[-2]
    if prompts.shape[-1] != d:
        raise ValueError(f"{op}: prompts have width {prompts.shape[-1]} but x has width {d}")
    if prompts.dim() == 3 and prompts.shape[0] != n:
        raise ValueError(f"{op}: per-sequence prompts have N={prompts.shape[0]} but x has N={n}")
    v.check_nonempty(op, [("x", x), ("prompts", prompts)])
    if mode == "replace" and m > length:
        raise ValueError(f"{op}: cannot replace M={m} rows of a stream of length L={length}")
    check_layer_norm(op, ln_weight, ln_bias, d)
    named = v.present([("x", x), ("prompts", prompts), ("ln_weight", ln_weight), ("ln_bias", ln_bias)])
    device = v.check_same_device(op, named)
    start, starts = check_start(op, start, n, length, m, mode, device, check_range)
    x, prompts, ln_weight, ln_bias = v.cast_floating([x, prompts, ln_weight, ln_bias], v.autocast_dtype(device))
    dtype = v.check_dtypes(op, v.present([("x", x), ("prompts", prompts), ("ln_weight", ln_weight),
                                          ("ln_bias", ln_bias)]))
    problem = INSERT_PROMPTS.problem_of(dtype=dtype, n=n, l=length, l_out=out_len(length, m, mode), m=m, d=d,
                                        mode=mode, shared_prompts=prompts.dim() == 2,
                                        per_sequence_start=starts is not None,
                                        layer_norm=ln_weight is not None or ln_bias is not None)
    return (x, prompts, ln_weight, ln_bias), start, starts, device, problem
