"""CoOp and CoCoOp against straightforward eager implementations written here (open_clip's own blocks,
torch.cat for the prompt rows)."""

import pytest
import torch
import torch.nn.functional as F

from ..method_helpers import (CLASSNAMES, assert_same, batch, build, clip_logits, text_tower, tokenize)


def _coop_text(clip, ctx, names, position):
    """The public code's prompt construction: prefix (SOS), context, class and suffix by torch.cat."""
    n = ctx.shape[-2]
    feats = []
    for c, name in enumerate(names):
        name = name.replace("_", " ")
        ctx_c = ctx[c] if ctx.dim() == 3 else ctx
        half = n // 2
        text = {"end": " ".join(["X"] * n) + " " + name + ".", "front": name + " " + " ".join(["X"] * n) + ".",
                "middle": " ".join(["X"] * half) + " " + name + " " + " ".join(["X"] * (n - half)) + "."}[position]
        tokens = tokenize([text], clip)
        emb = clip.token_embedding(tokens)[0]
        name_len = len(tokenize([name], clip)[0].nonzero()) - 2
        if position == "end":
            emb = torch.cat([emb[:1], ctx_c, emb[1 + n:]])
        elif position == "front":
            emb = torch.cat([emb[:1 + name_len], ctx_c, emb[1 + name_len + n:]])
        else:
            emb = torch.cat([emb[:1], ctx_c[:half], emb[1 + half:1 + half + name_len], ctx_c[half:],
                             emb[1 + n + name_len:]])
        feats.append(text_tower(clip, emb[None], tokens))
    return torch.cat(feats)


@pytest.mark.parametrize("config", [dict(), dict(class_token_position="front", ctx_init="a photo of a"),
                                    dict(class_token_position="middle", class_specific=True)],
                         ids=["end", "front-init", "middle-csc"])
def test_coop_matches_eager(config):
    method = build("coop", **config)
    images, labels = batch()
    clip = method.clip.model
    text = _coop_text(clip, method.ctx, CLASSNAMES, config.get("class_token_position", "end"))
    want = clip_logits(clip, clip.encode_image(images), text)
    assert_same(method(images), want, "logits")
    assert_same(method.loss(images, labels), F.cross_entropy(want, labels), "loss")


def test_coop_ctx_init_uses_the_words():
    method = build("coop", ctx_init="a photo of a")
    clip = method.clip.model
    words = clip.token_embedding(tokenize(["a photo of a"], clip))[0, 1:5]
    assert torch.equal(method.ctx.detach(), words.detach())


def _public_word_prompt_text(clip, ctx, phrase, names):
    """The public CoOp / CoCoOp prompt with ctx_init: n = len(phrase.split()) context vectors replace token rows
    1..n of "phrase name.", whatever is left of the phrase's tokens stays (token_suffix = embedding[1 + n:])."""
    n = len(phrase.split())
    feats = []
    for name in names:
        tokens = tokenize([phrase + " " + name.replace("_", " ") + "."], clip)
        emb = clip.token_embedding(tokens)[0]
        feats.append(text_tower(clip, torch.cat([emb[:1], ctx, emb[1 + n:]])[None], tokens))
    return torch.cat(feats)


@pytest.mark.parametrize("name", ["coop", "cocoop"])
def test_ctx_init_counts_words_as_the_public_codes(name):
    """"a pixelated photo of a": 5 words, 6 tokens ("pixelated" is two). The public codes take 5 vectors, the
    embeddings of the phrase's first 5 tokens, and keep its last token "a" as a fixed word before the class name:
    the same context, prompt and logits here."""
    phrase = "a pixelated photo of a"
    method = build(name, ctx_init=phrase)
    clip = method.clip.model
    tokens = tokenize([phrase], clip)[0]
    assert int((tokens != 0).sum()) - 2 == 6 and method.n_ctx == 5 and method.ctx.shape == (5, 40)
    assert torch.equal(method.ctx.detach(), clip.token_embedding(tokens)[1:6].detach())
    images, _ = batch()
    if name == "coop":
        text = _public_word_prompt_text(clip, method.ctx, phrase, CLASSNAMES)
        assert_same(method(images), clip_logits(clip, clip.encode_image(images), text), "logits")
    else:
        img = F.normalize(clip.encode_image(images), dim=-1)
        shifted = method.ctx[None] + method.meta_net(img)[:, None]
        text = torch.stack([_public_word_prompt_text(clip, ctx_b, phrase, CLASSNAMES) for ctx_b in shifted])
        assert_same(method(images), clip_logits(clip, img, text), "logits")


def test_cocoop_matches_eager():
    method = build("cocoop")
    images, labels = batch()
    clip = method.clip.model
    img = F.normalize(clip.encode_image(images), dim=-1)
    shifted = method.ctx[None] + method.meta_net(img)[:, None]
    text = torch.stack([_coop_text(clip, ctx_b, CLASSNAMES, "end") for ctx_b in shifted])
    want = clip_logits(clip, img, text)
    assert_same(method(images), want, "logits")
    assert_same(method.loss(images, labels), F.cross_entropy(want, labels), "loss")
