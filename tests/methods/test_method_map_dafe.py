"""MAP-DAFE against a straightforward eager implementation written here: open_clip's own blocks, torch.cat for
the prompt rows, the DAFE gate in plain torch. Only the method's parameters are read from it."""

import pytest
import torch
import torch.nn.functional as F

from ..helpers import require_backend
from ..method_helpers import (CLASSNAMES, TINY_CONFIGS, assert_same, batch, build, clip_logits, image_tokens,
                             image_tower, text_tower, tokenize)


def _dafe(module, gate, prev, task):
    """out = g·prev + (1 − g)·task, g = σ(LN(prev) W_gᵀ + b_g + task U_gᵀ), or σ(α) for the scalar gate."""
    if gate == "scalar":
        g = torch.sigmoid(module.alpha)
    else:
        h = F.layer_norm(prev, prev.shape[-1:], module.norm.weight, module.norm.bias, module.norm.eps)
        g = torch.sigmoid(F.linear(h, module.gate_prev.weight, module.gate_prev.bias)
                          + F.linear(task, module.gate_task.weight))
    return g * prev + (1 - g) * task


def _text(method, clip, depth, gate):
    """Class by class: [SOS] a photo of a {class} . P [EOT], the prompt rows rewritten by DAFE before blocks
    1..depth−1 at the rows right after the class template."""
    m = method.prompts_text.shape[0]
    feats = []
    for name in CLASSNAMES:
        template = "a photo of a " + name.replace("_", " ") + "."
        s = len(tokenize([template], clip)[0].nonzero()) - 1  # SOS + the template's tokens (EOT not counted)
        tokens = tokenize([template + " X" * m], clip)
        emb = clip.token_embedding(tokens)
        emb = torch.cat([emb[:, :s], method.prompts_text[None], emb[:, s + m:]], 1)

        def per_block(layer, x, s=s):
            if 1 <= layer < depth:
                fused = _dafe(method.dafe_text[layer - 1], gate, x[:, s:s + m], method.task_text[layer - 1])
                x = torch.cat([x[:, :s], fused, x[:, s + m:]], 1)
            return x

        feats.append(text_tower(clip, emb, tokens, per_block))
    return torch.cat(feats)


def _image(method, clip, images, depth, gate):
    """[CLS] patches V → ln_pre, the last M rows rewritten by DAFE before blocks 1..depth−1."""
    m = method.prompts_vision.shape[0]
    x = image_tokens(clip, images)
    x = clip.visual.ln_pre(torch.cat([x, method.prompts_vision.expand(x.shape[0], -1, -1)], 1))

    def per_block(layer, x):
        if 1 <= layer < depth:
            fused = _dafe(method.dafe_vision[layer - 1], gate, x[:, -m:], method.task_vision[layer - 1])
            x = torch.cat([x[:, :-m], fused], 1)
        return x

    return image_tower(clip, x, per_block)


def _perturb_gates(method, seed=3):
    """The DAFE modules start with every gate at exactly 0.5: move them so the gate math is tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(method.dafe_text.parameters()) + list(method.dafe_vision.parameters()):
            p.add_(0.5 * torch.randn(p.shape, generator=g))


CONFIGS = [dict(), dict(gate="token", n_ctx_text=2, n_ctx_vision=3),
           dict(gate="scalar", depth=4, class_chunk=2, checkpoint_text=True), dict(depth=1)]
IDS = ["channel", "token", "scalar-depth4-chunked", "depth1"]


def _eager_logits(method, images, config):
    clip = method.clip.model
    depth = {**TINY_CONFIGS["map_dafe"], **config}["depth"]
    gate = config.get("gate", "channel")
    return clip_logits(clip, _image(method, clip, images, depth, gate), _text(method, clip, depth, gate))


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_map_dafe_matches_eager(config):
    method = build("map_dafe", **config)
    _perturb_gates(method)
    images, labels = batch()
    want = _eager_logits(method, images, config)
    assert_same(method(images), want, "logits")
    assert_same(method.loss(images, labels), F.cross_entropy(want, labels), "loss")


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_map_dafe_gradients_match_eager(config):
    """In float64, where the two agree to rounding (~1e-14): in fp32 the gradients that sum over every row
    (the LayerNorm affine, the scalar gate) differ by up to ~3e-5 between the two summation orders."""
    method = build("map_dafe", **config).double()
    _perturb_gates(method)
    images, labels = batch()
    images = images.double()
    loss = method.loss(images, labels)
    want = F.cross_entropy(_eager_logits(method, images, config), labels)
    params = method.trainable_parameters()
    for p, got, ref in zip(params, torch.autograd.grad(loss, params), torch.autograd.grad(want, params)):
        assert_same(got, ref, f"gradient of a {tuple(p.shape)} parameter", rtol=1e-10)


def test_map_dafe_prompts_follow_each_class_template():
    """Class names of different lengths: the prompt slot starts at a different row per class."""
    method = build("map_dafe")
    clip = method.clip.model
    want = [len(tokenize(["a photo of a " + n.replace("_", " ") + "."], clip)[0].nonzero()) - 1 for n in CLASSNAMES]
    assert method.prompts.start_ctx.tolist() == want
    assert len(set(want)) > 1


def test_map_dafe_eval_caches_text_and_checkpoint_holds_prompts_only():
    method = build("map_dafe")
    _perturb_gates(method)
    images, _ = batch()
    train_logits = method(images).detach()
    method.eval()
    with torch.no_grad():
        assert_same(method(images), train_logits, "eval logits")
        assert method._text_cache is not None
        assert_same(method(images), train_logits, "eval logits from the cache")
    state = method.state_dict()
    assert set(state) == {n for n, p in method.named_parameters() if p.requires_grad}
    assert not any(k.startswith("clip.") for k in state)
    other = build("map_dafe", seed=5)
    other.load_state_dict(state)
    other.eval()
    with torch.no_grad():
        assert_same(other(images), train_logits, "logits after loading the checkpoint")


def test_map_dafe_triton_backend_matches_eager():
    """The fused ops on the Triton backend (the interpreter on the CPU): per-class offsets and DAFE kernels."""
    require_backend("dafe", "triton", "cpu")
    require_backend("insert_prompts", "triton", "cpu")
    method = build("map_dafe", backend="triton")
    _perturb_gates(method)
    images, labels = batch()
    want = _eager_logits(method, images, {})
    assert_same(method(images), want, "logits")
    assert_same(method.loss(images, labels), F.cross_entropy(want, labels), "loss")
