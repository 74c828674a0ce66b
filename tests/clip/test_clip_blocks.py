"""The block adapter (fastprompt/clip/blocks.py): every forward fastprompt composes of it (full sequences,
packed suffixes, a shared prefix) equals the block's own forward in float64, for each block style it accepts:
open_clip 3.3's (nn.MultiheadAttention, batch-first or not; its custom block with open_clip's Attention) and
open_clip 4.x's (tests/open_clip_main.py, written here); everything it does not model is refused by name."""

import pathlib
import re

import open_clip
import pytest
import torch
from open_clip.transformer import CustomResidualAttentionBlock, QuickGELU, ResidualAttentionBlock
from torch import nn

from fastprompt import methods
from fastprompt.clip import ClipBackbone, ClipBlock, UnsupportedModelError, create_clip, make_layout
from fastprompt.clip.packed import packed_block, prefix_block

from ..method_helpers import CLASSNAMES, batch
from ..open_clip_main import MainAttention, MainBlock, convert_to_main_blocks

WIDTH, HEADS = 40, 5  # head width 8


def _randomised(block: nn.Module) -> nn.Module:
    """float64, the matrices drawn afresh and every vector (biases, norm weights, layer scales) shifted by noise:
    open_clip initialises the biases to zero, which would hide a bias the forward forgot."""
    block = block.double()
    with torch.no_grad():
        for p in block.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    return block.eval()


def _open_clip_3(batch_first=True):
    return ResidualAttentionBlock(WIDTH, HEADS, ls_init_value=0.5, act_layer=QuickGELU, batch_first=batch_first)


STYLES = {
    "3.x-batch-first": lambda: _open_clip_3(),
    "3.x-seq-first": lambda: _open_clip_3(batch_first=False),
    "3.x-custom": lambda: CustomResidualAttentionBlock(WIDTH, HEADS, ls_init_value=0.5, act_layer=QuickGELU,
                                                       scale_fc=True),  # open_clip's Attention, a norm in the MLP
    "4.x": lambda: MainBlock(WIDTH, HEADS, ls_init_value=0.5),
}


def _own_forward(block, x, mask=None):
    """The block's own forward on (N, L, D): an nn.MultiheadAttention block that is not batch-first takes
    (L, N, D)."""
    if isinstance(block.attn, nn.MultiheadAttention) and not block.attn.batch_first:
        return block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
    return block(x, attn_mask=mask)


def _causal(length):
    return torch.full((length, length), float("-inf"), dtype=torch.float64).triu(1)  # open_clip's text mask


@pytest.fixture(params=list(STYLES))
def block(request):
    torch.manual_seed(list(STYLES).index(request.param))
    return _randomised(STYLES[request.param]())


@pytest.mark.parametrize("causal", [False, True], ids=["image", "text"])
def test_the_full_forward_is_the_blocks_own(block, causal):
    x = torch.randn(3, 11, WIDTH, dtype=torch.float64, requires_grad=True)
    adapter = ClipBlock(block)
    want = _own_forward(block, x, _causal(11) if causal else None)
    got = adapter(x, causal=causal)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # with ln_1(x) handed in, as the fused prompt insertion does
    torch.testing.assert_close(adapter(x, causal=causal, x_ln=block.ln_1(x)), want, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(want)
    (want_grad,) = torch.autograd.grad(want, x, upstream)
    (got_grad,) = torch.autograd.grad(got, x, upstream)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-12)


