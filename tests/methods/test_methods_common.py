"""What every method must do on a tiny open_clip CLIP with random weights: shapes; gradients reach every
trained parameter and no frozen one; a state_dict round trip restores the logits; 30 SGD steps on a fixed
batch lower the loss; the triton backend in fp32 meets the fp32 rule against the reference in float64 (logits,
loss, gradients); evaluation computes static text features once; bad names and options are refused clearly."""

import pytest
import torch

import fastprompt
from fastprompt import methods
from fastprompt.testing import assert_close as check_close

from ..helpers import require_backend
from ..method_helpers import CLASSNAMES, batch, build, tiny_clip

ALL = list(methods.METHODS)


@pytest.mark.parametrize("name", ALL)
def test_forward_shapes_and_loss(name):
    method = build(name)
    images, labels = batch()
    logits = method(images)
    assert logits.shape == (3, len(CLASSNAMES)) and torch.isfinite(logits).all()
    loss = method.loss(images, labels)
    assert loss.dim() == 0 and torch.isfinite(loss)


# parameters whose gradient can be exactly zero for a given batch: DPT's auxiliary classifiers and their
# LayerNorms only learn from images whose label is among their top-K classes
MAYBE_ZERO = ("cavpt.", )


@pytest.mark.parametrize("name", ALL)
def test_gradients_reach_every_trained_parameter_and_no_frozen_one(name):
    method = build(name)
    images, labels = batch()
    method.loss(images, labels).backward()
    for n, p in method.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{n} gets no gradient"
        else:
            assert p.grad is None, f"frozen {n} got a gradient"
    # zero-initialised layers (DAFE's gates) pass no gradient to what feeds them until they move: after one
    # step every trained tensor must receive a nonzero gradient
    torch.optim.SGD(method.trainable_parameters(), lr=0.01).step()
    method.zero_grad()
    method.loss(images, labels).backward()
    for n, p in method.named_parameters():
        if p.requires_grad and not (name == "dpt" and n.startswith(MAYBE_ZERO) and "classifier" in n):
            assert torch.count_nonzero(p.grad) > 0, f"{n} gets a zero gradient"
    assert all(not p.requires_grad for p in method.clip.parameters())
    trained = {id(p) for p in method.parameters() if p.requires_grad}
    # the contract: trainable_parameters() is Parameters for every method, parameter_groups() covers the same
    params = method.trainable_parameters()
    assert all(isinstance(p, torch.nn.Parameter) for p in params)
    assert {id(p) for p in params} == trained and len(params) == len(trained)
    assert sum(p.numel() for p in params) == method.describe()["trained_parameters"] > 0
    listed = [p for g in method.parameter_groups() for p in g["params"]]
    assert {id(p) for p in listed} == trained and len(listed) == len(trained)


@pytest.mark.parametrize("name", ALL)
def test_state_dict_holds_only_what_is_trained_and_round_trips(name):
    method = build(name, seed=0)
    images, _ = batch()
    state = method.state_dict()
    assert state and not any(k.startswith("clip.") for k in state)
    trained = {n for n, p in method.named_parameters() if p.requires_grad}
    assert set(state) == trained
    other = build(name, seed=1)
    other.load_state_dict(state)
    method.eval(), other.eval()
    with torch.no_grad():
        assert torch.equal(method(images), other(images))


