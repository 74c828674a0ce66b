"""Blocks with the structure of open_clip 4.x (its main branch, 4.2.0.dev0 when this was written), written here:
the installed open_clip (3.3) still builds its blocks around nn.MultiheadAttention.

open_clip 4.x has its own `Attention` module in `ResidualAttentionBlock`: the same parameter names as
nn.MultiheadAttention (in_proj_weight (3D, D), in_proj_bias, out_proj, num_heads), no batch_first (streams are
(N, L, D)), a `scale` it passes to scaled_dot_product_attention, and switchable parts, each registered even
when off (as an Identity, a None parameter or a Dropout of p = 0): ln_q / ln_k (qk norm), logit_scale (scaled
cosine attention), head_scale (per-head output scaling), ln_inner (a norm before out_proj), attn_drop and
out_drop, and q/k/v_proj_weight in place of in_proj_weight when the key or value width differs. The forward here
is the self-attention path with every switchable part off (what fastprompt accepts); the parts that switch on
are built so that the refusals can be tested.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from open_clip.transformer import LayerNorm, LayerScale, QuickGELU
from torch import nn


class MainAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True, qk_norm: bool = False,
                 scaled_cosine: bool = False, scale_heads: bool = False, inner_norm: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, separate_qkv: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.scaled_cosine, self.scale_heads = scaled_cosine, scale_heads
        self.logit_scale_max = math.log(100.0)
        self.use_sdpa = True
        if separate_qkv:  # 4.x's layout when kdim / vdim differ from dim
            self.in_proj_weight = None
            self.q_proj_weight, self.k_proj_weight, self.v_proj_weight = (
                nn.Parameter(torch.randn(dim, dim) * dim ** -0.5) for _ in range(3))
        else:
            self.in_proj_weight = nn.Parameter(torch.randn(3 * dim, dim) * dim ** -0.5)
            self.q_proj_weight = self.k_proj_weight = self.v_proj_weight = None
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim)) if qkv_bias else None
        self.ln_q = LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.ln_k = LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0))) if scaled_cosine else None
        self.attn_drop = nn.Dropout(attn_drop)
        self.head_scale = nn.Parameter(torch.ones(num_heads, 1, 1)) if scale_heads else None
        self.ln_inner = LayerNorm(dim) if inner_norm else nn.Identity()
        self.out_proj = nn.Linear(dim, dim)
        self.out_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        n, length, d = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(n, length, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(self.ln_q(q), self.ln_k(k), v, attn_mask=attn_mask,
                                           dropout_p=self.attn_drop.p if self.training else 0.0, scale=self.scale)
        o = o.transpose(1, 2).reshape(n, length, d)
        return self.out_drop(self.out_proj(self.ln_inner(o)))


class MainBlock(nn.Module):
    """open_clip 4.x's ResidualAttentionBlock (pre-norm; LayerScale when ls_init_value is given; ln_1_kv for
    cross-attention), on (N, L, D), with an additive float mask as open_clip passes it."""

    def __init__(self, dim: int, heads: int, *, ls_init_value: Optional[float] = None, cross_attention: bool = False,
                 **attention):
        super().__init__()
        self.ln_1 = LayerNorm(dim)
        self.attn = MainAttention(dim, heads, **attention)
        self.ls_1 = LayerScale(dim, ls_init_value) if ls_init_value is not None else nn.Identity()
        if cross_attention:
            self.ln_1_kv = LayerNorm(dim)
        self.ln_2 = LayerNorm(dim)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(dim, 4 * dim)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(4 * dim, dim))]))
        self.ls_2 = LayerScale(dim, ls_init_value) if ls_init_value is not None else nn.Identity()

    def get_weight_dtype(self) -> torch.dtype:  # open_clip's towers cast their input to it
        return self.mlp.c_fc.weight.dtype

    def forward(self, q_x: torch.Tensor, k_x=None, v_x=None, attn_mask: Optional[torch.Tensor] = None):
        mask = attn_mask.to(q_x.dtype) if attn_mask is not None else None
        x = q_x + self.ls_1(self.attn(self.ln_1(q_x), attn_mask=mask))
        return x + self.ls_2(self.mlp(self.ln_2(x)))

    @classmethod
    def like(cls, block: nn.Module) -> "MainBlock":
        """The 4.x block holding the parameters of an open_clip 3.x block (nn.MultiheadAttention): what loading
        the same checkpoint into open_clip 4.x builds. The norms, MLP and layer scales are the same modules."""
        dim, heads = block.ln_1.normalized_shape[0], block.attn.num_heads
        new = cls(dim, heads).to(block.ln_1.weight.dtype)
        for name in ("ln_1", "ls_1", "ln_2", "mlp", "ls_2"):
            setattr(new, name, getattr(block, name))
        with torch.no_grad():
            new.attn.in_proj_weight.copy_(block.attn.in_proj_weight)
            new.attn.in_proj_bias.copy_(block.attn.in_proj_bias)
        new.attn.out_proj = block.attn.out_proj
        return new


def convert_to_main_blocks(model: nn.Module) -> nn.Module:
    """Every block of both towers of an open_clip 3.x CLIP replaced, in place, by its 4.x form."""
    text = model.text if hasattr(model, "text") else model
    for tower in (model.visual.transformer, text.transformer):
        assert getattr(tower, "batch_first", True)  # the 4.x blocks take (N, L, D)
        tower.resblocks = nn.ModuleList([MainBlock.like(b) for b in tower.resblocks])
    return model
