"""The exact text-tower acceleration: sequences cut at EOT and packed, and the shared prefix computed once,
give the features and gradients of the full 77-token forward, for every method that uses them."""

import pytest
import torch

import fastprompt
from fastprompt import methods
from fastprompt.clip import BlockHooks
from fastprompt.clip import encode_packed, make_layout

from ..method_helpers import batch, build

TEXT_METHODS = [n for n in methods.METHODS if n != "vpt_deep"]
PATHS = [dict(pack_text=True, prefix_reuse=True), dict(pack_text=True, prefix_reuse=False)]


def _run(name, images, labels, dtype=torch.float32, **path):
    method = build(name, seed=4, **path).to(dtype)
    images = images.to(dtype)
    if name == "dcp":
        features = method.towers(images)[1]
    elif name in ("cocoop", "tmml"):
        features = method(images)  # the text features depend on the image: compare the logits
    elif name == "dpt":
        features = method.text_features()
    else:
        features = method.text_features()
    loss = method.loss(images, labels)
    grads = torch.autograd.grad(loss, [p for p in method.parameters() if p.requires_grad], allow_unused=True)
    names = [n for n, p in method.named_parameters() if p.requires_grad]
    return method, features, dict(zip(names, grads))


@pytest.mark.parametrize("path", PATHS, ids=["packed+prefix", "packed"])
@pytest.mark.parametrize("name", TEXT_METHODS)
def test_fast_paths_equal_the_full_forward(name, path):
    """fp32: every feature vector within 1e-5 (relative) of the full forward's. float64: features and every
    gradient within 1e-9, so that a difference in the math, not rounding, would show."""
    images, labels = batch()
    _, full, _ = _run(name, images, labels, pack_text=False, prefix_reuse=False)
    _, fast, _ = _run(name, images, labels, **path)
    per_vector = (fast - full).norm(dim=-1) / full.norm(dim=-1)
    assert per_vector.max() < 1e-5, per_vector.max()
    _, full, full_grads = _run(name, images, labels, torch.float64, pack_text=False, prefix_reuse=False)
    _, fast, fast_grads = _run(name, images, labels, torch.float64, **path)
    assert ((fast - full).norm(dim=-1) / full.norm(dim=-1)).max() < 1e-9
    for n, g in full_grads.items():
        if g is None:
            assert fast_grads[n] is None, n
            continue
        err = (fast_grads[n] - g).norm() / g.norm().clamp_min(1e-300)
        assert err < 1e-9, (n, err.item())


def test_the_shared_prefix_is_what_the_classes_share():
    coop = build("coop", seed=1)
    assert coop.prompts.prefix_len == 1 + coop.n_ctx  # SOS and the shared context, then the class names
    csc = build("coop", seed=1, class_specific=True)
    assert csc.prompts.prefix_len == 1  # a context per class: only SOS is shared
    dafe = build("map_dafe")
    assert dafe.prompts.prefix_len == 5  # [SOS] a photo of a
    assert build("tmml").prompts.prefix_len == 1


def test_layout_counts_only_tokens_up_to_eot():
    eot = torch.tensor([5, 9, 3])
    layout = make_layout(eot, 77, prefix_len=2)
    assert layout.total == (6 - 2) + (10 - 2) + (4 - 2)
    assert layout.eot_row.tolist() == [3, 11, 13]
    assert layout.min_suffix == 2 and layout.max_suffix == 8
    assert layout.positions[:4].tolist() == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="swallow"):
        make_layout(eot, 77, prefix_len=4)


def test_the_run_log_records_the_text_path(tmp_path):
    from fastprompt.train import TrainConfig, read_metrics, train

    train(TrainConfig(method="coop", epochs=1, shots=2, synthetic_classes=3, progress=False,
                      method_config=dict(n_ctx=2, prefix_reuse=False), output=str(tmp_path)))
    run = read_metrics(str(tmp_path))[0]
    assert run["text_path"] == dict(pack_text=True, prefix_reuse=False, class_chunk=None, checkpoint_text=False)


def test_tmml_builds_its_packed_layout_once(monkeypatch):
    """TMML's B·C sequences have a layout that depends only on the token ids: built on the first step (which reads
    the EOT rows on the host, a sync on CUDA) and reused by every later one."""
    from fastprompt.methods import text

    built = []
    make = text.make_layout
    monkeypatch.setattr(text, "make_layout", lambda *args, **kw: built.append(args[0].shape[0]) or make(*args, **kw))
    method = build("tmml", seed=2)
    images, _ = batch(b=3)
    with torch.no_grad():
        first = method(images)
        assert built == [3 * 5]  # 3 images × 5 classes
        second = method(images)
    assert built == [3 * 5]
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    with torch.no_grad():
        method(images[:2])  # another batch size: a layout of its own, once
        method(images[:2])
    assert built == [15, 10]


class _SuffixRows(BlockHooks):
    """Replaces rows [start, start + 2) of every suffix before blocks 1 and 2 by per-class rows, fused with the
    block's ln_1, on a padded view of the suffixes."""

    def __init__(self, blocks, rows, start):
        self.blocks, self.rows, self.start = blocks, rows, start

    def before(self, layer, x):
        if layer not in (1, 2):
            return x, None
        ln = self.blocks[layer].ln_1
        return fastprompt.insert_prompts(x, self.rows[layer - 1], self.start, ln.weight, ln.bias, ln.eps)


class _PackedSuffixRows(_SuffixRows):
    """The same rows written straight into the packed tokens."""

    def before_packed(self, layer, x, cu_seqlens):
        if layer not in (1, 2):
            return x, None
        ln = self.blocks[layer].ln_1
        return fastprompt.insert_prompts(x, self.rows[layer - 1], self.start, ln.weight, ln.bias, ln.eps,
                                         cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("start", [1, "per-class"])
def test_suffix_hooks_on_the_packed_tokens_equal_the_padded_view(start):
    """A suffix hook with before_packed gets the packed tokens and cu_seqlens; the features and gradients equal
    those of the same rewrite on the padded view, in float64."""
    method = build("map_dafe", seed=3).double()
    prompts, clip = method.prompts, method.clip
    n_cls = prompts.ids.shape[0]
    layout = prompts.layout(slice(0, n_cls), prompts.prefix_len, "cpu")
    if start == "per-class":
        start = torch.arange(n_cls) % 2
    torch.manual_seed(0)
    rows = torch.randn(2, n_cls, 2, clip.text_width, dtype=torch.float64)
    results = []
    for hooks in (_SuffixRows, _PackedSuffixRows):
        leaf = rows.clone().requires_grad_()
        feats = encode_packed(clip, prompts.embeddings, layout, suffix_hooks=hooks(clip.text_blocks, leaf, start))
        results.append((feats, torch.autograd.grad(feats.square().sum(), leaf)[0]))
    (padded, padded_grad), (packed, packed_grad) = results
    torch.testing.assert_close(packed, padded, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(packed_grad, padded_grad, rtol=1e-12, atol=1e-12)
    assert padded_grad.abs().sum() > 0
