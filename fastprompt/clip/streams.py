"""The towers stepped block by block: an image stream, two text streams behind one `TextStream` protocol (full
77-token sequences, and the packed path of packed.py), and `run_towers`, the joint driver that steps both
towers together with a per-layer coupling callback (DCP's CMPA is one). `run_blocks` runs one tower with
BlockHooks, and `encode_packed` the packed text path with hooks.

A stream holds its tower's residual stream and the index of the next block (`layer`); `rows(start, m)` reads
prompt rows of it, `replace(rows, start)` writes rows fused with the next block's ln_1 (the fused insertion:
the block then skips its own ln_1), `step()` runs the next block and `features()` pools the final stream. The
profiler scopes of the towers are named here and only here: every block runs inside its tower's scope
(TEXT_SCOPE, IMAGE_SCOPE) and whatever runs between blocks (hooks, coupling callbacks, the prompt ops they call)
outside it, so that a profile splits a step into text tower, image tower and prompt ops (fastprompt.train.bench).
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from ..ops import insert_prompts
from .blocks import apply_block
from .packed import PackedLayout, packed_block, padded, prefix_block, unpadded

TEXT_SCOPE, IMAGE_SCOPE = "fastprompt.text_tower", "fastprompt.image_tower"


def tower_scope(causal: bool) -> str:
    """The profiler scope of a tower's blocks: the text tower is the causal one."""
    return TEXT_SCOPE if causal else IMAGE_SCOPE


