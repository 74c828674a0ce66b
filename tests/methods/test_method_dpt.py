"""DPT against a straightforward eager implementation written here (open_clip's own blocks, torch.cat for the
prompt rows, plain torch ops for CAVPT; only the method's parameters are read from fastprompt), and the parts
of its loss and training setup that a wrong detach or a wrong mask would silently change."""

import pytest
import torch
import torch.nn.functional as F

from fastprompt import backends

from ..method_helpers import (CLASSNAMES, TINY_CONFIGS, assert_same, batch, build, clip_logits, image_tokens,
                             image_tower, text_tower, tokenize)

NAMES = [c.replace("_", " ") for c in CLASSNAMES]


def _perturb(method, seed=5):
    """Move the LayerNorms off their 1/0 start, so that swapping LN_out and LN_aux would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in method.named_parameters():
            if p.requires_grad and ".ln_" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def _eager_cavpt(mod, class_text, x, detach=True):
    """One block's CAVPT over the module's parameters: (prompts (B, K, D), aux logits (B, K, C))."""
    d = x.shape[-1]
    q0 = class_text @ mod.query.weight.t() + mod.query.bias
    kv = torch.cat([x.detach() if detach else x, mod.tokens.expand(x.shape[0], -1, -1)], 1)
    scores = (q0 @ mod.q_proj.weight.t()) @ (kv @ mod.k_proj.weight.t()).transpose(1, 2)
    out = torch.softmax(scores / mod.q_proj.weight.shape[0] ** 0.5, -1) @ kv @ mod.out_proj.weight.t()
    prompts = F.layer_norm(out + q0, (d,), mod.ln_out.weight, mod.ln_out.bias)
    aux = F.layer_norm(out, (d,), mod.ln_aux.weight, mod.ln_aux.bias) @ mod.classifier.weight.t()
    return prompts, aux


def _eager(method, images, top=None, detach=True):
    """The public code's forward: logits, the pieces of the loss, the top-K and the aux logits (B, S, K, C)."""
    clip = method.clip.model
    n = method.ctx.shape[0]
    tokens = tokenize([" ".join(["X"] * n) + " " + name + "." for name in NAMES], clip)
    emb = clip.token_embedding(tokens)
    emb = torch.cat([emb[:, :1], method.ctx.expand(len(NAMES), -1, -1), emb[:, 1 + n:]], 1)
    text = text_tower(clip, emb, tokens)
    with torch.no_grad():
        fixed = clip.encode_text(tokenize([f"a photo of a {name}." for name in NAMES], clip))
        zero_shot = clip.encode_image(images)
        if top is None:
            top = torch.sort(clip_logits(clip, zero_shot, fixed), descending=True).indices[:, :method.top_k]
    first, aux, added = method.bottom_limit - 1, [], []

    def before(layer, x):
        if layer < first:
            p = method.visual_prompts[layer].expand(x.shape[0], -1, -1)
        else:
            p, a = _eager_cavpt(method.cavpt[layer - first], text[top], x, detach)
            aux.append(a)
        added.append(p.shape[1])
        return torch.cat([x, p], 1)

    def after(layer, x):
        return x[:, :x.shape[1] - added[layer]]

    img = image_tower(clip, clip.visual.ln_pre(image_tokens(clip, images)), before, after)
    return dict(clip=clip, logits=clip_logits(clip, img, text), image=img, text=text, fixed=fixed,
                zero_shot=zero_shot, top=top, aux=torch.stack(aux, 1) if aux else None)


def _eager_loss(e, labels, early, aux_weight=0.3):
    clip, logits = e["clip"], e["logits"]
    if early:
        loss = (F.cross_entropy(clip_logits(clip, e["zero_shot"], e["text"]), labels)
                + F.cross_entropy(clip_logits(clip, e["image"], e["fixed"]), labels)
                + 0.1 * F.cross_entropy(logits, labels))
    else:
        loss = F.cross_entropy(logits, labels)
    if e["aux"] is not None:  # the public code: the rows of the slots whose class is the label, averaged
        b, blocks, k, _ = e["aux"].shape
        matched = (e["top"] == labels[:, None])[:, None].expand(b, blocks, k)
        rows = e["aux"][matched]
        if rows.shape[0]:
            loss = loss + aux_weight * F.cross_entropy(rows, labels[:, None, None].expand(b, blocks, k)[matched])
    return loss


def _labels(top, n_classes):
    """One label per image: alternately one of its top-K classes (a different slot each time) and, where the
    top-K leaves one out, a class outside it, so both branches of the aux mask are used."""
    labels = []
    for i, row in enumerate(top.tolist()):
        outside = [c for c in range(n_classes) if c not in row]
        labels.append(outside[0] if i % 2 == 1 and outside else row[i % len(row)])
    return torch.tensor(labels)


CONFIGS = {"cavpt-last": dict(), "cavpt-3-blocks": dict(bottom_limit=2, top_k=2, n_cavpt_tokens=3),
           "cavpt-all-k-clamped": dict(bottom_limit=1, top_k=10), "no-cavpt": dict(bottom_limit=5)}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("early", [True, False], ids=["before-switch", "after-switch"])
