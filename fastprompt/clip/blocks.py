"""One open_clip transformer block, read through one adapter: the only place that knows what a block holds.

fastprompt re-implements the block forward over the block's own parameters (no weight copies), so that the
fused prompt insertion can stand in for ln_1 and the packed text path can lay attention out its own way. Every
forward fastprompt runs (full sequences, packed suffixes, a shared prefix) is composed of the adapter's parts:

    h = ln_1(x)                        or the fused insertion's y_ln
    q, k, v = block.qkv(h)             the in-projection: (..., D) each
    o = softmax(q kᵀ / √dh) v          per head, laid out by the caller (causal mask, prefix keys, padding)
    x = block.attention_residual(x, o) x + ls_1(out_proj(o))
    x = block.mlp_residual(x)          x + ls_2(mlp(ln_2(x)))

Two block styles are read. open_clip 2.x and 3.x blocks hold an nn.MultiheadAttention (batch-first or not:
the module is never called, only its parameters are read, so its layout flag does not matter). open_clip 4.x
(its main branch) replaced it with open_clip's own `Attention` module, with the same parameter names
(in_proj_weight, in_proj_bias, out_proj, num_heads) and switchable extras; open_clip 3.x's custom blocks hold an
earlier form of it. Everything a block or its attention may hold that the forward above does not model is
refused by name when the CLIP is wrapped, so that no model runs a different function than open_clip's: qk norm
(ln_q, ln_k), scaled cosine attention (logit_scale), per-head output scaling (head_scale), a norm inside the
attention (ln_inner) or after it (ln_attn), separate q/k/v projections, key/value biases, a zero attention
row, attention or output dropout, an attention scale other than 1/√dh, cross-attention (ln_1_kv), and any part
or parameter not named here. ln_2, mlp, ls_1 and ls_2 are called as the modules they are (any MLP, LayerScale
or Identity is exact); ln_1 must be a LayerNorm with weight and bias, since the fused insertion computes it.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint


class UnsupportedModelError(ValueError):
    """The open_clip model has a part fastprompt cannot drive; the message names it."""


# what the forward reads from a block, in the order it reads them
BLOCK_PARTS = ("ln_1", "attn", "ls_1", "ln_2", "mlp", "ls_2")
# parts a block may hold only as an Identity, and parts it may not hold at all: what each one is
_BLOCK_IDENTITY_PARTS = {"ln_attn": "a norm after the attention (ln_attn, open_clip's scale_attn)"}
_BLOCK_REFUSED_PARTS = {"ln_1_kv": "cross-attention (ln_1_kv)"}

# the attention module: the parameters the forward reads, and those whose presence means a function it does not
# model (4.x registers the unused ones as None, so only the present ones appear)
_ATTENTION_PARAMETERS = ("in_proj_weight", "in_proj_bias")
_ATTENTION_REFUSED_PARAMETERS = {
    "q_proj_weight": "separate q/k/v projections (q_proj_weight, k_proj_weight, v_proj_weight)",
    "k_proj_weight": "separate q/k/v projections (q_proj_weight, k_proj_weight, v_proj_weight)",
    "v_proj_weight": "separate q/k/v projections (q_proj_weight, k_proj_weight, v_proj_weight)",
    "logit_scale": "scaled cosine attention (logit_scale)",
    "head_scale": "per-head scaling of the attention output (head_scale)",
    "bias_k": "key/value biases (bias_k, bias_v)",
    "bias_v": "key/value biases (bias_k, bias_v)",
}
_ATTENTION_IDENTITY_PARTS = {"ln_q": "qk norm (ln_q)", "ln_k": "qk norm (ln_k)",
                             "ln_inner": "a norm of the attention output before out_proj (ln_inner)"}
_ATTENTION_DROPOUT_PARTS = {"attn_drop": "attention dropout (attn_drop)",
                            "out_drop": "dropout after out_proj (out_drop)"}


def _refuse(where: str, what: str) -> None:
    raise UnsupportedModelError(f"fastprompt.clip: the {where} blocks have {what}, which fastprompt does not drive")


def check_block(block: nn.Module, where: str = "given") -> None:
    """Refuse, naming the part, a block whose forward is not the one the adapter computes."""
    missing = [p for p in BLOCK_PARTS if not isinstance(getattr(block, p, None), nn.Module)]
    if missing:
        raise UnsupportedModelError(
            f"fastprompt.clip: the {where} blocks are {type(block).__name__}, which has no {', '.join(missing)}; "
            f"fastprompt drives pre-norm residual attention blocks ({', '.join(BLOCK_PARTS)}: open_clip's "
            "ResidualAttentionBlock)")
    for name, child in block.named_children():
        if name in BLOCK_PARTS or (name in _BLOCK_IDENTITY_PARTS and isinstance(child, nn.Identity)):
            continue
        _refuse(where, _BLOCK_IDENTITY_PARTS.get(name) or _BLOCK_REFUSED_PARTS.get(name)
                or f"a part {name} ({type(child).__name__})")
    for name, _ in block.named_parameters(recurse=False):
        _refuse(where, f"a parameter {name} of the block itself")
    ln = block.ln_1
    if not (isinstance(ln, nn.LayerNorm) and len(ln.normalized_shape) == 1 and ln.weight is not None
            and ln.bias is not None):
        _refuse(where, f"an ln_1 that is {type(ln).__name__}, not a LayerNorm with weight and bias over the width "
                "(the fused prompt insertion computes it)")
    _check_attention(block.attn, where, ln.normalized_shape[0])


def _check_attention(attn: nn.Module, where: str, width: int) -> None:
    for name, _ in attn.named_parameters(recurse=False):
        if name not in _ATTENTION_PARAMETERS:
            _refuse(where, _ATTENTION_REFUSED_PARAMETERS.get(name, f"an attention parameter {name}"))
    for name, child in attn.named_children():
        if name == "out_proj" and isinstance(child, nn.Linear):
            continue
        if name in _ATTENTION_IDENTITY_PARTS and isinstance(child, nn.Identity):
            continue
        if name in _ATTENTION_DROPOUT_PARTS and isinstance(child, nn.Dropout) and child.p == 0:
            continue
        _refuse(where, _ATTENTION_IDENTITY_PARTS.get(name) or _ATTENTION_DROPOUT_PARTS.get(name)
                or f"an attention part {name} ({type(child).__name__})")
    weight, heads = getattr(attn, "in_proj_weight", None), getattr(attn, "num_heads", None)
    if not isinstance(weight, Tensor) or not isinstance(heads, int) or not isinstance(getattr(attn, "out_proj", None),
                                                                                      nn.Linear):
        raise UnsupportedModelError(
            f"fastprompt.clip: the {where} attention is {type(attn).__name__}; fastprompt reads self-attention with "
            "in_proj_weight, in_proj_bias, out_proj and num_heads (nn.MultiheadAttention, open_clip's Attention)")
    out_shape = tuple(attn.out_proj.weight.shape)
    if weight.shape != (3 * width, width) or out_shape != (width, width) or width % heads:
        _refuse(where, f"an attention of in_proj_weight {tuple(weight.shape)}, out_proj {out_shape} and {heads} heads "
                f"over width {width} (not a self-attention of the block's width)")
    if getattr(attn, "dropout", 0.0):  # nn.MultiheadAttention's own dropout probability
        _refuse(where, f"attention dropout (p={attn.dropout})")
    if getattr(attn, "add_zero_attn", False):
        _refuse(where, "a zero attention row (add_zero_attn)")
    scale = getattr(attn, "scale", None)  # open_clip's Attention keeps its softmax scale
    if scale is not None and not math.isclose(scale, (width // heads) ** -0.5, rel_tol=1e-6):
        _refuse(where, f"an attention scale of {scale} (not 1/sqrt({width // heads}))")


class ClipBlock:
    """One checked block of a tower, read through its parts. It holds the open_clip block (`module`) and reads
    its parameters at every call, so moving or casting the model carries over."""

    def __init__(self, block: nn.Module, where: str = "given"):
        check_block(block, where)
        self.module = block

    @property
    def ln_1(self) -> nn.LayerNorm:
        """The LayerNorm before the attention: the fused prompt insertion takes its weight, bias and eps."""
        return self.module.ln_1

    @property
    def heads(self) -> int:
        return self.module.attn.num_heads

    @property
    def width(self) -> int:
        return self.module.ln_1.normalized_shape[0]

    def qkv(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The in-projection of ln_1(x): q, k, v, (..., D) each (views of one projection)."""
        attn = self.module.attn
        return F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)

    def split_heads(self, t: Tensor) -> Tensor:
        """(N, L, D) → (N, H, L, dh), the layout of scaled_dot_product_attention."""
        n, length, d = t.shape
        return t.view(n, length, self.heads, d // self.heads).transpose(1, 2)

    @staticmethod
    def merge_heads(o: Tensor) -> Tensor:
        """(N, H, L, dh) → (N, L, D)."""
        n, heads, length, dh = o.shape
        return o.transpose(1, 2).reshape(n, length, heads * dh)

    def attention_residual(self, x: Tensor, o: Tensor) -> Tensor:
        """x + ls_1(out_proj(o)), o the attention output with its heads merged (..., D)."""
        out = self.module.attn.out_proj
        return x + self.module.ls_1(F.linear(o, out.weight, out.bias))

    def mlp_residual(self, x: Tensor) -> Tensor:
        """x + ls_2(mlp(ln_2(x)))."""
        block = self.module
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    def __call__(self, x: Tensor, *, causal: bool = False, x_ln: Optional[Tensor] = None) -> Tensor:
        """The block on a batch-first stream (N, L, D); x_ln: ln_1(x) when the caller already has it."""
        h = self.ln_1(x) if x_ln is None else x_ln
        q, k, v = (self.split_heads(t) for t in self.qkv(h))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.mlp_residual(self.attention_residual(x, self.merge_heads(o)))


def as_block(block: Union[ClipBlock, nn.Module]) -> ClipBlock:
    """A ClipBlock as it is; an open_clip block checked and wrapped."""
    return block if isinstance(block, ClipBlock) else ClipBlock(block)


def block_forward(block: Union[ClipBlock, nn.Module], x: Tensor, *, causal: bool = False,
                  x_ln: Optional[Tensor] = None) -> Tensor:
    """open_clip's block forward on a batch-first stream (N, L, D), over the block's parameters.

    x_ln: ln_1(x) when the caller already has it (the fused prompt insertion); else ln_1 is applied here.
    """
    return as_block(block)(x, causal=causal, x_ln=x_ln)


def apply_block(block: Union[ClipBlock, nn.Module], x: Tensor, *, causal: bool = False,
                x_ln: Optional[Tensor] = None, checkpoint: bool = False) -> Tensor:
    """block_forward, recomputed in the backward instead of keeping its activations when `checkpoint`
    (activation checkpointing bounds the memory of methods that run many sequences)."""
    block = as_block(block)
    if checkpoint and torch.is_grad_enabled():
        return activation_checkpoint(_block_call, block, x, causal, x_ln, use_reentrant=False)
    return block(x, causal=causal, x_ln=x_ln)


def _block_call(block: ClipBlock, x: Tensor, causal: bool, x_ln: Optional[Tensor]) -> Tensor:
    return block(x, causal=causal, x_ln=x_ln)


__all__ = ["BLOCK_PARTS", "ClipBlock", "UnsupportedModelError", "apply_block", "as_block", "block_forward",
           "check_block"]
