"""The text side the methods share: per-class token sequences with slots for learnable rows, and the text
tower run over them — class by class in chunks, with activation checkpointing, and on the exact fast path
(sequences cut at EOT and packed, a shared prefix computed once; DESIGN.md, CLIP integration).

Options every method with a prompted text tower takes (TextPath):
  class_chunk      classes per text forward (None: all at once): bounds the memory of many sequences
  checkpoint_text  recompute the text blocks in the backward instead of keeping their activations
  pack_text        run the sequences cut at EOT and packed (True)
  prefix_reuse     compute the rows every class shares (SOS, shared context, template words) once (True)
Both fast paths are exact: they equal the full 77-token forward up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..ops import insert_prompts
from ..clip import (NO_HOOKS, FullTextStream, PackedLayout, PackedTextStream, TextStream, clean_classname,
                    decode_words, encode_packed, make_layout, tokenize_templates, tokenize_words)
from .base import normal_init

MAX_LAYOUTS = 32  # packed layouts kept per TextPrompts (chunks × batch sizes × devices)


@dataclass(frozen=True)
class TextPath:
    class_chunk: Optional[int] = None
    checkpoint_text: bool = False
    pack_text: bool = True
    prefix_reuse: bool = True

    def describe(self) -> dict:
        return dict(pack_text=self.pack_text, prefix_reuse=self.prefix_reuse, class_chunk=self.class_chunk,
                    checkpoint_text=self.checkpoint_text)


class TextPrompts(nn.Module):
    """Per-class token embeddings of a template with slots, the writing of learnable rows into them, and the
    text tower over them.

    Holds non-persistent buffers (recomputed from the class names, so not in checkpoints): the token ids,
    the frozen token embeddings, the EOT rows and each slot's per-class first row.

    shared_rows: how many leading rows the method keeps identical across the classes of one call at every
    block (None: as many as the token ids share, the slots holding one prompt for all classes). A method
    whose slot holds a different prompt per class caps it at the slot's first row. The shared prefix is the
    longest common run of token ids, within that cap, before every sequence's EOT.
    """

    def __init__(self, clip, templates, backend: str = "auto", shared_rows: Optional[int] = None):
        super().__init__()
        tok = tokenize_templates(templates, clip.context_length)
        self.register_buffer("ids", tok.ids, persistent=False)
        with torch.no_grad():
            self.register_buffer("embeddings", clip.token_embeddings(tok.ids).detach().clone(), persistent=False)
        eot = clip.eot_index(tok.ids)
        self.register_buffer("eot", eot, persistent=False)
        self.slot_names = list(tok.slot_starts)
        self._same_row = {}  # slot -> the row when every class has the slot there (an int: no per-call offsets)
        for name, starts in tok.slot_starts.items():
            self.register_buffer(f"start_{name}", starts, persistent=False)
            self._same_row[name] = int(starts[0]) if bool((starts == starts[0]).all()) else None
        differs = (tok.ids != tok.ids[0]).any(0).nonzero()
        common = int(differs[0]) if differs.numel() else tok.ids.shape[1]
        cap = common if shared_rows is None else min(common, shared_rows)
        self.prefix_len = max(0, min(cap, int(eot.min())))  # the EOT row always stays in the suffix
        self.backend = backend
        self._layouts: dict = {}

    def starts(self, slot: str):
        """A slot's first row: an int when every class has it at the same row, else the (C,) offsets."""
        row = self._same_row[slot]
        return row if row is not None else getattr(self, f"start_{slot}")

    def write(self, embeddings: Tensor, slot: str, rows: Tensor, classes: Optional[slice] = None) -> Tensor:
        """Overwrite a slot with `rows` ((n, D) shared, or (C, n, D) per class) in `embeddings` (C, L, D)."""
        start = self.starts(slot)
        if isinstance(start, Tensor) and classes is not None:
            start = start[classes]
        return insert_prompts(embeddings, rows, start, mode="replace", backend=self.backend, check_start=False)[0]

    def layout(self, classes: slice, prefix_len: int, device, repeat: int = 1) -> PackedLayout:
        """The packed layout of these classes, `repeat` sequences per class laid out repeat-major (TMML's image ×
        class). It depends only on the token ids, so it is built once per chunk, prefix, repeat and device: making
        one reads the EOT rows on the host (a sync on CUDA), which a training step must not do."""
        key = (classes.start, classes.stop, prefix_len, str(device), repeat)
        if key not in self._layouts:
            if len(self._layouts) >= MAX_LAYOUTS:  # a run sees a few batch sizes; drop the oldest beyond that
                self._layouts.pop(next(iter(self._layouts)))
            eot = self.eot[classes].repeat(repeat)
            self._layouts[key] = make_layout(eot, self.ids.shape[1], prefix_len).to(device)
        return self._layouts[key]

    def stream(self, clip, embeddings: Tensor, path: TextPath) -> TextStream:
        """The text tower over every class as a stream to step block by block (for methods that drive the
        towers themselves, fastprompt.clip.run_towers), on the path `path` selects."""
        classes = slice(0, self.ids.shape[0])
        if not path.pack_text:
            return FullTextStream(clip, embeddings, self.eot, self.backend, path.checkpoint_text)
        layout = self.layout(classes, self.prefix_for(path), embeddings.device)
        return PackedTextStream(clip, embeddings, layout, self.backend, path.checkpoint_text)

    def prefix_for(self, path: TextPath) -> int:
        return self.prefix_len if path.pack_text and path.prefix_reuse else 0

    def encode(self, clip, build: Callable[[slice], Tensor], path: TextPath, hooks=None,
               suffix_hooks: Optional[Callable[[slice, int], object]] = None) -> Tensor:
        """Text features (C, E) of every class, `path.class_chunk` classes at a time.

        build(slice) -> the token embeddings of those classes with the layer-0 prompts written.
        hooks: rewrite rows inside the shared prefix (the context rows) before blocks.
        suffix_hooks(slice, offset) -> hooks that rewrite rows after it, counted from row `offset` (MAP-DAFE).
        """
        n_classes = self.ids.shape[0]
        chunk = path.class_chunk or n_classes
        feats = []
        for lo in range(0, n_classes, chunk):
            sl = slice(lo, min(lo + chunk, n_classes))
            feats.append(self.encode_chunk(clip, build(sl), sl, path, hooks, suffix_hooks))
        return torch.cat(feats) if len(feats) > 1 else feats[0]

    def encode_chunk(self, clip, embeddings: Tensor, classes: slice, path: TextPath, hooks=None,
                     suffix_hooks: Optional[Callable[[slice, int], object]] = None, repeat: int = 1) -> Tensor:
        """Text features of one chunk of classes: embeddings (c·repeat, L, D) with the layer-0 prompts written,
        `repeat` sequences per class laid out repeat-major (TMML's image × class)."""
        prefix = self.prefix_for(path)
        later = suffix_hooks(classes, prefix) if suffix_hooks is not None else None
        if hooks is not None and later is not None and not prefix:
            raise ValueError("prefix and suffix hooks cannot both act on one stream")
        if not path.pack_text:
            return clip.encode_text_stream(clip.text_stream(embeddings), self.eot[classes].repeat(repeat),
                                           later or hooks or NO_HOOKS, checkpoint=path.checkpoint_text)
        layout = self.layout(classes, prefix, embeddings.device, repeat)
        if prefix:
            return encode_packed(clip, embeddings, layout, hooks or NO_HOOKS, later, checkpoint=path.checkpoint_text)
        return encode_packed(clip, embeddings, layout, NO_HOOKS, later or hooks, checkpoint=path.checkpoint_text)


