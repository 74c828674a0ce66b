"""The exact text-tower acceleration: sequences cut at EOT and packed, and the shared prefix computed once,
give the features and gradients of the full 77-token forward, for every method that uses them."""

import pytest
import torch

from fastprompt import methods
from fastprompt.clip.packed import make_layout

from .method_helpers import batch, build

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
    assert layout.positions[:4].tolist() == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="swallow"):
        make_layout(eot, 77, prefix_len=4)


def test_the_run_log_records_the_text_path(tmp_path):
    from fastprompt.train import TrainConfig, read_metrics, train

    train(TrainConfig(method="coop", epochs=1, shots=2, synthetic_classes=3, progress=False,
                      method_config=dict(n_ctx=2, prefix_reuse=False), output=str(tmp_path)))
    run = read_metrics(str(tmp_path))[0]
    assert run["text_path"] == dict(pack_text=True, prefix_reuse=False, class_chunk=None, checkpoint_text=False)