def test_dpt_matches_eager(config, early):
    method = build("dpt", **config)
    _perturb(method)
    images, _ = batch(b=4)
    want = _eager(method, images)
    labels = _labels(want["top"], len(CLASSNAMES))
    method.epoch, method.epochs = (0 if early else 30), 60
    logits, extras = method.logits_and_extras(images)
    assert torch.equal(extras["top_k"], want["top"])
    assert_same(logits, want["logits"], "logits")
    if want["aux"] is None:
        assert extras["aux_logits"] is None
    else:
        assert_same(extras["aux_logits"], want["aux"], "aux logits")
    loss, want_loss = method.loss(images, labels), _eager_loss(want, labels, early)
    assert_same(loss, want_loss, "loss")
    params = [p for p in method.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, params)
    ref = torch.autograd.grad(want_loss, params)
    for (name, _), g, r in zip([(n, p) for n, p in method.named_parameters() if p.requires_grad], got, ref):
        assert_same(g, r, f"gradient of {name}")


def test_dpt_matches_eager_triton_backend():
    reason = backends.unavailable_reason("insert_prompts", "triton", torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"triton backend unavailable: {reason}")
    method = build("dpt", backend="triton")
    images, labels = batch()
    want = _eager(method, images)
    assert_same(method(images), want["logits"], "logits")
    assert_same(method.loss(images, labels), _eager_loss(want, labels, early=True), "loss")


def test_aux_term_counts_only_the_slots_of_the_label():
    """With the top-K fixed by hand, the aux term is aux_weight × the mean CE of exactly the matched slots."""
    method = build("dpt", aux_weight=0.7)
    images, _ = batch()
    top = torch.tensor([[4, 1, 0], [2, 3, 1], [0, 2, 4]])
    method.select_classes = lambda zero_shot: top
    method.epoch, method.epochs = 30, 60  # the second phase: the loss is CE + the aux term
    logits, extras = method.logits_and_extras(images)
    assert_same(logits, _eager(method, images, top=top)["logits"], "logits with the given top-K")
    aux = extras["aux_logits"][:, 0]  # one CAVPT block: (B, K, C)

    labels = torch.tensor([1, 0, 0])  # image 0: slot 1; image 1: no slot; image 2: slot 0
    by_hand = (F.cross_entropy(aux[0, 1], labels[0]) + F.cross_entropy(aux[2, 0], labels[2])) / 2
    loss = method.loss(images, labels)
    assert_same(loss - F.cross_entropy(logits, labels), 0.7 * by_hand, "aux term")

    labels = torch.tensor([2, 0, 1])  # no image's label is among its top-K: no aux term, no gradient from it
    loss = method.loss(images, labels)
    assert_same(loss, F.cross_entropy(logits, labels), "loss without a matched slot")
    head = method.cavpt[0]
    (grad,) = torch.autograd.grad(loss, [head.classifier.weight], allow_unused=True)
    assert grad is None  # not even a zero gradient: the term is not in the graph (next test: why it matters)


def test_a_batch_without_a_matched_slot_leaves_the_aux_head_untouched_by_sgd():
    """The public code adds the aux term only when some slot matches; otherwise the classifier and LN_aux get no
    gradient (None), and SGD, momentum and weight decay included, leaves them exactly as they were, while the
    rest of the method keeps training. A zero gradient instead would decay them and apply their momentum."""
    method = build("dpt")
    images, _ = batch()
    top = torch.tensor([[4, 1, 0], [2, 3, 1], [0, 2, 4]])
    method.select_classes = lambda zero_shot: top
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    head = method.cavpt[0]
    aux_only = [head.classifier.weight, head.ln_aux.weight, head.ln_aux.bias]
    for labels in (torch.tensor([1, 0, 0]), torch.tensor([2, 0, 1])):  # a matched batch, then one without
        optimizer.zero_grad(set_to_none=True)
        before = [p.detach().clone() for p in (*aux_only, method.ctx)]
        method.loss(images, labels).backward()
        optimizer.step()
    assert all(p.grad is None for p in aux_only)
    for p, was in zip(aux_only, before):
        assert torch.equal(p, was)  # the momentum of the first step is not applied either
    assert not torch.equal(method.ctx, before[-1])
    assert method.ctx.grad is not None and head.query.weight.grad is not None


def test_cavpt_keys_are_detached():
    """No gradient reaches the earlier blocks' visual prompts through the CAVPT keys and values: the aux
    logits do not depend on them at all, and the loss's gradients match the eager version with the detach and
    differ from the one without it."""
    method = build("dpt")
    images, labels = batch()
    _, extras = method.logits_and_extras(images)
    (grad,) = torch.autograd.grad(extras["aux_logits"].sum(), [method.visual_prompts], allow_unused=True)
    assert grad is None

    (got,) = torch.autograd.grad(method.loss(images, labels), [method.visual_prompts])
    detached, attached = _eager(method, images), _eager(method, images, detach=False)
    (want,) = torch.autograd.grad(_eager_loss(detached, labels, True), [method.visual_prompts])
    (without,) = torch.autograd.grad(_eager_loss(attached, labels, True), [method.visual_prompts])
    assert_same(got, want, "visual prompt gradient")
    assert (without - want).norm() > 1e-3 * want.norm(), "the test cannot tell detached from attached keys"