class BlockHooks:
    """What a prompt method does around each transformer block. The default does nothing.

    before(layer, x) -> (x, x_ln): rewrite rows of the stream before block `layer`; return x_ln = ln_1(x)
        when it was computed on the way (the fused insertion), else None and the block applies ln_1.
    after(layer, x) -> x: for example drop rows that were only meant for one block.
    """

    def before(self, layer: int, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        return x, None

    def after(self, layer: int, x: Tensor) -> Tensor:
        return x


NO_HOOKS = BlockHooks()


def run_blocks(blocks, x: Tensor, hooks: BlockHooks = NO_HOOKS, *, causal: bool = False,
               checkpoint: bool = False) -> Tensor:
    """The blocks in order (ClipBlocks, or open_clip blocks), with the hooks around each."""
    scope = tower_scope(causal)
    for layer, block in enumerate(blocks):
        x, x_ln = hooks.before(layer, x)
        with torch.profiler.record_function(scope):
            x = apply_block(block, x, causal=causal, x_ln=x_ln, checkpoint=checkpoint)
        x = hooks.after(layer, x)
    return x


@runtime_checkable
class TextStream(Protocol):
    """The text tower stepped block by block (FullTextStream, PackedTextStream).

    layer: the next block; depth: the tower's number of blocks.
    rows(start, m): rows [start, start + m) of every sequence, (N, m, D), or (G, m, D) once per group when a
        stream computes a shared prefix holding them; differentiable.
    replace(rows, start): write rows shaped as rows() returned them, fused with the next block's ln_1.
    step(): run the next block. features(): ln_final and the projection at the EOT rows, (N, E).
    """

    layer: int
    depth: int

    def rows(self, start: int, m: int) -> Tensor: ...

    def replace(self, rows: Tensor, start: int) -> None: ...

    def step(self) -> None: ...

    def features(self) -> Tensor: ...


class _Stream:
    """What the streams share: the tower's blocks, the next block, the backend of the fused insertion, whether
    the blocks are recomputed in the backward (activation checkpointing)."""

    def __init__(self, blocks, backend: str, checkpoint: bool):
        self.blocks, self.backend, self.checkpoint = blocks, backend, checkpoint
        self.layer, self.depth = 0, len(blocks)

    def _next_block(self):
        if self.layer >= self.depth:
            raise ValueError(f"every block of this tower has run ({self.depth}); its stream has no next block")
        return self.blocks[self.layer]

    def _next_ln(self):
        return self._next_block().ln_1


def replace_with_ln(x: Tensor, prompts: Tensor, start: Optional[int], ln, backend: str) -> tuple[Tensor, Tensor]:
    """insert_prompts in replace mode fused with the block's ln_1 → (y, ln_1(y)): prompts ((m, D) shared or
    (N, m, D)) written at rows [start, start + m) of x (N, L, D); start None: the last m rows."""
    start = x.shape[1] - prompts.shape[-2] if start is None else start
    return insert_prompts(x, prompts, start, ln.weight, ln.bias, ln.eps, "replace", backend=backend)


class _DenseStream(_Stream):
    """A tower on whole sequences (N, L, D), its rows read and written in place: the image stream, and the text
    stream on full context-length sequences (`causal`)."""

    causal = False

    def rows(self, start: Optional[int], m: int) -> Tensor:
        """Rows [start, start + m) of every sequence (N, m, D); start None: the last m rows."""
        start = self.x.shape[1] - m if start is None else start
        return self.x[:, start:start + m]

    def replace(self, rows: Tensor, start: Optional[int] = None) -> None:
        """Write rows ((m, D) shared or (N, m, D)) at [start, start + m) (None: the last m rows), fused with the
        next block's ln_1."""
        self.x, self.x_ln = replace_with_ln(self.x, rows, start, self._next_ln(), self.backend)

    def step(self) -> None:
        block = self._next_block()
        with torch.profiler.record_function(tower_scope(self.causal)):
            self.x = apply_block(block, self.x, causal=self.causal, x_ln=self.x_ln, checkpoint=self.checkpoint)
        self.x_ln, self.layer = None, self.layer + 1


class ImageStream(_DenseStream):
    """The image tower from the stream after ln_pre (B, L, Dv), prompts included."""

    def __init__(self, clip, x: Tensor, backend: str = "auto", checkpoint: bool = False):
        super().__init__(clip.vision_blocks, backend, checkpoint)
        self.clip, self.x, self.x_ln = clip, x, None

    def features(self) -> Tensor:
        return self.clip.image_features(self.x)


class FullTextStream(_DenseStream):
    """The text tower on the full context-length sequences (pack_text=False): token embeddings (N, L, Dt) with
    the layer-0 prompts written, and the EOT row of each sequence (N,)."""

    causal = True

    def __init__(self, clip, embeddings: Tensor, eot: Tensor, backend: str = "auto", checkpoint: bool = False):
        super().__init__(clip.text_blocks, backend, checkpoint)
        self.clip, self.eot = clip, eot
        self.x, self.x_ln = clip.text_stream(embeddings), None

    def features(self) -> Tensor:
        return self.clip.text_features(self.x, self.eot)


class PackedTextStream(_Stream):
    """The text tower on the packed path (packed.py): the shared prefix (G, P, Dt) when there is one, and the
    packed suffix tokens (T, Dt). Token embeddings (N, L, Dt) with the layer-0 prompts written."""

    def __init__(self, clip, embeddings: Tensor, layout: PackedLayout, backend: str = "auto",
                 checkpoint: bool = False):
        super().__init__(clip.text_blocks, backend, checkpoint)
        pos = clip.text_positional_embedding.to(embeddings.dtype)
        p = layout.prefix_len
        self.clip, self.layout = clip, layout
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

    def replace(self, rows: Tensor, start: int) -> None:
        """Write `rows` (as rows() returned them) at [start, start + m), fused with the next block's ln_1; in the
        suffixes, straight into the packed tokens (insert_prompts with cu_seqlens: no padded copy)."""
        ln = self._next_ln()
        m = rows.shape[-2]
        if self.prefix is not None and rows.shape[0] == self.prefix.shape[0] and start + m <= self.prefix.shape[1]:
            self.prefix, self.prefix_ln = insert_prompts(self.prefix, rows, start, ln.weight, ln.bias, ln.eps,
                                                         "replace", backend=self.backend)
            return
        # checked here against the layout, so that insert_prompts need not check cu_seqlens (a host sync on CUDA)
        self._check_suffix_rows(start, m)
        self.x, self.x_ln = insert_prompts(self.x, rows, start, ln.weight, ln.bias, ln.eps, "replace",
                                           cu_seqlens=self.layout.cu, backend=self.backend, check_start=False)

    def rewrite(self, hooks: BlockHooks, in_prefix: bool) -> None:
        """Let `hooks` rewrite rows before the next block: in the prefix, or in the suffixes, the packed tokens
        themselves when the hooks have `before_packed`, else a padded view of them."""
        if in_prefix:
            self.prefix, self.prefix_ln = hooks.before(self.layer, self.prefix)
            return
        before_packed = getattr(hooks, "before_packed", None)
        if before_packed is not None:
            self.x, self.x_ln = before_packed(self.layer, self.x, self.layout.cu)
            return
        view, view_ln = hooks.before(self.layer, padded(self.x, self.layout))
        self.x = unpadded(view, self.layout)
        self.x_ln = unpadded(view_ln, self.layout) if view_ln is not None else None

    def step(self) -> None:
        """The next block (both parts), with the rows rewritten since the last step."""
        block, kv = self._next_block(), None
        recompute = self.checkpoint and torch.is_grad_enabled()
        with torch.profiler.record_function(TEXT_SCOPE):
            if self.prefix is not None:
                args = (block, self.prefix, self.prefix_ln)
                self.prefix, kv = (activation_checkpoint(prefix_block, *args, use_reentrant=False)
                                   if recompute else prefix_block(*args))
            args = (block, self.x, self.layout, self.x_ln, kv)
            self.x = (activation_checkpoint(packed_block, *args, use_reentrant=False)
                      if recompute else packed_block(*args))
        self.x_ln = self.prefix_ln = None
        self.layer += 1

    def features(self) -> Tensor:
        return self.clip.pooled_text_features(self.x[self.layout.eot_row])


Coupling = Callable[[int, Optional[ImageStream], Optional[TextStream]], None]


def run_towers(image: Optional[ImageStream], text: Optional[TextStream], couple: Coupling) -> None:
    """Step the towers given (either may be None) block by block together to their last block. Before each
    block, couple(layer, image, text) may read rows of either stream and replace them (DCP's CMPA); then the
    image block runs, then the text block. Towers stepped together must have as many blocks left."""
    towers = [s for s in (image, text) if s is not None]
    if not towers:
        raise ValueError("run_towers: no stream to step")
    left = {s.depth - s.layer for s in towers}
    if len(left) != 1:
        raise ValueError(f"run_towers steps the towers together, but they have {' and '.join(map(str, left))} "
                         "blocks left")
    for _ in range(left.pop()):
        couple(towers[0].layer, image, text)
        for stream in towers:
            stream.step()


def encode_packed(clip, embeddings: Tensor, layout: PackedLayout, prefix_hooks: BlockHooks = NO_HOOKS,
                  suffix_hooks: Optional[BlockHooks] = None, checkpoint: bool = False) -> Tensor:
    """Text features (N, E) of token embeddings (N, L, D) (layer-0 prompts already written), on the packed
    path; equal to clip.encode_text_stream on the full sequences up to float rounding. `prefix_hooks` rewrite
    rows of the shared prefix (G, P, D), `suffix_hooks` rows of the suffixes (packed.py); `checkpoint`
    recomputes each block in the backward (activation checkpointing)."""
    stream = PackedTextStream(clip, embeddings, layout, checkpoint=checkpoint)
    for _ in range(stream.depth):
        if stream.prefix is not None:
            stream.rewrite(prefix_hooks, in_prefix=True)
        if suffix_hooks is not None:
            stream.rewrite(suffix_hooks, in_prefix=False)
        stream.step()
    return stream.features()


__all__ = ["BlockHooks", "Coupling", "FullTextStream", "IMAGE_SCOPE", "ImageStream", "NO_HOOKS", "PackedTextStream",
           "TEXT_SCOPE", "TextStream", "encode_packed", "run_blocks", "run_towers", "tower_scope"]