@pytest.mark.parametrize("name", ALL)
def test_thirty_sgd_steps_lower_the_loss(name):
    method = build(name)
    images, labels = batch()
    opt = torch.optim.SGD(method.trainable_parameters(), lr=0.02, momentum=0.9)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = method.loss(images, labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


# every method at its small config, and DCP's other CMPA variants (the parts of CMPA a default run skips), at
# the smallest depth that shows each (the Triton interpreter takes seconds per CMPA call)
WHOLE_MODEL = [(n, {}) for n in ALL] + [("dcp", dict(couple_text=False, depth=1)),
                                        ("dcp", dict(parameter_sharing=False, fusing="max", depth=2)),
                                        ("dcp", dict(fusing="first", depth=1))]


@pytest.mark.parametrize("name,config", WHOLE_MODEL,
                         ids=[n + "".join(f"-{k}={v}" for k, v in c.items()) for n, c in WHOLE_MODEL])
def test_reference_and_triton_backends_agree_on_the_whole_model(name, config):
    """The triton backend in fp32 against the reference backend in float64 (the whole method, CLIP included),
    with DESIGN.md's fp32 rule on the logits, the loss and each trained tensor's gradient."""
    require_backend("cmpa", "triton", "cpu")
    images, labels = batch()
    results = {}
    for backend, dtype in (("reference", torch.float64), ("triton", torch.float32)):
        method = build(name, backend=backend, **config).to(dtype)
        loss, logits = method.loss_and_logits(images.to(dtype), labels)
        loss.backward()
        results[backend] = {"logits": logits.detach(), "loss": loss.detach(),
                            **{n: p.grad for n, p in method.named_parameters() if p.requires_grad}}
    ref, out = results["reference"], results["triton"]
    assert ref.keys() == out.keys()
    for what, want in ref.items():
        assert want.dtype == torch.float64 and out[what].dtype == torch.float32, what
        check_close(what, out[what], want)


# (method, config, the function that computes its static text side): DCP uncoupled computes its text features
# and the text prompt rows its CMPA reads together
STATIC_TEXT = [(n, {}, "text_features") for n in ALL if not methods.method_class(n).text_depends_on_images
               and hasattr(methods.method_class(n), "text_features")] + [("dcp", dict(couple_text=False), "text_side")]


@pytest.mark.parametrize("name,config,compute", STATIC_TEXT, ids=[f"{n}-{c}" for n, _, c in STATIC_TEXT])
def test_evaluation_computes_static_text_features_once(name, config, compute):
    method = build(name, **config)
    images, _ = batch()
    calls = []
    original = getattr(method, compute)
    setattr(method, compute, lambda: calls.append(1) or original())
    method.eval()
    with torch.no_grad():
        first = method(images)
        # DCP's CMPA pools over the batch: its logits depend on the batch, so it sees the same one again
        second = method(images if name == "dcp" else images[:2])
    assert len(calls) == 1 and torch.equal(first[:len(second)], second)
    fresh = method(images)  # with autograd on nothing is cached: the text side is computed again
    assert len(calls) == 2
    torch.testing.assert_close(fresh.detach(), first, rtol=1e-5, atol=1e-6)
    method.train()
    method(images)
    assert len(calls) == 3


# configurations that prompt only the text: the public IVLP language-only config (no visual prompt at all)
TEXT_ONLY = [("coop", {}), ("cocoop", {}), ("tmml", {}), ("ivlp", dict(n_ctx_text=4, n_ctx_vision=0, depth_vision=0)),
             ("ivlp", dict(depth_vision=0))]


@pytest.mark.parametrize("name,config", TEXT_ONLY, ids=[f"{n}-{i}" for i, (n, _) in enumerate(TEXT_ONLY)])
def test_text_only_methods_run_the_image_tower_without_autograd(name, config):
    method = build(name, **config)
    images, labels = batch()
    seen = []
    original = method.clip.image_features
    method.clip.image_features = lambda x: seen.append(torch.is_grad_enabled()) or original(x)
    method.loss(images, labels).backward()
    assert seen and not any(seen)


# configurations that switch a side or a part off: each must hold only parameters that get a gradient (DDP
# without find_unused_parameters rejects one that does not) and no empty tensor
PARTS_OFF = [("ivlp", dict(n_ctx_text=4, n_ctx_vision=0, depth_vision=0)), ("ivlp", dict(n_ctx_vision=0)),
             ("ivlp", dict(depth_text=1)), ("maple", dict(depth=1)), ("vpt_deep", dict(depth=1)),
             ("map_dafe", dict(depth=1)), ("dcp", dict(couple_text=False)), ("dcp", dict(depth=1)),
             ("dpt", dict(n_visual_tokens=0)), ("dpt", dict(bottom_limit=5)), ("dpt", dict(bottom_limit=1))]


@pytest.mark.parametrize("name,config", PARTS_OFF, ids=[f"{n}-{i}" for i, (n, _) in enumerate(PARTS_OFF)])
def test_configs_with_a_part_off_hold_no_unused_parameter(name, config):
    method = build(name, **config)
    images, labels = batch()
    method.loss(images, labels).backward()
    for n, p in method.named_parameters():
        if p.requires_grad:
            assert p.numel() > 0, f"{n} is an empty parameter"
            assert p.grad is not None, f"{n} is never used"


@pytest.mark.parametrize("name,config", [("ivlp", dict(depth_text=0)), ("ivlp", dict(n_ctx_text=0)),
                                         ("ivlp", dict(n_ctx_vision=-1)), ("dcp", dict(depth=0)),
                                         ("dcp", dict(n_ctx=0)), ("maple", dict(n_ctx=0)), ("vpt_deep", dict(n_ctx=0)),
                                         ("coop", dict(n_ctx=0)), ("cocoop", dict(n_ctx=0, ctx_init=None))])
def test_configs_that_would_leave_a_parameter_unused_are_refused(name, config):
    with pytest.raises(ValueError, match=f"{name}: .*(at least|>= 1)"):
        build(name, **config)


# CoCoOp runs B·C sequences (one prompt set per image), the case chunking and checkpointing are there for
@pytest.mark.parametrize("name", ["coop", "cocoop"])
def test_class_chunking_and_checkpointing_change_nothing(name):
    images, labels = batch()
    plain, chunked = build(name, seed=2), build(name, seed=2, class_chunk=2, checkpoint_text=True)
    plain.loss(images, labels).backward()
    chunked.loss(images, labels).backward()
    torch.testing.assert_close(chunked(images), plain(images))
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    assert grads.keys() == {n for n, p in chunked.named_parameters() if p.requires_grad}
    for n, p in chunked.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], msg=n)


