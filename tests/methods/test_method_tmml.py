"""TMML against a straightforward eager implementation written here: open_clip's own towers, torch.cat for the
context rows, the two attentions and the InfoNCE in plain torch. Only the method's parameters are read from it."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastprompt import methods

from ..method_helpers import (CLASSNAMES, TINY_CONFIGS, assert_same, batch, build, clip_logits, image_tokens,
                             text_tower, tiny_clip, tokenize)


def _attend(attn, queries, context):
    """Single head: softmax((q Wq)(c Wk)ᵀ / √d) (c Wv) over the last two dimensions."""
    q, k, v = queries @ attn.query.weight.t(), context @ attn.key.weight.t(), context @ attn.value.weight.t()
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(attn.query.weight.shape[0]), -1)
    return w @ v


def _infonce(scale, image, text, labels, mask=True):
    """Symmetric InfoNCE, target on the diagonal; off-diagonal pairs of the same label out of the softmax."""
    sim = scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()
    if mask:
        same = (labels[:, None] == labels[None, :]) & ~torch.eye(len(labels), dtype=torch.bool)
        sim = sim.masked_fill(same, float("-inf"))
    targets = torch.arange(len(labels))
    return (F.cross_entropy(sim, targets) + F.cross_entropy(sim.t(), targets)) / 2


def _tmml(method, images, labels, lam=1.0, mask=True):
    """(logits, loss) written out: frozen image tower, CTP per (image, class), B text towers, TFT."""
    clip = method.clip.model
    v = clip.visual
    x = v.ln_pre(image_tokens(clip, images))
    for block in v.transformer.resblocks:
        x = block(x)
    x = v.ln_post(x) @ v.proj
    f, patches = F.normalize(x[:, 0], dim=-1), F.normalize(x[:, 1:], dim=-1)
    names = [n.replace("_", " ") for n in CLASSNAMES]
    t = F.normalize(clip.encode_text(tokenize([f"a photo of a {n}." for n in names], clip)), dim=-1)

    # CTP: a[b, c] = class c attending to image b's patches; bias = MLP(a)
    a = torch.stack([_attend(method.ctp, t, patches[b]) for b in range(len(images))])  # (B, C, E)
    mlp = method.ctp_mlp
    bias = F.linear(F.relu(F.linear(a, mlp.linear1.weight, mlp.linear1.bias)), mlp.linear2.weight, mlp.linear2.bias)

    n = method.ctx.shape[0]
    tokens = tokenize([" ".join(["X"] * n) + " " + name + "." for name in names], clip)
    emb = clip.token_embedding(tokens)  # (C, L, Dt)
    text = []
    for b in range(len(images)):
        ctx = method.ctx[None] + bias[b][:, None]  # (C, n, Dt)
        text.append(text_tower(clip, torch.cat([emb[:, :1], ctx, emb[:, 1 + n:]], 1), tokens))
    text = F.normalize(torch.stack(text), dim=-1)  # (B, C, E)

    # TFT: f̂_b = f_b + γ · f_b attending to T_b
    tuned = torch.stack([f[b] + method.gamma * _attend(method.tft, f[b][None], text[b])[0] for b in range(len(f))])
    logits = clip_logits(clip, tuned, text)
    loss = F.cross_entropy(logits, labels)
    if lam:
        own = text[torch.arange(len(labels)), labels]
        loss = loss + lam * _infonce(clip.logit_scale.exp(), tuned, own, labels, mask)
    return logits, loss


def _perturb_gamma(method):
    with torch.no_grad():  # a larger γ so that TFT moves the features visibly
        method.gamma.fill_(0.7)


CONFIGS = [dict(), dict(lam=0.0, attn_dim=16, class_chunk=2, checkpoint_text=True),
           dict(ctx_init=None, n_ctx=3, gamma_init=0.3, lam=0.5)]
IDS = ["default", "lam0-attn16-chunked", "random-ctx"]


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_tmml_matches_eager(config):
    method = build("tmml", **config)
    images, labels = batch()
    want, want_loss = _tmml(method, images, labels, config.get("lam", 1.0))
    assert_same(method(images), want, "logits")
    assert_same(method.loss(images, labels), want_loss, "loss")


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_tmml_gradients_match_eager(config):
    """In float64, where the two agree to rounding: fp32 sums over rows differ by ~1e-5 between orders. The
    CLIP is float64 before the method is built, so that the frozen class features are float64 too."""
    torch.manual_seed(0)
    method = methods.build("tmml", tiny_clip().double(), CLASSNAMES, **{**TINY_CONFIGS["tmml"], **config}).double()
    images, labels = batch()
    images = images.double()
    loss = method.loss(images, labels)
    _, want = _tmml(method, images, labels, config.get("lam", 1.0))
    params = method.trainable_parameters()
    for p, got, ref in zip(params, torch.autograd.grad(loss, params), torch.autograd.grad(want, params)):
        assert_same(got, ref, f"gradient of a {tuple(p.shape)} parameter", rtol=1e-10)


def test_tmml_same_label_images_are_not_negatives():
    """Images 0, 2 and 3 share a label: their cross pairs are masked out of the InfoNCE softmax."""
    method = build("tmml")
    _perturb_gamma(method)
    images, _ = batch(b=5)
    labels = torch.tensor([1, 3, 1, 1, 0])
    _, masked = _tmml(method, images, labels)
    _, unmasked = _tmml(method, images, labels, mask=False)
    got = method.loss(images, labels)
    assert_same(got, masked, "loss with same-label pairs masked")
    assert (got - unmasked).abs() > 1e-3 * unmasked.abs(), "the mask must change the loss in this batch"


def test_tmml_class_features_frozen_and_checkpoint_holds_trained_tensors_only():
    method = build("tmml")
    state = method.state_dict()
    assert set(state) == {n for n, p in method.named_parameters() if p.requires_grad}
    assert "class_features" not in state and not any(k.startswith("clip.") for k in state)
    assert torch.allclose(method.gamma.detach(), torch.tensor(0.1))
    images, labels = batch()
    method.loss(images, labels).backward()
    assert all(p.grad is None for p in method.clip.parameters())
    assert all(p.grad is not None for p in method.trainable_parameters())
