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

Hooks: `prefix_hooks` rewrite rows of the prefix stream (G, P, D) (the context rows of CoOp-like methods);
`suffix_hooks` rewrite rows of a padded view of the suffixes (N, S, D), rows counted from the suffix start
(MAP-DAFE's prompts after the class name). Both keep the BlockHooks contract (x) -> (x, ln_1(x) or None).
Suffix hooks that define `before_packed(layer, x, cu_seqlens) -> (x, ln_1(x) or None)` are handed the packed
tokens (T, D) and the suffixes' cu_seqlens instead, and write their rows with the packed insert_prompts: no
padded copy and back. Rows the methods write in the suffixes (DCP's without prefix reuse) go the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from .backbone import NO_HOOKS, TEXT_SCOPE, BlockHooks


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


def _pad(x: Tensor, layout: PackedLayout) -> Tensor:
    """(T, ...) packed → (N, S, ...) padded (zeros in the padding slots)."""
    return torch.cat([x, x.new_zeros(1, *x.shape[1:])])[layout.pad_index]


def _unpad(x: Tensor, layout: PackedLayout) -> Tensor:
    """(N, S, ...) padded → (T, ...) packed (an index gather: a boolean mask would sync the host on CUDA)."""
    return x.reshape(-1, *x.shape[2:])[layout.unpad_index]


def _heads(t: Tensor, heads: int) -> Tensor:
    n, s, d = t.shape
    return t.view(n, s, heads, d // heads).transpose(1, 2)


def packed_block(block: nn.Module, x: Tensor, layout: PackedLayout, x_ln: Optional[Tensor] = None,
                 prefix_kv: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
    """open_clip's ResidualAttentionBlock on packed suffix tokens x (T, D); with prefix_kv (the prefix's keys
    and values at this block, (G, H, P, dh) each) every suffix also attends to its group's prefix."""
    attn = block.attn
    heads = attn.num_heads
    h = block.ln_1(x) if x_ln is None else x_ln
    q, k, v = (_heads(_pad(t, layout), heads) for t in F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1))
    if prefix_kv is None:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        pk, pv = (t[layout.group] for t in prefix_kv)
        s, p = q.shape[2], pk.shape[2]
        allowed = torch.ones(s, p + s, dtype=torch.bool, device=x.device)
        allowed[:, p:] = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        o = F.scaled_dot_product_attention(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), attn_mask=allowed)
    n, _, s, dh = o.shape
    o = _unpad(o.transpose(1, 2).reshape(n, s, heads * dh), layout)
    x = x + block.ls_1(F.linear(o, attn.out_proj.weight, attn.out_proj.bias))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def prefix_block(block: nn.Module, x: Tensor, x_ln: Optional[Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """The block on the prefix stream (G, P, D), returning also its keys and values for the suffixes."""
    attn = block.attn
    heads = attn.num_heads
    h = block.ln_1(x) if x_ln is None else x_ln
    q, k, v = (_heads(t, heads) for t in F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    g, _, p, dh = o.shape
    o = F.linear(o.transpose(1, 2).reshape(g, p, heads * dh), attn.out_proj.weight, attn.out_proj.bias)
    x = x + block.ls_1(o)
    return x + block.ls_2(block.mlp(block.ln_2(x))), (k, v)


class PackedTextStream:
    """The text tower's state on the packed path, stepped block by block: the shared prefix (G, P, D) when
    there is one, and the packed suffix tokens (T, D). For methods that drive the tower themselves (DCP
    rewrites the prompt rows between blocks from the image side); encode_packed drives it with hooks."""

    def __init__(self, clip, embeddings: Tensor, layout: PackedLayout, checkpoint: bool = False):
        pos = clip._text.positional_embedding.to(embeddings.dtype)
        p = layout.prefix_len
        self.clip, self.layout = clip, layout
        self.recompute = checkpoint and torch.is_grad_enabled()
        self.x = embeddings.reshape(-1, embeddings.shape[-1])[layout.source] + pos[layout.positions]
        self.prefix = embeddings[layout.first, :p] + pos[:p] if p else None
        self.x_ln = self.prefix_ln = None

    def _check_suffix_rows(self, start: int, m: int) -> None:
        """Rows [start, start + m) must lie in every suffix (a host-side check: the layout knows the shortest)."""
        if start < 0 or start + m > self.layout.min_suffix:
            raise ValueError(f"rows [{start}, {start + m}) of the suffixes do not lie in every suffix: the shortest "
                             f"holds {self.layout.min_suffix} rows")

    def rows(self, start: int, m: int) -> Tensor:
        """Rows [start, start + m) of every sequence: (G, m, D) from the prefix when they lie in it, else
        (N, m, D) gathered from the packed suffixes (rows counted from the first suffix row)."""
        if self.prefix is not None and start + m <= self.prefix.shape[1]:
            return self.prefix[:, start:start + m]
        self._check_suffix_rows(start, m)
        return self.x[self.layout.cu[:-1, None] + start + torch.arange(m, device=self.x.device)]

    def rewrite(self, hooks: BlockHooks, layer: int, in_prefix: bool) -> None:
        """Let `hooks` rewrite rows before block `layer`: in the prefix, or in the suffixes, the packed tokens
        themselves when the hooks have `before_packed`, else a padded view of them."""
        if in_prefix:
            self.prefix, self.prefix_ln = hooks.before(layer, self.prefix)
            return
        before_packed = getattr(hooks, "before_packed", None)
        if before_packed is not None:
            self.x, self.x_ln = before_packed(layer, self.x, self.layout.cu)
            return
        padded, padded_ln = hooks.before(layer, _pad(self.x, self.layout))
        self.x = _unpad(padded, self.layout)
        self.x_ln = _unpad(padded_ln, self.layout) if padded_ln is not None else None

    def replace(self, rows: Tensor, start: int, ln: nn.Module, backend: str) -> None:
        """Write `rows` (as rows() returned them) at [start, start + m), fused with the next block's ln_1; in the
        suffixes, straight into the packed tokens (insert_prompts with cu_seqlens: no padded copy)."""
        from .. import insert_prompts

        m = rows.shape[-2]
        if self.prefix is not None and rows.shape[0] == self.prefix.shape[0] and start + m <= self.prefix.shape[1]:
            self.prefix, self.prefix_ln = insert_prompts(self.prefix, rows, start, ln.weight, ln.bias, ln.eps,
                                                         "replace", backend=backend)
            return
        # checked here against the layout, so that insert_prompts need not check cu_seqlens (a host sync on CUDA)
        self._check_suffix_rows(start, m)
        self.x, self.x_ln = insert_prompts(self.x, rows, start, ln.weight, ln.bias, ln.eps, "replace",
                                           cu_seqlens=self.layout.cu, backend=backend, check_start=False)

    def step(self, block: nn.Module) -> None:
        """One block (both parts), with the rows rewritten since the last step."""
        kv = None
        with torch.profiler.record_function(TEXT_SCOPE):
            if self.prefix is not None:
                args = (block, self.prefix, self.prefix_ln)
                self.prefix, kv = (activation_checkpoint(prefix_block, *args, use_reentrant=False)
                                   if self.recompute else prefix_block(*args))
            args = (block, self.x, self.layout, self.x_ln, kv)
            self.x = (activation_checkpoint(packed_block, *args, use_reentrant=False)
                      if self.recompute else packed_block(*args))
        self.x_ln = self.prefix_ln = None

    def features(self) -> Tensor:
        """ln_final and the text projection at the EOT rows: (N, E)."""
        text = self.clip._text
        feats = text.ln_final(self.x[self.layout.eot_row])
        proj = text.text_projection
        if proj is None:
            return feats
        return proj(feats) if isinstance(proj, nn.Linear) else feats @ proj


def encode_packed(clip, embeddings: Tensor, layout: PackedLayout, prefix_hooks: BlockHooks = NO_HOOKS,
                  suffix_hooks: Optional[BlockHooks] = None, checkpoint: bool = False) -> Tensor:
    """Text features (N, E) of token embeddings (N, L, D) (layer-0 prompts already written), on the packed
    path; equal to clip.encode_text_stream on the full sequences up to float rounding. `checkpoint`
    recomputes each block in the backward (activation checkpointing)."""
    stream = PackedTextStream(clip, embeddings, layout, checkpoint)
    for layer, block in enumerate(clip.text_blocks):
        if stream.prefix is not None:
            stream.rewrite(prefix_hooks, layer, in_prefix=True)
        if suffix_hooks is not None:
            stream.rewrite(suffix_hooks, layer, in_prefix=False)
        stream.step(block)
    return stream.features()


__all__ = ["PackedLayout", "PackedTextStream", "encode_packed", "make_layout", "packed_block", "prefix_block"]
