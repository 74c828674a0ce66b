"""Input checks shared by the ops. Every check runs before any kernel and raises a message that names
the argument, what was expected and what was given."""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(op: str, name: str, t, ndim: Optional[int | tuple[int, ...]] = None, layout: str = "") -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if t.dim() not in allowed:
            want = " or ".join(f"{n}-D" for n in allowed)
            hint = f" {layout}" if layout else ""
            raise ValueError(f"{op}: {name} must be {want}{hint}, got shape {tuple(t.shape)}")


def check_shape(op: str, name: str, t: Tensor, expected: Sequence[int], why: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        extra = f" ({why})" if why else ""
        raise ValueError(f"{op}: {name} must have shape {tuple(expected)}{extra}, got {tuple(t.shape)}")


def check_nonempty(op: str, named: Iterable[tuple[str, Tensor]]) -> None:
    for name, t in named:
        if t.numel() == 0:
            raise ValueError(f"{op}: {name} is empty (shape {tuple(t.shape)}); every dimension must be at least 1")


def check_same_device(op: str, named: Sequence[tuple[str, Tensor]]) -> torch.device:
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{op}: all tensors must be on one device, but {first_name} is on {first.device} "
                             f"and {name} is on {t.device}")
    return first.device


def check_dtypes(op: str, named: Sequence[tuple[str, Tensor]]) -> torch.dtype:
    """Floating tensors of one supported dtype. Outside autocast mixed dtypes are an error."""
    for name, t in named:
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; supported dtypes are float32, float16 and "
                            f"bfloat16 (float64 on the reference backend)")
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{op}: mixed dtypes: {first_name} is {first.dtype} but {name} is {t.dtype}. Cast them "
                            f"to one dtype, or run under torch.autocast, which casts inputs and parameters to its dtype")
    return first.dtype


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype the ops follow under torch.autocast on `device`, or None outside autocast."""
    if device.type not in ("cuda", "cpu"):
        return None
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def cast_floating(tensors: Sequence[Optional[Tensor]], dtype: Optional[torch.dtype]) -> list[Optional[Tensor]]:
    """Under autocast, cast every floating tensor to the autocast dtype (as nn.Linear's matmul would);
    the cast is differentiable, so gradients reach the original parameters in their own dtype."""
    if dtype is None:
        return list(tensors)
    return [t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors]


def present(named: Iterable[tuple[str, Optional[Tensor]]]) -> list[tuple[str, Tensor]]:
    return [(n, t) for n, t in named if t is not None]