def test_frozen_clip_gets_no_gradient():
    method = build("dpt")
    images, labels = batch()
    method.loss(images, labels).backward()
    assert all(p.grad is None for p in method.clip.parameters())
    trained = [n for n, p in method.named_parameters() if p.requires_grad]
    assert trained and all(method.get_parameter(n).grad is not None for n in trained)


def test_parameter_groups_two_learning_rates():
    method = build("dpt", ctx_lr=0.003, lr=0.02)
    groups = method.parameter_groups()
    assert [g["lr"] for g in groups] == [0.003, 0.02]
    assert groups[0]["params"] == [method.ctx]
    listed = [id(p) for g in groups for p in g["params"]]
    assert len(listed) == len(set(listed))
    assert set(listed) == {id(p) for p in method.parameters() if p.requires_grad}
    assert sorted(listed) == sorted(id(p) for p in method.trainable_parameters())  # the same, as plain Parameters
    defaults = build("dpt").parameter_groups()
    assert [g["lr"] for g in defaults] == [0.002, 0.01]


def test_parts_and_checkpoint():
    """Block layout of the tiny model (4 blocks): bottom_limit 4 → VPT before blocks 0-2, CAVPT before block 3;
    the checkpoint holds the trained tensors only and round-trips."""
    method = build("dpt")
    config = TINY_CONFIGS["dpt"]
    assert method.visual_prompts.shape == (3, config["n_visual_tokens"], method.clip.vision_width)
    assert len(method.cavpt) == 1 and method.cavpt[0].tokens.shape[0] == config["n_cavpt_tokens"]
    state = method.state_dict()
    assert set(state) == {n for n, p in method.named_parameters() if p.requires_grad}
    other = build("dpt", seed=3)
    other.load_state_dict(state)
    images, _ = batch()
    assert torch.equal(other(images), method(images))
    with pytest.raises(ValueError, match="bottom_limit"):
        build("dpt", bottom_limit=6)


def test_eval_caches_text_features():
    method = build("dpt")
    images, _ = batch()
    train_logits = method(images).detach()
    calls = []
    compute = method.text_features
    method.text_features = lambda: calls.append(1) or compute()
    method.eval()
    with torch.no_grad():
        first, second = method(images), method(images)
    assert len(calls) == 1
    assert_same(first, train_logits, "eval logits")
    assert torch.equal(first, second)


def _first_phase_epochs(method, epochs: int) -> list:
    method.epochs = epochs
    first = []
    for epoch in range(epochs):
        method.epoch = epoch
        if method.in_first_phase():
            first.append(epoch)
    return first


def test_the_loss_switches_after_half_the_run():
    """DESIGN.md: the first phase is the first half of training (epochs < 30 of 60), whatever the run's length."""
    method = build("dpt")
    for epochs, half in ((60, 30), (20, 10), (5, 3), (1, 1)):
        assert _first_phase_epochs(method, epochs) == list(range(half)), epochs


def test_switch_epoch_and_fraction_options():
    # the public code's fixed PRETRAIN.C = 30: a 20-epoch run never leaves the first phase
    assert _first_phase_epochs(build("dpt", switch_epoch=30), 20) == list(range(20))
    assert _first_phase_epochs(build("dpt", switch_epoch=3), 20) == [0, 1, 2]
    assert _first_phase_epochs(build("dpt", switch_fraction=0.25), 20) == list(range(5))
    assert _first_phase_epochs(build("dpt", switch_fraction=0.0), 20) == []  # the second-phase loss throughout
    with pytest.raises(ValueError, match="switch_fraction is a fraction of the run's epochs"):
        build("dpt", switch_fraction=1.5)
    with pytest.raises(ValueError, match="switch_epoch must be at least 0"):
        build("dpt", switch_epoch=-1)


def test_past_epoch_0_the_run_length_must_be_known():
    method = build("dpt")
    images, labels = batch()
    assert method.in_first_phase()  # epoch 0 is in the first half of any run
    method.epoch = 3
    with pytest.raises(ValueError, match="set method.epochs \\(the trainer does\\) or give switch_epoch"):
        method.loss(images, labels)


def test_the_trainer_switches_halfway_through_its_run(tmp_path):
    """The trainer tells the method the epoch and the run's length: a 2-epoch run trains one epoch per phase."""
    from fastprompt.train import TrainConfig, Trainer

    config = TrainConfig(method="dpt", epochs=2, shots=1, batch_size=8, synthetic_classes=4, eval_every=0,
                         progress=False, output=str(tmp_path / "dpt"))
    trainer = Trainer(config)
    method, phases = trainer.method, []
    original = method.loss_from
    method.loss_from = lambda *args: phases.append((method.epoch, method.in_first_phase())) or original(*args)
    trainer.fit()
    assert sorted(set(phases)) == [(0, True), (1, False)]
