"""DCP against a straightforward eager implementation written here: both towers stepped together through
open_clip's own blocks, prompt rows rewritten with torch.cat, CMPA computed by the tests' naive
implementation (tests/naive.py) from the module's state_dict."""

import pytest
import torch
import torch.nn.functional as F

from .. import naive
from ..method_helpers import CLASSNAMES, assert_same, batch, build, clip_logits, image_tokens, tokenize


def _eager_dcp(method, images, couple_text):
    clip = method.clip.model
    m, depth = method.n_ctx, method.depth
    tokens = tokenize([" ".join(["X"] * m) + f" {c.replace('_', ' ')}." for c in CLASSNAMES], clip)
    emb = clip.token_embedding(tokens)
    xt = torch.cat([emb[:, :1], method.prompts_text.expand(len(CLASSNAMES), -1, -1), emb[:, 1 + m:]], 1)
    xt = xt + clip.positional_embedding
    xv = image_tokens(clip, images)
    xv = clip.visual.ln_pre(torch.cat([xv, method.prompts_visual.expand(xv.shape[0], -1, -1)], 1))
    for layer, (vb, tb) in enumerate(zip(clip.visual.transformer.resblocks, clip.transformer.resblocks)):
        if 1 <= layer <= depth:
            cmpa = method.cmpa if method.parameter_sharing else method.cmpa[layer - 1]
            sd = dict(cmpa.named_parameters())
            heads = (cmpa.promt_attention_visual.num_heads, cmpa.promt_attention_text.num_heads)
            new_v, new_t = naive.cmpa(xv[:, -m:].transpose(0, 1), xt[:, 1:1 + m].transpose(0, 1), sd, *heads,
                                      cmpa.fusing)
            xv = torch.cat([xv[:, :-m], new_v.transpose(0, 1)], 1)
            if couple_text:
                xt = torch.cat([xt[:, :1], new_t.transpose(0, 1), xt[:, 1 + m:]], 1)
        xv = vb(xv)
        xt = tb(xt, attn_mask=clip.attn_mask)
    img = clip.visual.ln_post(xv[:, 0]) @ clip.visual.proj
    txt = clip.ln_final(xt)[torch.arange(len(CLASSNAMES)), tokens.argmax(-1)] @ clip.text_projection
    return clip_logits(clip, img, txt)


@pytest.mark.parametrize("config", [dict(), dict(couple_text=False), dict(parameter_sharing=False, fusing="max"),
                                    dict(fusing="first", depth=2, n_ctx=2, ctx_init=None)],
                         ids=["paper", "public-code", "per-layer-max", "first-depth2"])
def test_dcp_matches_eager(config):
    method = build("dcp", **config)
    images, labels = batch()
    want = _eager_dcp(method, images, method.couple_text)
    assert_same(method(images), want, "logits")
    assert_same(method.loss(images, labels), F.cross_entropy(want, labels), "loss")


def test_couple_text_decides_whether_cmpa_reaches_the_text_stream():
    """couple_text=False leaves the text stream as the public code does (CMPA never writes it); True
    changes the text features, and then the text half of CMPA trains."""
    images, labels = batch()
    paper, public = build("dcp", seed=3), build("dcp", seed=3, couple_text=False)
    assert torch.equal(paper.prompts_text, public.prompts_text)
    _, txt_paper = paper.towers(images)
    _, txt_public = public.towers(images)
    clip = public.clip.model
    m = public.n_ctx
    tokens = tokenize([" ".join(["X"] * m) + f" {c.replace('_', ' ')}." for c in CLASSNAMES], clip)
    emb = clip.token_embedding(tokens)
    plain = torch.cat([emb[:, :1], public.prompts_text.expand(len(CLASSNAMES), -1, -1), emb[:, 1 + m:]], 1)
    x = plain + clip.positional_embedding
    for block in clip.transformer.resblocks:
        x = block(x, attn_mask=clip.attn_mask)
    untouched = clip.ln_final(x)[torch.arange(len(CLASSNAMES)), tokens.argmax(-1)] @ clip.text_projection
    assert_same(txt_public, untouched, "text features without coupling")
    assert (txt_paper - untouched).abs().max() > 1e-4
    public.loss(images, labels).backward()
    text_half = [p for n, p in public.cmpa.named_parameters() if "_text." in n or n.startswith("proj_v2t")]
    assert all(p.grad is None and not p.requires_grad for p in text_half)
    assert all("_text." not in k and "proj_v2t" not in k for k in public.state_dict())
    paper.loss(images, labels).backward()
    assert paper.cmpa.proj_v2t.weight.grad is not None


def test_dcp_rejects_towers_of_different_depth():
    from fastprompt import methods
    from fastprompt.clip import create_clip
    import open_clip

    model = create_clip("fastprompt-tiny")
    model.transformer.resblocks = model.transformer.resblocks[:3]
    with pytest.raises(ValueError, match="image tower has 4 blocks and its text tower 3"):
        methods.build("dcp", model, CLASSNAMES)
    assert open_clip  # the model above is an open_clip CLIP
