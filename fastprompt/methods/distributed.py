"""Batch-mixing ops under torch.distributed: rows of every rank, with gradients back to their owners."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import Tensor

_local_only = False


@contextlib.contextmanager
def local_only():
    """Inside, batch-mixing ops see this process's rows only: for evaluation on one rank (the others do not
    run the forward, so a collective would wait for them forever)."""
    global _local_only
    previous, _local_only = _local_only, True
    try:
        yield
    finally:
        _local_only = previous


def _distributed() -> bool:
    return not _local_only and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherRows(torch.autograd.Function):
    """All ranks' rows concatenated in rank order (sizes may differ); the backward sums the gradient of the
    gathered rows over the ranks (each rank's loss reaches every rank's rows) and returns this rank's part."""

    @staticmethod
    def forward(ctx, rows: Tensor, sizes: list, rank: int):
        biggest = max(sizes)
        padded = rows.new_zeros((biggest, *rows.shape[1:]))
        padded[: rows.shape[0]] = rows
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        ctx.sizes, ctx.rank = sizes, rank
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None, None


def gather_rows(rows: Tensor) -> tuple[Tensor, slice]:
    """(B_local, ...) → (B_global, ...) over the process group, and this rank's slice of the result.
    Without torch.distributed (or with one process) the rows come back as they are."""
    if not _distributed():
        return rows, slice(None)
    size = torch.tensor([rows.shape[0]], device=rows.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    rank = dist.get_rank()
    start = sum(sizes[:rank])
    return _GatherRows.apply(rows, sizes, rank), slice(start, start + sizes[rank])