def test_unknown_method_and_option_are_refused():
    with pytest.raises(ValueError, match="unknown method 'copo'; methods are coop, cocoop"):
        methods.build("copo", tiny_clip(), CLASSNAMES)
    with pytest.raises(ValueError, match="coop has no option n_tokens; its options are n_ctx=16"):
        methods.build("coop", tiny_clip(), CLASSNAMES, n_tokens=4)
    with pytest.raises(ValueError, match="depth 9 is out of range: this model's tower has 4 blocks"):
        methods.build("maple", tiny_clip(), CLASSNAMES)
    with pytest.raises(ValueError, match="no class names"):
        methods.build("coop", tiny_clip(), [])


def test_unsupported_models_get_a_clear_error():
    import open_clip

    resnet = open_clip.model.CLIP(32, dict(layers=(1, 1, 1, 1), width=16, image_size=32),
                                  dict(context_length=77, vocab_size=49408, width=32, heads=4, layers=1))
    with pytest.raises(fastprompt.clip.UnsupportedModelError, match="ModifiedResNet; fastprompt drives ViT image towers"):
        methods.build("coop", resnet, CLASSNAMES)
    pooled = open_clip.model.CLIP(32, dict(image_size=32, patch_size=8, width=32, head_width=16, layers=1,
                                           pool_type="avg"),
                                  dict(context_length=77, vocab_size=49408, width=32, heads=4, layers=1))
    with pytest.raises(fastprompt.clip.UnsupportedModelError, match="class token"):
        methods.build("coop", pooled, CLASSNAMES)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("device,dtype", [("cpu", torch.bfloat16),
                                          pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu),
                                          pytest.param("cuda", torch.float16, marks=pytest.mark.gpu)],
                         ids=["cpu-bf16", "cuda-bf16", "cuda-fp16"])
def test_autocast(name, device, dtype):
    """Under torch.autocast the whole method runs in the autocast dtype; the trained tensors stay fp32."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    method = build(name).to(device)
    images, labels = batch()
    # what the blocks compute: the attention output (through ls_1, an Identity here) and the MLP output of every
    # block of both towers, and the outputs of the fused prompt modules (CMPA, DAFE)
    seen = {}

    def record(what):
        def hook(module, args, output):
            outputs = output if isinstance(output, tuple) else (output,)
            seen.setdefault(what, set()).update(o.dtype for o in outputs if o is not None)
        return hook

    clip = method.clip
    for tower, blocks in (("image", clip.vision_blocks), ("text", clip.text_blocks)):
        for i, block in enumerate(blocks):
            block.module.ls_1.register_forward_hook(record(f"{tower} block {i} attention"))
            block.module.mlp.register_forward_hook(record(f"{tower} block {i} mlp"))
    expected = {f"image block {i} {part}" for i in range(clip.vision_layers) for part in ("attention", "mlp")}
    if name != "vpt_deep":  # VPT-deep's text features are fixed at construction
        expected |= {f"text block {i} {part}" for i in range(clip.text_layers) for part in ("attention", "mlp")}
    for n, module in method.named_modules():
        if isinstance(module, (fastprompt.CrossModalPromptAttention, fastprompt.DeepAdaptiveFeatureEnhancement)):
            module.register_forward_hook(record(n))
            expected.add(n)
    with torch.autocast(device, dtype=dtype):
        loss = method.loss(images.to(device), labels.to(device))
    loss.backward()
    assert torch.isfinite(loss)
    assert expected <= seen.keys(), sorted(expected - seen.keys())
    assert {what: dtypes for what, dtypes in seen.items() if dtypes != {dtype}} == {}
    trained = [p for p in method.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 for p in trained)
