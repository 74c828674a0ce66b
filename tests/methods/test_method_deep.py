"""VPT-deep, IVLP and MaPLe against straightforward eager implementations written here: open_clip's own
blocks, torch.cat for every prompt row, as the public code writes them."""

import torch
import torch.nn.functional as F

from ..method_helpers import (CLASSNAMES, assert_same, batch, build, clip_logits, image_tokens, image_tower,
                             text_tower, tokenize)


def _expand(p, n):
    return p.unsqueeze(0).expand(n, -1, -1)


def _vision(clip, images, shallow, deep):
    """Prompts appended before ln_pre; before block l in `deep` the last rows are replaced."""
    x = image_tokens(clip, images)
    x = clip.visual.ln_pre(torch.cat([x, _expand(shallow, x.shape[0])], 1))
    n = shallow.shape[0]

    def per_block(layer, x):
        if layer in deep:
            return torch.cat([x[:, :-n], _expand(deep[layer], x.shape[0])], 1)
        return x
    return image_tower(clip, x, per_block)


def _text(clip, ctx, deep, words):
    """Text "{words} {class}." with its first len(ctx) tokens replaced by ctx; deep rows 1..n per block."""
    n = ctx.shape[0]
    tokens = tokenize([f"{words} {c.replace('_', ' ')}." for c in CLASSNAMES], clip)
    emb = clip.token_embedding(tokens)
    emb = torch.cat([emb[:, :1], _expand(ctx, len(CLASSNAMES)), emb[:, 1 + n:]], 1)

    def per_block(layer, x):
        if layer in deep:
            return torch.cat([x[:, :1], _expand(deep[layer], x.shape[0]), x[:, 1 + n:]], 1)
        return x
    return text_tower(clip, emb, tokens, per_block)


def test_vpt_deep_matches_eager():
    method = build("vpt_deep")
    images, labels = batch()
    clip = method.clip.model
    p = method.visual_prompts
    img = _vision(clip, images, p[0], {1: p[1], 2: p[2]})
    text = clip.encode_text(tokenize([f"a photo of a {c.replace('_', ' ')}." for c in CLASSNAMES], clip))
    want = clip_logits(clip, img, text)
    assert_same(method(images), want, "logits")
    assert_same(method.loss(images, labels), F.cross_entropy(want, labels), "loss")


def test_ivlp_matches_eager():
    method = build("ivlp")
    images, labels = batch()
    clip = method.clip.model
    assert method.ctx.shape[0] == 2  # "a photo" of "a photo of a": the text goes on with "of a {class}."
    text = _text(clip, method.ctx, {1: method.text_prompts[0], 2: method.text_prompts[1]}, "a photo of a")
    v = method.visual_prompts
    want = clip_logits(clip, _vision(clip, images, v[0], {1: v[1], 2: v[2]}), text)
    assert_same(method(images), want, "logits")
    assert_same(method.loss(images, labels), F.cross_entropy(want, labels), "loss")


def test_maple_matches_eager():
    method = build("maple")
    images, labels = batch()
    clip = method.clip.model
    deep_text = {1: method.compound_prompts_text[0], 2: method.compound_prompts_text[1]}
    text = _text(clip, method.ctx, deep_text, "a photo of a")
    deep_visual = {layer: method.compound_prompt_projections[layer - 1](p) for layer, p in deep_text.items()}
    img = _vision(clip, images, method.proj(method.ctx), deep_visual)
    want = clip_logits(clip, img, text)
    assert_same(method(images), want, "logits")
    assert_same(method.loss(images, labels), F.cross_entropy(want, labels), "loss")


def test_maple_projections_start_equal_as_in_the_public_code():
    method = build("maple")
    first, second = method.compound_prompt_projections
    assert torch.equal(first.weight, second.weight) and first.weight is not second.weight


def test_maple_random_context_beyond_four_tokens():
    method = build("maple", n_ctx=6)
    images, _ = batch()
    clip = method.clip.model
    assert method.prompts.starts("ctx") == 1
    deep_text = {1: method.compound_prompts_text[0], 2: method.compound_prompts_text[1]}
    tokens = tokenize([" ".join(["X"] * 6) + f" {c.replace('_', ' ')}." for c in CLASSNAMES], clip)
    emb = clip.token_embedding(tokens)
    emb = torch.cat([emb[:, :1], _expand(method.ctx, len(CLASSNAMES)), emb[:, 7:]], 1)

    def per_block(layer, x):
        return torch.cat([x[:, :1], _expand(deep_text[layer], x.shape[0]), x[:, 7:]], 1) if layer in deep_text else x
    text = text_tower(clip, emb, tokens, per_block)
    deep_visual = {layer: method.compound_prompt_projections[layer - 1](p) for layer, p in deep_text.items()}
    want = clip_logits(clip, _vision(clip, images, method.proj(method.ctx), deep_visual), text)
    assert_same(method(images), want, "logits")
