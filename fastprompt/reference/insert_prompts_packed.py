"""Packed prompt insertion fused with the block's LayerNorm, reference implementation (DESIGN.md, op 3).

x (T, D) holds N sequences back to back, sequence n in rows [cu[n], cu[n+1]) of cu_seqlens (N+1,); the prompts
replace rows cu[n] + s_n + j, j < M, of each sequence (mode "replace" only: the length of every sequence is
unchanged). y and y_ln are (T, D); y_ln = LayerNorm(y) when LayerNorm parameters are given.

Backward: as fastprompt/reference/insert_prompts.py's, each row of y coming from the same row of x or from a
prompt row. The raw ops are declared in fastprompt/ops/insert_prompts_packed.py.
"""

from typing import Optional

import torch
from torch import Tensor

from ..ops.insert_prompts_packed import INSERT_PROMPTS_PACKED
from ..ops.outputs import empty
from ._math import compute_dtype, no_autocast
from .insert_prompts import layer_norm_or_empty, through_layer_norm


def packed_prompt_rows(cu_seqlens: Tensor, start: int, starts: Optional[Tensor], m: int) -> Tensor:
    """(N, M) int64: the packed row that prompt row j of sequence n lands on, cu[n] + s_n + j (no host sync)."""
    first = cu_seqlens[:-1].to(torch.int64) + (starts if starts is not None else start)
    return first[:, None] + torch.arange(m, device=cu_seqlens.device)


def build_packed_stream(x: Tensor, prompts: Tensor, cu_seqlens: Tensor, start: int,
                        starts: Optional[Tensor]) -> Tensor:
    """y (T, D) in x's dtype: x with the prompt rows written over it."""
    n, (m, d) = cu_seqlens.shape[0] - 1, prompts.shape[-2:]
    rows = packed_prompt_rows(cu_seqlens, start, starts, m).reshape(-1)
    y = empty(*x.shape, like=x).copy_(x)
    return y.index_copy_(0, rows, prompts.expand(n, m, d).reshape(n * m, d).to(x.dtype))


def insert_prompts_packed_fwd(x: Tensor, prompts: Tensor, cu_seqlens: Tensor, start: int, starts: Optional[Tensor],
                              ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], eps: float
                              ) -> tuple[Tensor, Tensor, list[Tensor]]:
    y = build_packed_stream(x, prompts, cu_seqlens, start, starts)
    return y, layer_norm_or_empty(y, ln_weight, ln_bias, eps), []


def insert_prompts_packed_fwd_fake(x, prompts, cu_seqlens, start, starts, ln_weight, ln_bias, eps):
    """This forward saves nothing (the backward recomputes y and its statistics)."""
    y_ln = x.new_empty(0) if ln_weight is None and ln_bias is None else x.new_empty(x.shape)
    return x.new_empty(x.shape), y_ln, []


def insert_prompts_packed_bwd(grad_y: Optional[Tensor], grad_y_ln: Optional[Tensor], x: Tensor, prompts: Tensor,
                              cu_seqlens: Tensor, start: int, starts: Optional[Tensor], ln_weight: Optional[Tensor],
                              ln_bias: Optional[Tensor], saved: list[Tensor], eps: float
                              ) -> tuple[Tensor, Tensor, list[Tensor]]:
    n, (m, d) = cu_seqlens.shape[0] - 1, prompts.shape[-2:]
    with no_autocast(x.device):
        cd = compute_dtype(x.dtype)
        dy = grad_y.to(cd) if grad_y is not None else x.new_zeros(x.shape, dtype=cd)
        ln_grads = []
        if ln_weight is not None or ln_bias is not None:
            y = build_packed_stream(x, prompts, cu_seqlens, start, starts).to(cd)
            dy, ln_grads = through_layer_norm(dy, grad_y_ln, y, ln_weight, ln_bias, eps)
        rows = packed_prompt_rows(cu_seqlens, start, starts, m).reshape(-1)
        dprompts = dy.index_select(0, rows).view(n, m, d)
        if prompts.dim() == 2:
            dprompts = dprompts.sum(0)
        # the rows the prompts overwrote never reach y
        dx = dy.clone(memory_format=torch.contiguous_format).index_fill_(0, rows, 0.0)
    return dx.to(x.dtype), dprompts.to(prompts.dtype), ln_grads


INSERT_PROMPTS_PACKED.implement("reference", insert_prompts_packed_fwd, insert_prompts_packed_bwd,
                                forward_fake=insert_prompts_packed_fwd_fake)
