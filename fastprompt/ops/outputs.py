"""Output allocation for the ops' launchers.

Every backend allocates the buffers its kernels write through `empty`. Under `poisoned_outputs()` (the
tests) those buffers start as NaN (floating) or an absurd integer, so an element a kernel forgets to
write fails the comparison instead of passing with whatever the allocator left there.
"""

import contextlib
from typing import Iterator

import torch

_poison = False


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    global _poison
    previous, _poison = _poison, True
    try:
        yield
    finally:
        _poison = previous


def poison_(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(-(2**31) + 7)


def empty(*shape: int, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = torch.empty(*shape, dtype=dtype or like.dtype, device=like.device)
    return poison_(t) if _poison else t
