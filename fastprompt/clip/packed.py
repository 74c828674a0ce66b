"""Exact acceleration of the text tower: sequences cut at their EOT and packed, and a shared prefix computed once.

The text tower is causal and pooled at EOT, so the tokens after EOT never reach the feature: the sequences
are cut at EOT and packed, (total_tokens, D) with cumulative lengths, and every per-token layer (LayerNorms,
projections, MLP: nearly all the work) runs on the packed tokens only. Positional embeddings are taken at each
token's true position. Attention, a small part of the work at these lengths, runs on a padded view of the same
tokens with a causal mask: causality also keeps the padding out of every real token's keys, so the result is
exact. (benches/text_attention_variants.py, 2-core CPU, one block's attention over 200 CoOp sequences cut at
EOT: padded SDPA 7-17 ms forward; FlexAttention with a document mask 47-180x slower eager, 1.6-2.5x slower
compiled, and no backward on the CPU; torch's varlen_attn has no CPU kernel; a per-sequence loop is 5-8x slower
forward + backward. benches/results/text-tower-cpu.md; the GPU comparison is part of benches/gpu_check.sh.)

Shared prefix: when the first P tokens of every sequence of a group are identical at the input and the rows
the method rewrites in them are rewritten identically for the group, their hidden states are identical at
every block (a causal token sees only earlier ones). They are computed once per group, and each sequence's
suffix attends to the prefix's keys and values at every block. Gradients from every suffix reach the prefix.
Methods declare their prefix statically (its length and the group of each sequence): no host synchronisation.

This file holds the layout and the block on it (packed_block, prefix_block: compositions of the block adapter's
parts, blocks.py); the text stream that steps the path block by block and `encode_packed`, which drives it with
hooks, are in streams.py, beside the full-sequence stream.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .blocks import ClipBlock


@dataclass
class PackedLayout:
    """The static layout of N sequences: lengths up to EOT inclusive, a prefix of P rows shared per group.

    prefix_len  P (0: no shared prefix)
    group       (N,) the group of each sequence; first (G,) a representative sequence of each group
    cu          (N + 1,) cumulative suffix lengths; total T tokens (the cu_seqlens of the packed insert_prompts)
    pad_index   (N, S) packed row of each padded suffix slot (T: a padding slot)
    valid       (N, S) whether a padded slot holds a token
    eot_row     (N,) packed row of each EOT
    positions   (T,) true position of each packed token
    source      (T,) flat index (n·L + position) of each packed token in the (N, L) input
    unpad_index (T,) flat index (n·S + slot) of each packed token in the padded (N, S) view
    max_suffix, min_suffix  the longest and shortest suffix, S and min_n(len_n), known on the host
    """

    prefix_len: int
    group: Tensor
    first: Tensor
    cu: Tensor
    pad_index: Tensor
    valid: Tensor
    eot_row: Tensor
    positions: Tensor
    source: Tensor
    max_suffix: int
    unpad_index: Tensor
    min_suffix: int

    @property
    def total(self) -> int:
        return int(self.cu[-1])

    def to(self, device) -> "PackedLayout":
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return PackedLayout(**{k: t.to(device) if isinstance(t, Tensor) else t for k, t in moved.items()})


def make_layout(eot: Tensor, length: int, prefix_len: int = 0, group: Optional[Tensor] = None) -> PackedLayout:
    """The layout of sequences whose EOT rows are `eot` (N,) in (N, length) inputs. Computed once, on the CPU."""
    eot = eot.detach().cpu().long()
    n = eot.shape[0]
    lengths = eot + 1
    if prefix_len and bool((lengths <= prefix_len).any()):
        raise ValueError(f"a shared prefix of {prefix_len} rows would swallow a sequence's EOT")
    group = torch.zeros(n, dtype=torch.long) if group is None else group.detach().cpu().long()
    suffix = lengths - prefix_len
    cu = torch.cat([torch.zeros(1, dtype=torch.long), suffix.cumsum(0)])
    total, s_max = int(cu[-1]), int(suffix.max())
    slot = torch.arange(s_max)
    valid = slot[None, :] < suffix[:, None]
    pad_index = torch.where(valid, cu[:-1, None] + slot[None, :], torch.full_like(valid, total, dtype=torch.long))
    seq = torch.repeat_interleave(torch.arange(n), suffix)
    row = torch.arange(total) - cu[:-1][seq]  # each token's row within its suffix
    positions = row + prefix_len
    groups = torch.unique(group)
    if not torch.equal(groups, torch.arange(groups.numel())):
        raise ValueError("groups must be numbered 0..G-1")
    first = torch.stack([int((group == g).nonzero()[0]) * torch.ones((), dtype=torch.long) for g in groups])
    return PackedLayout(prefix_len, group, first, cu, pad_index, valid, cu[1:] - 1, positions,
                        seq * length + positions, s_max, seq * s_max + row, int(suffix.min()))


def padded(x: Tensor, layout: PackedLayout) -> Tensor:
    """(T, ...) packed → (N, S, ...) padded (zeros in the padding slots)."""
    return torch.cat([x, x.new_zeros(1, *x.shape[1:])])[layout.pad_index]


def unpadded(x: Tensor, layout: PackedLayout) -> Tensor:
    """(N, S, ...) padded → (T, ...) packed (an index gather: a boolean mask would sync the host on CUDA)."""
    return x.reshape(-1, *x.shape[2:])[layout.unpad_index]




def packed_block(block: ClipBlock, x: Tensor, layout: PackedLayout, x_ln: Optional[Tensor] = None,
                 prefix_kv: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
    """The block on packed suffix tokens x (T, D): every per-token part on the T tokens, the attention on their
    padded view; with prefix_kv (the prefix's keys and values at this block, (G, H, P, dh) each) every suffix
    also attends to its group's prefix."""
    h = block.ln_1(x) if x_ln is None else x_ln
    q, k, v = (block.split_heads(padded(t, layout)) for t in block.qkv(h))
    if prefix_kv is None:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        pk, pv = (t[layout.group] for t in prefix_kv)
        s, p = q.shape[2], pk.shape[2]
        allowed = torch.ones(s, p + s, dtype=torch.bool, device=x.device)
        allowed[:, p:] = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        o = F.scaled_dot_product_attention(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), attn_mask=allowed)
    return block.mlp_residual(block.attention_residual(x, unpadded(block.merge_heads(o), layout)))


def prefix_block(block: ClipBlock, x: Tensor, x_ln: Optional[Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """The block on the prefix stream (G, P, D), returning also its keys and values for the suffixes."""
    h = block.ln_1(x) if x_ln is None else x_ln
    q, k, v = (block.split_heads(t) for t in block.qkv(h))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return block.mlp_residual(block.attention_residual(x, block.merge_heads(o))), (k, v)


__all__ = ["PackedLayout", "make_layout", "packed_block", "padded", "prefix_block", "unpadded"]