def test_the_packed_and_prefix_forwards_are_the_blocks_own(block):
    """Sequences cut at their EOT and packed, with and without a shared prefix computed once, against the block's
    causal forward on the full sequences (the rows up to each EOT)."""
    adapter = ClipBlock(block)
    eot, length, p = torch.tensor([4, 9, 2, 6]), 10, 2
    x = torch.randn(4, length, WIDTH, dtype=torch.float64)
    x[:, :p] = x[0, :p]  # a prefix every sequence shares
    want = _own_forward(block, x, _causal(length))

    layout = make_layout(eot, length)
    packed = packed_block(adapter, x.reshape(-1, WIDTH)[layout.source], layout)
    torch.testing.assert_close(packed, want.reshape(-1, WIDTH)[layout.source], rtol=1e-12, atol=1e-12)

    layout = make_layout(eot, length, prefix_len=p)
    prefix, kv = prefix_block(adapter, x[:1, :p], None)
    suffix = packed_block(adapter, x.reshape(-1, WIDTH)[layout.source], layout, None, kv)
    torch.testing.assert_close(prefix, want[:1, :p], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(suffix, want.reshape(-1, WIDTH)[layout.source], rtol=1e-12, atol=1e-12)


def _with(module: nn.Module, **parts) -> nn.Module:
    """The module with parts set (a module, parameter or attribute each)."""
    for name, part in parts.items():
        setattr(module, name, part)
    return module


def _with_attention(block: nn.Module, **parts) -> nn.Module:
    """The block, its attention with parts set."""
    _with(block.attn, **parts)
    return block


def _mha_block(**mha) -> nn.Module:
    return _with(_open_clip_3(), attn=nn.MultiheadAttention(WIDTH, HEADS, batch_first=True, **mha))


# what each block holds that the adapter does not model, as its error message names it
REFUSED = {
    "qk norm (ln_q)": lambda: MainBlock(24, 3, qk_norm=True),
    "scaled cosine attention (logit_scale)": lambda: MainBlock(24, 3, scaled_cosine=True),
    "per-head scaling of the attention output (head_scale)": lambda: MainBlock(24, 3, scale_heads=True),
    "a norm of the attention output before out_proj (ln_inner)": lambda: MainBlock(24, 3, inner_norm=True),
    "attention dropout (attn_drop)": lambda: MainBlock(24, 3, attn_drop=0.1),
    "dropout after out_proj (out_drop)": lambda: MainBlock(24, 3, proj_drop=0.1),
    "separate q/k/v projections (q_proj_weight, k_proj_weight, v_proj_weight)":
        lambda: MainBlock(24, 3, separate_qkv=True),
    "an attention scale of 0.5 (not 1/sqrt(8))": lambda: _with_attention(MainBlock(24, 3), scale=0.5),
    "an attention part rope (Linear)": lambda: _with_attention(MainBlock(24, 3), rope=nn.Linear(8, 8)),
    "an attention parameter temperature":
        lambda: _with_attention(MainBlock(24, 3), temperature=nn.Parameter(torch.ones(1))),
    "an attention of in_proj_weight (72, 24), out_proj (24, 24) and 5 heads over width 24":
        lambda: _with_attention(MainBlock(24, 3), num_heads=5),
    "cross-attention (ln_1_kv)": lambda: MainBlock(24, 3, cross_attention=True),
    "a norm after the attention (ln_attn, open_clip's scale_attn)":
        lambda: CustomResidualAttentionBlock(24, 3, scale_attn=True),
    "a part adapter (Linear)": lambda: _with(MainBlock(24, 3), adapter=nn.Linear(24, 24)),
    "a parameter gate of the block itself": lambda: _with(MainBlock(24, 3), gate=nn.Parameter(torch.ones(1))),
    "an ln_1 that is RMSNorm, not a LayerNorm with weight and bias":
        lambda: _with(MainBlock(24, 3), ln_1=nn.RMSNorm(24)),
    "an ln_1 that is LayerNorm, not a LayerNorm with weight and bias":
        lambda: _with(MainBlock(24, 3), ln_1=nn.LayerNorm(24, elementwise_affine=False)),
    "key/value biases (bias_k, bias_v)": lambda: _mha_block(add_bias_kv=True),
    "attention dropout (p=0.1)": lambda: _mha_block(dropout=0.1),
    "a zero attention row (add_zero_attn)": lambda: _mha_block(add_zero_attn=True),
    "separate q/k/v projections": lambda: _mha_block(kdim=16, vdim=16),
}


@pytest.mark.parametrize("what", list(REFUSED))
def test_what_the_adapter_does_not_model_is_refused_by_name(what):
    block = REFUSED[what]()
    with pytest.raises(UnsupportedModelError, match=re.escape(f"the image blocks have {what}")):
        ClipBlock(block, "image")


def test_blocks_of_another_kind_are_named():
    class ModernBlock(nn.Module):  # open_clip 4.x's ModernTextBlock names its parts otherwise
        def __init__(self):
            super().__init__()
            self.norm1, self.attn, self.norm2, self.mlp = nn.LayerNorm(8), nn.Identity(), nn.LayerNorm(8), nn.Identity()

    with pytest.raises(UnsupportedModelError, match=r"the text blocks are ModernBlock, which has no ln_1, ls_1, ln_2, "
                                                    r"ls_2; fastprompt drives pre-norm residual attention blocks"):
        ClipBlock(ModernBlock(), "text")
    with pytest.raises(UnsupportedModelError, match="the text attention is Identity; fastprompt reads self-attention "
                                                    "with in_proj_weight"):
        ClipBlock(_with(MainBlock(24, 3), attn=nn.Identity()), "text")


@pytest.mark.parametrize("part,what", [("qk_norm", "qk norm (ln_q)"),
                                       ("scaled_cosine_attn", "scaled cosine attention (logit_scale)"),
                                       ("scale_heads", "per-head scaling of the attention output (head_scale)"),
                                       ("scale_attn_inner", "a norm of the attention output before out_proj"),
                                       ("scale_attn", "a norm after the attention (ln_attn")])
def test_open_clips_switchable_block_parts_are_refused_when_a_clip_is_wrapped(part, what):
    """open_clip 3.3's own models with the switches of its custom blocks, image tower and text tower."""
    vision = dict(image_size=32, patch_size=8, width=48, head_width=16, layers=1)
    text = dict(context_length=77, vocab_size=49408, width=40, heads=5, layers=1)
    with pytest.raises(UnsupportedModelError, match=re.escape(f"the image blocks have {what}")):
        ClipBackbone(open_clip.model.CLIP(32, {**vision, part: True}, text))
    with pytest.raises(UnsupportedModelError, match=re.escape(f"the text blocks have {what}")):
        ClipBackbone(open_clip.model.CLIP(32, vision, {**text, part: True}))


def test_open_clips_custom_blocks_without_those_parts_are_driven_like_open_clip():
    """block_type "custom" (open_clip's Attention), a LayerNorm inside the MLP (scale_fc) and layer scale: the
    towers equal open_clip's encode_image / encode_text."""
    extra = dict(block_type="custom", scale_fc=True, ls_init_value=0.3)
    model = open_clip.model.CLIP(32, dict(image_size=32, patch_size=8, width=48, head_width=16, layers=2, **extra),
                                 dict(context_length=77, vocab_size=49408, width=40, heads=5, layers=2, **extra),
                                 quick_gelu=True).eval()
    assert all(isinstance(b, CustomResidualAttentionBlock) for b in model.transformer.resblocks)
    backbone = ClipBackbone(model)
    images, tokens = torch.randn(2, 3, 32, 32), open_clip.tokenize(["a photo of a cat.", "x"])
    with torch.no_grad():
        torch.testing.assert_close(backbone.encode_image(images), model.encode_image(images), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(backbone.encode_text(tokens), model.encode_text(tokens), rtol=1e-5, atol=1e-6)


def test_a_clip_with_open_clip_4_blocks_is_driven_like_open_clip():
    """The tiny CLIP with every block in its open_clip 4.x form (the same parameters): the towers equal the
    model's own forward through those blocks and the 3.x model's, and a method (DCP, both towers stepped
    together) gives the 3.x model's logits."""
    images, _ = batch()
    tokens = open_clip.tokenize(["a photo of a dog.", "an airplane", "x"])
    model = create_clip("fastprompt-tiny")
    with torch.no_grad():
        image_3x, text_3x = model.encode_image(images), model.encode_text(tokens)
    torch.manual_seed(5)
    want = methods.build("dcp", model, CLASSNAMES, **methods.SMALL_MODEL_CONFIGS["dcp"])(images)

    model = convert_to_main_blocks(create_clip("fastprompt-tiny"))
    assert all(isinstance(b.attn, MainAttention) for b in model.visual.transformer.resblocks)
    backbone = ClipBackbone(model)
    with torch.no_grad():
        for got, own, old in ((backbone.encode_image(images), model.encode_image(images), image_3x),
                              (backbone.encode_text(tokens), model.encode_text(tokens), text_3x)):
            torch.testing.assert_close(got, own, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(own, old, rtol=1e-5, atol=1e-6)
    torch.manual_seed(5)
    got = methods.build("dcp", model, CLASSNAMES, **methods.SMALL_MODEL_CONFIGS["dcp"])(images)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_open_clip_range_reaches_as_far_as_these_tests():
    """setup.py declares the open_clip versions tested here: the installed one (CI's, the newest release) and
    the 4.x line whose blocks tests/open_clip_main.py writes; not 5."""
    from packaging.specifiers import SpecifierSet

    setup = (pathlib.Path(__file__).parents[2] / "setup.py").read_text()
    (spec,) = re.findall(r'"open_clip_torch([^";]*)"', setup)
    versions = SpecifierSet(spec, prereleases=True)
    assert open_clip.__version__ in versions
    assert "4.2.0.dev0" in versions and "5.0.0" not in versions