def context_init(clip, n_ctx: int, ctx_init: Optional[str], shape_prefix=()) -> tuple[nn.Parameter, int, str]:
    """Context vectors (*shape_prefix, n, Dt), their number n and the text that follows them in the template.

    Without ctx_init: N(0, 0.02²), n = n_ctx, no text. With ctx_init, word for word as the public CoOp / CoCoOp
    codes: n is the number of words (`len(ctx_init.split())`, n_ctx ignored) and the context starts as the
    embeddings of the phrase's first n tokens. Their prompt is the whole phrase followed by the class name, of
    which the first n token rows are replaced by the context, so a word that BPE splits into several tokens
    leaves the phrase's last tokens in the template as fixed words: "a pixelated photo of a" is 6 tokens and 5
    words, so 5 vectors ("a pixel ated photo of") and the fixed word "a" before the class name. A public
    checkpoint made with such a phrase then loads (its ctx is (5, Dt)) and runs the same prompt."""
    if not ctx_init:
        return normal_init((*shape_prefix, n_ctx, clip.text_width)), n_ctx, ""
    phrase = clean_classname(ctx_init)
    ids = tokenize_words(phrase)
    n = len(phrase.split())
    rest = decode_words(ids[n:]).strip() if len(ids) > n else ""
    if tokenize_words(rest) != ids[n:]:
        raise ValueError(f"ctx_init {ctx_init!r}: its tokens after the first {n} (one per word) do not tokenise "
                         f"alone as they do in the phrase ({rest!r}), so the public prompt cannot be rebuilt from "
                         "text: rephrase it, or give n_ctx without ctx_init")
    with torch.no_grad():
        vectors = clip.token_embeddings(torch.tensor(ids[:n], device=clip.model.logit_scale.device))
    vectors = vectors.detach().clone().cpu().expand(*shape_prefix, n, vectors.shape[-1]).clone()
    return nn.Parameter(vectors), n, rest


def after_context(words: str, name: str) -> str:
    """The text after the context in a prompt with the class at the end: the fixed words a ctx_init leaves
    (context_init), the class name and a full stop, each after a space."""
    return " ".join(["", *words.split(), name]) + "."
