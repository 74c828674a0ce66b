"""Token sequences with slots for learnable prompt rows.

A template is a list of pieces: text (tokenized with open_clip's BPE) and slots of n placeholder rows that a
method overwrites with learnable prompts. Building the ids piece by piece gives the slot positions exactly
(searching for a placeholder token would also find it inside a class name), and a sequence that does not
fit the context is an error instead of a silent truncation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch

Piece = Union[str, "Slot"]


@dataclass(frozen=True)
class Slot:
    """n placeholder rows, filled by the method; `name` tells slots of one template apart."""

    name: str
    n: int


def _tokenizer():
    from open_clip.tokenizer import _tokenizer as bpe

    return bpe


def clean_classname(name: str) -> str:
    return name.replace("_", " ").strip()


def placeholder_id() -> int:
    """The id written at slot rows (CoOp's "X"); the rows are overwritten before the first block."""
    return _tokenizer().encode("X")[0]


@dataclass
class TokenizedPrompts:
    """ids (N, context_length) and, per slot name, the first row of that slot in each sequence (N,)."""

    ids: torch.Tensor
    slot_starts: dict[str, torch.Tensor]
    lengths: torch.Tensor  # tokens up to and including EOT, per sequence


def tokenize_templates(templates: Sequence[Sequence[Piece]], context_length: int) -> TokenizedPrompts:
    """Token ids of each template: [SOT] pieces... [EOT], zero-padded to `context_length`."""
    bpe = _tokenizer()
    x_id = placeholder_id()
    rows, starts = [], {}
    for i, pieces in enumerate(templates):
        ids = [bpe.sot_token_id]
        for piece in pieces:
            if isinstance(piece, Slot):
                starts.setdefault(piece.name, [0] * len(templates))[i] = len(ids)
                ids += [x_id] * piece.n
            elif piece:
                ids += bpe.encode(piece)
        ids.append(bpe.eot_token_id)
        if len(ids) > context_length:
            text = "".join(p if isinstance(p, str) else "X" * p.n for p in pieces)
            raise ValueError(f"the prompt {text!r} takes {len(ids)} tokens, more than the context length "
                             f"{context_length}: shorten the class name or use fewer context tokens")
        rows.append(ids)
    out = torch.zeros(len(rows), context_length, dtype=torch.long)
    for i, ids in enumerate(rows):
        out[i, : len(ids)] = torch.tensor(ids)
    return TokenizedPrompts(out, {k: torch.tensor(v) for k, v in starts.items()},
                            torch.tensor([len(r) for r in rows]))


def tokenize_words(text: str) -> list[int]:
    """BPE ids of a phrase (for initialising context vectors from words such as "a photo of a")."""
    return _tokenizer().encode(text)


def decode_words(ids: Sequence[int]) -> str:
    """The text of BPE ids (tokenize_words' inverse, up to spacing)."""
    return _tokenizer().decode(list(ids))
