"""Exact acceleration of the text tower: sequences cut at their EOT and packed, and a shared prefix computed once.

The text tower is causal and pooled at EOT, so the tokens after EOT never reach the feature: the sequences
are cut at EOT and packed, (total_tokens, D) with cumulative lengths, and every per-token layer (LayerNorms,
projections, MLP: nearly all the work) runs on the packed tokens only. Positional embeddings are taken at each
token's true position.

Shared prefix: when the first P tokens of every sequence of a group are identical at the input and the rows
the method rewrites in them are rewritten identically for the group, their hidden states are identical at
every block (a causal token sees only earlier ones). They are computed once per group, and each sequence's
suffix attends to the prefix's keys and values at every block. Gradients from every suffix reach the prefix.
Methods declare their prefix statically (its length and the group of each sequence): no host synchronisation.

Attention (packed_attention): each packed token attends to the earlier rows of its own suffix and to its
group's P prefix rows, in one softmax. The layout packs the sequences of each group whole into blocks of Bq
slots (best fit decreasing, Bq at least the longest suffix S), so that a sequence's keys all lie in its block:
the suffix scores are one masked Bq × Bq matmul per block, the prefix scores one matmul of a group's queries
against its (H, P, dh) keys, never copied per sequence (G = 1, every CoOp-like method, is one product; G > 1,
e.g. a prefix per image, one batched product over the groups, their slot rows padded to the largest group's),
then one softmax over the P + Bq scores of each query and the two value products. The padding is what the
blocks leave empty (3 % at C = 1000), not every suffix padded to the longest (13,000 slots for 4,165 tokens
there). Which Bq: block_row_choices, the one with the fewest slots × (P + Bq + SLOT_COST).

Measured (benches/packed_attention_figures.py; ViT-B/16 random weights, fp32, one thread on the project's
2-core CPU while it was nearly idle (load 0.4-1.0), torch 2.14.1; medians of 3 interleaved steps; before: the
attention this replaced, on the padded (N, S) view with the prefix's keys and values gathered for every
sequence and cat'd before a masked SDPA, kept in that script):
    whole training step: s (peak MB)     C = 100         C = 200         C = 1000
    coop                    before       2.65 (257)      3.51 (510)      13.9 (2,878)
                            after        2.40 (131)      3.19 (257)      9.82 (1,184)
    maple                   before       4.25 (480)      5.17 (674)      13.4 (2,551)
                            after        4.13 (411)      5.04 (535)      11.1 (1,447)
    cocoop (batch 1)        before       1.42 (195)      2.37 (389)      9.97 (2,266)
                            after        1.31 (126)      2.16 (250)      8.58 (1,162)
(benches/results/packed-attention-cpu.md; an earlier run of the same script gave 13.3 → 9.77 s for coop at C = 1000.)
At C = 1000 coop's step now runs its 767-778 counted GFLOP at ~80 GFLOP/s, the rate of its linear layers (the
bound); the peak is what its packed tokens need (~0.28 MB per text token). One block's attention alone,
forward + backward (--attention-only, C = 1000): coop (P = 17, S = 13) 408-427 → 57-67 ms, maple and cocoop
(P = 5) 221-276 → 61 ms, TMML (P = 1, S = 17) 240-309 → 131 ms. Tried and not kept: a window of the
Bq + S - 1 packed rows ending with each block instead of whole sequences per block (more keys copied and
scored: slower), SDPA per block with the prefix cat'd per block (a copy per block; as fast at best, slower at
Bq = 16), gathering per head (index_select on the (H, T, dh) view: 2x slower than a row gather and one
transpose), SDPA per block without a prefix (no faster than the matmuls). Without a prefix (prefix_reuse=False)
and with suffixes nearly all as long as the longest, the padded causal SDPA of before stays faster on the
attention alone (CoOp's 16 context rows, C = 1000: S = 30, mean 21; 837 → 909 ms, ~2 % of the block); where
lengths vary the blocks win (TMML without a prefix: 258 → 143 ms). Earlier (benches/text_attention_variants.py,
before this layout): FlexAttention with a document mask 47-180x slower eager, 1.6-2.5x slower compiled and no
backward on the CPU, torch's varlen_attn no CPU kernel, a per-sequence loop 5-8x slower; on a GPU, FlexAttention
with a document mask is the candidate to measure against this (benches/gpu_check.sh).

This file holds the layout, the attention and the blocks on it (packed_block, prefix_block: compositions of the
block adapter's parts, blocks.py); the text stream that steps the path block by block and `encode_packed`, which
drives it with hooks, are in streams.py, beside the full-sequence stream.
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

    The attention's blocks (packed_attention): the sequences of each group are packed whole into blocks of
    `block_rows` Bq slots (best fit, longest first; Bq ≥ S), the blocks of group g taking row g of a
    (G, group_slots) slot grid, every row as long as the longest (group_slots a multiple of Bq).
    slot_token   (G·group_slots,) packed row in each slot (padding slots: any row; their outputs are dropped)
    token_slot   (T,) slot of each packed row
    blocked      (G·group_slots / Bq, Bq, Bq) True where a query slot may not see a key slot of its block:
                 another sequence, a later row, a padding slot (a padding slot sees only itself, so that no
                 softmax row is empty)
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
    block_rows: int
    group_slots: int
    slot_token: Tensor
    token_slot: Tensor
    blocked: Tensor

    @property
    def total(self) -> int:
        return int(self.cu[-1])

    @property
    def groups(self) -> int:
        return self.first.shape[0]

    def to(self, device) -> "PackedLayout":
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return PackedLayout(**{k: t.to(device) if isinstance(t, Tensor) else t for k, t in moved.items()})


# What a slot costs besides its scores, in score columns: gathering its q, k, v, scattering its output, forward
# and backward (CPU, fp32, dh 64: module docstring). The block size minimises slots × (P + Bq + SLOT_COST).
SLOT_COST = 24


def block_row_choices(max_suffix: int) -> list[int]:
    """The block sizes make_layout weighs: the multiples of 16 from S to twice that (16 floats: one AVX-512 vector,
    and the measured block sizes between multiples of 16 ran slower)."""
    smallest = -(-max_suffix // 16) * 16
    return list(range(smallest, 2 * smallest + 1, 16))


def make_layout(eot: Tensor, length: int, prefix_len: int = 0, group: Optional[Tensor] = None,
                block_rows: Optional[int] = None) -> PackedLayout:
    """The layout of sequences whose EOT rows are `eot` (N,) in (N, length) inputs, the sequences of group g
    (`group`, (N,), numbered 0..G-1; default all in group 0) sharing a prefix of `prefix_len` rows; block_rows:
    the attention's block Bq (at least the longest suffix; default: of block_row_choices, the one that costs
    least, SLOT_COST). Computed once, on the CPU."""
    eot = eot.detach().cpu().long()
    n = eot.shape[0]
    lengths = eot + 1
    if prefix_len and bool((lengths <= prefix_len).any()):
        raise ValueError(f"a shared prefix of {prefix_len} rows would swallow a sequence's EOT")
    group = torch.zeros(n, dtype=torch.long) if group is None else group.detach().cpu().long()
    if group.shape != (n,):
        raise ValueError(f"group must give one group per sequence, ({n},), got {tuple(group.shape)}")
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
    if block_rows is not None and block_rows < s_max:
        raise ValueError(f"block_rows {block_rows} is shorter than the longest suffix ({s_max}): a block holds "
                         "whole sequences")
    candidates = [block_rows] if block_rows is not None else block_row_choices(s_max)
    packings = {bq: _pack_in_blocks(suffix, group, groups.numel(), bq) for bq in candidates}
    block_rows = min(packings, key=lambda bq: packings[bq][2] * bq * (prefix_len + bq + SLOT_COST))
    blocks = _attention_blocks(seq, row, group, groups.numel(), block_rows, *packings[block_rows])
    return PackedLayout(prefix_len, group, first, cu, pad_index, valid, cu[1:] - 1, positions,
                        seq * length + positions, s_max, seq * s_max + row, int(suffix.min()), block_rows, *blocks)


def _pack_in_blocks(suffix: Tensor, group: Tensor, n_groups: int, bq: int) -> tuple[Tensor, Tensor, int]:
    """Each sequence's block within its group and its first slot in that block, and the blocks of the largest
    group: the sequences of each group packed whole into blocks of Bq slots by best fit decreasing (longest
    first, each into the open block it leaves the least room in: few blocks, little padding)."""
    block, offset, most = torch.zeros_like(suffix), torch.zeros_like(suffix), 0
    for g in range(n_groups):
        members = (group == g).nonzero()[:, 0]
        lengths = suffix[members].tolist()
        used: list[int] = []  # rows used in each block
        room: list[list[int]] = [[] for _ in range(bq + 1)]  # room[r]: the blocks with r slots left
        at = [(0, 0)] * len(lengths)
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            r = next((r for r in range(lengths[i], bq + 1) if room[r]), None)
            if r is None:
                b, r = len(used), bq
                used.append(0)
            else:
                b = room[r].pop()
            at[i] = (b, used[b])
            used[b] += lengths[i]
            room[r - lengths[i]].append(b)
        block[members] = torch.tensor([b for b, _ in at], dtype=torch.long)
        offset[members] = torch.tensor([o for _, o in at], dtype=torch.long)
        most = max(most, len(used))
    return block, offset, most


def _attention_blocks(seq: Tensor, row: Tensor, group: Tensor, n_groups: int, bq: int, block: Tensor,
                      offset: Tensor, n_blocks: int):
    """group_slots, slot_token, token_slot and blocked of PackedLayout for the packed rows of sequences `seq` (T,)
    at rows `row` of their suffixes, the sequences packed in blocks at `block`, `offset` (_pack_in_blocks)."""
    token_slot = (group[seq] * n_blocks + block[seq]) * bq + offset[seq] + row
    slots = n_groups * n_blocks * bq
    slot_token = torch.zeros(slots, dtype=torch.long)  # padding slots: row 0, computed and dropped
    slot_token[token_slot] = torch.arange(seq.shape[0])
    slot_seq = torch.full((slots,), -1, dtype=torch.long)  # each slot's sequence, -1: padding
    slot_seq[token_slot] = seq
    slot_seq = slot_seq.view(-1, bq)
    real = slot_seq >= 0
    # a sequence's rows lie in one block in order, so query slot i sees key slot j iff they hold one sequence
    # and j ≤ i; a padding slot sees only itself (no softmax row is empty; its output is dropped)
    sees = (slot_seq[:, :, None] == slot_seq[:, None, :]) & real[:, :, None]
    sees = (sees & torch.ones(bq, bq, dtype=torch.bool).tril()) | (~real[:, :, None] & torch.eye(bq, dtype=torch.bool))
    return n_blocks * bq, slot_token, token_slot, ~sees


def padded(x: Tensor, layout: PackedLayout) -> Tensor:
    """(T, ...) packed → (N, S, ...) padded (zeros in the padding slots)."""
    return torch.cat([x, x.new_zeros(1, *x.shape[1:])])[layout.pad_index]


def unpadded(x: Tensor, layout: PackedLayout) -> Tensor:
    """(N, S, ...) padded → (T, ...) packed (an index gather: a boolean mask would sync the host on CUDA)."""
    return x.reshape(-1, *x.shape[2:])[layout.unpad_index]


def packed_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, layout: PackedLayout,
                     prefix_kv: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
    """Causal attention within each packed sequence, q, k, v (T, D) → (T, D) heads merged; with prefix_kv
    ((G, H, P, dh) each) every token also attends to its group's P prefix rows, all earlier than its own.

    For a token t of sequence n in group g, per head (scale 1/√dh):
        o_t = Σ_p a_tp · pv_gp + Σ_{u ∈ n, u ≤ t} a_tu · v_u,   a = softmax over both of q_t·pk_gp, q_t·k_u
    computed without padding the suffixes to the longest or copying the prefix per sequence:
        prefix scores  one matmul per group of its slots' queries (H, slots, dh) against its keys (H, dh, P)
        suffix scores  per block of Bq slots (whole sequences), its queries against its keys (Bq × Bq), masked
                       to the same sequence and earlier rows (layout.blocked)
        one softmax over the P + Bq scores of each query, then the two value products, summed.
    Padding slots are computed and dropped: their rows of the result are never read, so they get no gradient.
    """
    total, d = q.shape
    dh = d // heads
    g, slots, bq = layout.groups, layout.group_slots, layout.block_rows
    blocks = g * slots // bq

    def in_blocks(t: Tensor) -> Tensor:  # (T, D) → (H, G·slots / Bq, Bq, dh): the slots' rows, heads first
        rows = t.index_select(0, layout.slot_token)  # whole rows: a faster gather than one per head
        return rows.view(blocks, bq, heads, dh).permute(2, 0, 1, 3).contiguous()

    def softmax(s: Tensor) -> Tensor:  # in at least fp32, as SDPA accumulates it, then in the values' dtype
        return s.softmax(-1, dtype=torch.promote_types(s.dtype, torch.float32)).to(vb.dtype)

    qb, kb, vb = in_blocks(q), in_blocks(k), in_blocks(v)
    scale = dh ** -0.5
    scores = torch.matmul(qb, kb.transpose(-1, -2)).mul_(scale)  # (H, blocks, Bq, Bq): q_t·k_u / √dh
    scores = scores.masked_fill_(layout.blocked, float("-inf"))  # other sequences, later rows: weight 0
    if prefix_kv is None:
        o = torch.matmul(softmax(scores), vb)
    else:
        pk, pv = (t.transpose(0, 1) for t in prefix_kv)  # (H, G, P, dh): a view, no copy per sequence
        p = pk.shape[-2]
        # q_t·pk_gp / √dh: group g's slots against group g's prefix, one batched matmul over (H, G)
        prefix_scores = torch.matmul(qb.reshape(heads, g, slots, dh), pk.transpose(-1, -2)).mul_(scale)
        a = softmax(torch.cat([prefix_scores.view(heads, blocks, bq, p), scores], -1))  # one softmax over both
        a_prefix, a_suffix = a.split([p, bq], -1)
        o_prefix = torch.matmul(a_prefix.reshape(heads, g, slots, p), pv)  # Σ_p a_tp · pv_gp, (H, G, slots, dh)
        o = torch.matmul(a_suffix, vb) + o_prefix.view(heads, blocks, bq, dh)  # + Σ_u a_tu · v_u
    # back to packed order, heads merged: (H, slots, dh) → (T, H·dh)
    return o.permute(1, 2, 0, 3).reshape(g * slots, d).index_select(0, layout.token_slot)


def packed_block(block: ClipBlock, x: Tensor, layout: PackedLayout, x_ln: Optional[Tensor] = None,
                 prefix_kv: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
    """The block on packed suffix tokens x (T, D): every per-token part on the T tokens, the attention by
    packed_attention; with prefix_kv (the prefix's keys and values at this block, (G, H, P, dh) each) every
    suffix also attends to its group's prefix."""
    h = block.ln_1(x) if x_ln is None else x_ln
    q, k, v = block.qkv(h)
    o = packed_attention(q, k, v, block.heads, layout, prefix_kv)
    return block.mlp_residual(block.attention_residual(x, o))


def prefix_block(block: ClipBlock, x: Tensor, x_ln: Optional[Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """The block on the prefix stream (G, P, D), returning also its keys and values for the suffixes."""
    h = block.ln_1(x) if x_ln is None else x_ln
    q, k, v = (block.split_heads(t) for t in block.qkv(h))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return block.mlp_residual(block.attention_residual(x, block.merge_heads(o))), (k, v)


__all__ = ["PackedLayout", "SLOT_COST", "block_row_choices", "make_layout", "packed_attention", "packed_block",
           "padded", "prefix_block", "unpadded"]
