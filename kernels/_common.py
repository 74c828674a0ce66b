"""What the Triton kernels and launchers share: how a kernels module implements its op, the fp32 dot precision,
the device's size, and the LayerNorm of full-row tiles."""

import functools
from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from fastprompt.declaration import Op, OpImpl

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def implement(op: Op, forward: Callable, backward: Callable, supports: Callable[[dict], Optional[str]]) -> OpImpl:
    """Implement `op` on the triton backend: its raw ops fastprompt::<op>_{fwd,bwd}_triton run these launchers,
    each with its inputs' CUDA device made current (`on_the_inputs_device`)."""
    return op.implement("triton", on_the_inputs_device(forward), on_the_inputs_device(backward), supports)

def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 dot products are IEEE fp32 unless torch itself allows TF32 for matmuls (DESIGN.md)."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the device (a nominal 8 for CPU tensors under the interpreter, which
    runs programs one after another anyway)."""
    if device.type != "cuda":
        return 8
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def on_the_inputs_device(launcher):
    """Run a launcher with its tensors' CUDA device current. Triton launches on the *current* device whatever
    device the pointers belong to, so tensors on cuda:1 while cuda:0 is current would fail ("cannot be
    accessed from Triton") or read another GPU's memory; torch's own ops, and the CUDA binding's DeviceGuard,
    follow the inputs instead. The device is the first tensor argument's; CPU tensors (the interpreter) need
    no guard."""

    @functools.wraps(launcher)
    def guarded(*args, **kwargs):
        device = next(a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        if device.type != "cuda":
            return launcher(*args, **kwargs)
        with torch.cuda.device(device):
            return launcher(*args, **kwargs)

    guarded.runs_on_the_inputs_device = True
    return guarded


def dtype_reason(problem: dict) -> str | None:
    if problem["dtype"] not in SUPPORTED_DTYPES:
        return f"the triton kernels take float32, float16 and bfloat16, not {problem['dtype']}"
    return None


@triton.jit
def layer_norm_rows(y, mask, cols, D, eps, w_ptr, b_ptr, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """LayerNorm of a full-row fp32 tile y (BLOCK_R, BLOCK_D), padding masked out: (y_ln, mean, rstd).
    mean = Σy/D ; var = Σ(y − mean)²/D ; y_ln = (y − mean)·rstd·w + b, all in fp32."""
    mean = tl.sum(y, axis=1) / D
    diff = tl.where(mask, y - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / D + eps)
    y_ln = diff * rstd[:, None]
    if HAS_W:
        y_ln = y_ln * tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y_ln = y_ln + tl.load(b_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    return y_ln, mean, rstd


@triton.jit
def store_rows_and_layer_norm(y, mask, row_ok, out_rows, cols, D, eps, y_ptr, yln_ptr, mean_ptr, rstd_ptr, w_ptr,
                              b_ptr, HAS_LN: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """The epilogue of both insertion forwards: write the tile y at output rows out_rows (int64) and, with
    HAS_LN, its LayerNorm and the row statistics the backward reads."""
    offs = out_rows[:, None] * D + cols[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    if HAS_LN:
        y_ln, mean, rstd = layer_norm_rows(y, mask, cols, D, eps, w_ptr, b_ptr, HAS_W, HAS_B)
        tl.store(yln_ptr + offs, y_ln.to(yln_ptr.dtype.element_ty), mask=mask)
        tl.store(mean_ptr + out_rows, mean, mask=row_ok)
        tl.store(rstd_ptr + out_rows, rstd, mask=row_ok)


@triton.jit
def ln_backward_rows(xhat, dxhat, rstd, m, D):
    """rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)) of a full-row tile: the input gradient of a LayerNorm."""
    c1 = tl.sum(dxhat * xhat, 1) / D
    c2 = tl.sum(dxhat, 1) / D
    return tl.where(m, (dxhat - c2[:, None] - xhat * c1[:, None]) * rstd[:, None], 0.0)
