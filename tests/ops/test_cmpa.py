"""Cross-modal prompt attention: every backend against the naive float64 implementation, forward and
backward, on odd shapes; layouts, autocast, opcheck, torch.compile, a property test and bad inputs."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastprompt
from fastprompt.ops import CMPASideParams, cross_modal_prompt_attention
from fastprompt.testing import assert_close, poisoned_outputs

from .. import naive
from ..helpers import (BACKENDS, CUDA_EMULATED, DEVICES, LOW_PRECISION, NOT_EMULATED, TritonLaunchCounter, grads_of,
                      leaf, require_backend)

# (Dv, Hv, Dt, Ht): widths that are not powers of two, head widths 8, 3, 12, 20
WIDTHS = [(24, 3, 40, 5), (24, 8, 96, 8), (96, 8, 40, 2)]
FUSINGS = ["mean", "first", "max"]


def make_module(dv, hv, dt, ht, fusing="mean", seed=0, **kwargs) -> fastprompt.CrossModalPromptAttention:
    """The original's initialisation, then LayerNorm affines and biases moved off 1 / 0 so that every
    parameter matters."""
    torch.manual_seed(seed)
    module = fastprompt.CrossModalPromptAttention(dv, hv, dt, ht, fusing=fusing, **kwargs)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    return module


def run_module(module, visual, text, upstream=None):
    """Outputs and the gradients of (inputs, parameters in state_dict order)."""
    visual, text = leaf(visual), leaf(text)
    new_v, new_t = module(visual, text)
    params = dict(module.named_parameters())
    if upstream is None:  # .sum(): the upstream gradients are stride-0 views
        upstream = [torch.ones_like(new_v), torch.ones_like(new_t)]
    grads = grads_of([new_v, new_t], [visual, text] + list(params.values()), upstream)
    names = [n.removeprefix("_orig_mod.") for n in params]  # a torch.compile'd module prefixes its names
    return (new_v, new_t), dict(zip(["visual", "text"] + names, grads))


def run_naive(module, visual, text, n_heads, upstream=None, dtype=torch.float64):
    sd = {k: leaf(v, dtype) for k, v in module.state_dict().items()}
    visual, text = leaf(visual, dtype), leaf(text, dtype)
    new_v, new_t = naive.cmpa(visual, text, sd, *n_heads, module.fusing)
    if upstream is None:
        upstream = [torch.ones_like(new_v), torch.ones_like(new_t)]
    else:
        upstream = [u.to(dtype) for u in upstream]
    names = list(sd)
    grads = grads_of([new_v, new_t], [visual, text] + [sd[n] for n in names], upstream)
    return (new_v, new_t), dict(zip(["visual", "text"] + names, grads))


def assert_matches(outs, grads, ref_outs, ref_grads, eager_outs=None, eager_grads=None):
    for i, name in enumerate(["new_visual", "new_text"]):
        assert_close(name, outs[i], ref_outs[i], None if eager_outs is None else eager_outs[i])
    for name, ref in ref_grads.items():
        got = grads[name]
        if ref is None:  # a parameter the math never reaches would have to get no gradient
            assert got is None or torch.count_nonzero(got) == 0, name
            continue
        assert got is not None, f"no gradient for {name}"
        assert_close(f"grad {name}", got, ref, None if eager_grads is None else eager_grads[name])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("widths", WIDTHS, ids=lambda w: "v{}h{}-t{}h{}".format(*w))
@pytest.mark.parametrize("m", [1, 2, 3, 7])
@pytest.mark.parametrize("fusing", FUSINGS)
@pytest.mark.parametrize("upstream_kind", ["random", "sum"])
def test_matches_naive_fp32(device, backend, widths, m, fusing, upstream_kind):
    dev = require_backend("cmpa", backend, device)
    dv, hv, dt, ht = widths
    b, c = (5, 3) if m != 2 else (1, 1)
    module = make_module(dv, hv, dt, ht, fusing, seed=m).to(dev)
    module.backend = backend
    visual, text = torch.randn(m, b, dv, device=dev), torch.randn(m, c, dt, device=dev)
    upstream = None
    if upstream_kind == "random":
        upstream = [torch.randn(m, b, dv, device=dev), torch.randn(m, c, dt, device=dev)]
    with poisoned_outputs():
        outs, grads = run_module(module, visual, text, upstream)
    ref_outs, ref_grads = run_naive(module, visual, text, (hv, ht), upstream)
    assert_matches(outs, grads, ref_outs, ref_grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fusing", FUSINGS)
def test_long_batches_and_wide_heads(backend, fusing):
    """Batches longer than one pooling chunk and heads wider than one head-dim chunk of the kernels."""
    dev = require_backend("cmpa", backend, "cpu")
    m, b, c, dv, hv, dt, ht = 3, 70, 45, 96, 1, 80, 1
    module = make_module(dv, hv, dt, ht, fusing, seed=12, backend=backend).to(dev)
    visual, text = torch.randn(m, b, dv), torch.randn(m, c, dt)
    upstream = [torch.randn(m, b, dv), torch.randn(m, c, dt)]
    with poisoned_outputs():
        outs, grads = run_module(module, visual, text, upstream)
    assert_matches(outs, grads, *run_naive(module, visual, text, (hv, ht), upstream))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("fusing", FUSINGS)
def test_low_precision_within_twice_eager_error(device, backend, dtype, fusing):
    dev = require_backend("cmpa", backend, device, dtype)
    m, b, c, (dv, hv, dt, ht) = 7, 5, 3, WIDTHS[0]
    module = make_module(dv, hv, dt, ht, fusing, seed=11).to(dev)
    visual, text = torch.randn(m, b, dv, device=dev), torch.randn(m, c, dt, device=dev)
    upstream = [torch.randn(m, b, dv, device=dev), torch.randn(m, c, dt, device=dev)]
    ref_outs, ref_grads = run_naive(module, visual, text, (hv, ht), upstream)
    eager_outs, eager_grads = run_naive(module, visual.to(dtype), text.to(dtype), (hv, ht), upstream, dtype)
    low = module.to(dtype)
    low.backend = backend
    with poisoned_outputs():
        outs, grads = run_module(low, visual.to(dtype), text.to(dtype), [u.to(dtype) for u in upstream])
    assert outs[0].dtype == dtype and grads["proj_t2v.weight"].dtype == dtype
    assert_matches(outs, grads, ref_outs, ref_grads, eager_outs, eager_grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    dev = require_backend("cmpa", backend, "cpu")
    m, b, c, (dv, hv, dt, ht) = 3, 4, 5, WIDTHS[0]
    module = make_module(dv, hv, dt, ht, "max", seed=3)
    module.backend = backend
    visual = torch.randn(b, m, dv).transpose(0, 1)          # (M, B, Dv) with B-major storage
    text = torch.randn(m, c, 2 * dt)[:, :, ::2]             # every other channel: stride 2 in the last dim
    assert not visual.is_contiguous() and not text.is_contiguous()
    with poisoned_outputs():
        outs, grads = run_module(module, visual, text)
    assert_matches(outs, grads, *run_naive(module, visual, text, (hv, ht)))
    assert dev.type == "cpu"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fusing", FUSINGS)
def test_triton_launch_budget(device, fusing):
    """Both sides together: at most 6 kernel launches forward and 8 backward (DESIGN.md)."""
    dev = require_backend("cmpa", "triton", device)
    from fastprompt.kernels import cmpa as triton_cmpa

    module = make_module(24, 3, 40, 5, fusing, backend="triton").to(dev)
    visual = torch.randn(3, 4, 24, device=dev, requires_grad=True)
    text = torch.randn(3, 6, 40, device=dev, requires_grad=True)
    with TritonLaunchCounter(triton_cmpa._pool_kernel) as fwd:
        new_v, new_t = module(visual, text)
    with TritonLaunchCounter(triton_cmpa._pool_kernel) as bwd:
        torch.autograd.backward([new_v, new_t], [torch.ones_like(new_v), torch.ones_like(new_t)])
    assert len(fwd.names) <= 6, fwd.names
    assert len(bwd.names) <= 8, bwd.names
    if dev.type == "cuda":  # and nothing else runs on the GPU inside the raw ops
        vp = [p.detach() for p in module.side_params("visual")]
        tp = [p.detach() for p in module.side_params("text")]
        args = (visual.detach(), text.detach(), vp, tp, 3, 5, fusing, 1e-5, True)
        fwd_kernels = _cuda_kernels(lambda: torch.ops.fastprompt.cmpa_fwd_triton(*args))
        _, _, saved = torch.ops.fastprompt.cmpa_fwd_triton(*args)
        bwd_kernels = _cuda_kernels(lambda: torch.ops.fastprompt.cmpa_bwd_triton(
            torch.ones(3, 4, 24, device=dev), torch.ones(3, 6, 40, device=dev), *args[:4], saved, 3, 5, fusing, 1e-5,
            True))
        assert fwd_kernels <= 6 and bwd_kernels <= 8, (fwd_kernels, bwd_kernels)


def test_triton_workspace_slots_follow_the_layouts():
    """The Triton stages find each side's workspace slots from its sizes (kernels/cmpa.py `_xbar` ... `_dother`);
    they must be the slots of fastprompt/ops/cmpa_layout.py (the saved workspace the fakes describe) and of
    `backward_layout` (the backward's allocation): a probe kernel marks the first element of every slot."""
    require_backend("cmpa", "triton", "cpu")
    from fastprompt.kernels import cmpa as triton_cmpa
    from fastprompt.ops.cmpa_layout import forward_layout

    from ..triton_probes import cmpa_workspace_slots

    for m, d, d_other, heads, f in [(1, 24, 40, 3, 96), (7, 40, 24, 5, 160), (16, 768, 512, 12, 3072)]:
        fwd = forward_layout(m, d, heads, f)
        bwd = triton_cmpa.backward_layout(m, d, d_other, f)
        ws, bws = torch.zeros(fwd["_total"][0] + 1), torch.zeros(bwd["_total"][0] + 1)
        side = triton_cmpa.SideView(d, f, heads, d // heads, (d // heads) ** -0.5, ws, bws)
        cmpa_workspace_slots[(1,)](side, m)
        for layout, buffer in ((fwd, ws), (bwd, bws)):
            names = [name for name in layout if name != "_total"]
            marks = {int(i): int(buffer[i]) for i in buffer.nonzero().flatten()}
            assert marks == {layout[name][0]: k + 1 for k, name in enumerate(names)}, (m, d, names, marks)


@pytest.mark.gpu
@pytest.mark.parametrize("widths", [(24, 3, 40, 5), (768, 12, 512, 8)], ids=["small", "vit-b16"])
@pytest.mark.parametrize("fusing", FUSINGS)
def test_cuda_one_launch_each_way(widths, fusing):
    """The CUDA C++ CMPA runs both sides in one cooperative launch forward and one backward, counted by the
    extension (which would report the per-stage fallback) and by the profiler."""
    dev = require_backend("cmpa", "cuda", "cuda")
    from fastprompt.ops import cuda as cuda_backend

    dv, hv, dt, ht = widths
    module = make_module(dv, hv, dt, ht, fusing, backend="cuda").to(dev)
    visual = torch.randn(7, 4, dv, device=dev, requires_grad=True)
    text = torch.randn(7, 6, dt, device=dev, requires_grad=True)
    before = cuda_backend.launches()
    new_v, new_t = module(visual, text)
    forward = cuda_backend.launches() - before
    before = cuda_backend.launches()
    torch.autograd.backward([new_v, new_t], [torch.ones_like(new_v), torch.ones_like(new_t)])
    backward = cuda_backend.launches() - before
    assert (forward, backward) == (1, 1)
    vp = [p.detach() for p in module.side_params("visual")]
    tp = [p.detach() for p in module.side_params("text")]
    args = (visual.detach(), text.detach(), vp, tp, hv, ht, fusing, 1e-5, True)
    _, _, saved = torch.ops.fastprompt.cmpa_fwd_cuda(*args)
    assert _cuda_kernels(lambda: torch.ops.fastprompt.cmpa_fwd_cuda(*args)) == 1
    assert _cuda_kernels(lambda: torch.ops.fastprompt.cmpa_bwd_cuda(
        torch.ones(7, 4, dv, device=dev), torch.ones(7, 6, dt, device=dev), *args[:4], saved, hv, ht, fusing, 1e-5,
        True)) == 1


@pytest.mark.parametrize("widths", [(24, 3, 40, 5), (768, 12, 512, 8)], ids=["small", "vit-b16"])
@pytest.mark.parametrize("fusing", FUSINGS)
@pytest.mark.parametrize("cooperative", [True, False], ids=["cooperative", "per-stage"])
def test_cuda_emulated_launches_each_way(monkeypatch, widths, fusing, cooperative):
    """The CPU twin of test_cuda_one_launch_each_way, under FASTPROMPT_CUDA_EMULATE=1: one cooperative launch
    each way on the emulated device, and on a device without cooperative launches (the emulator's
    FASTPROMPT_CUDA_EMULATE_COOPERATIVE=0) the per-stage fallback, 9 launches forward and 13 backward; counted by
    the extension and by the emulator's scheduler, and both paths' numbers checked against float64."""
    if not CUDA_EMULATED:
        pytest.skip("needs FASTPROMPT_CUDA_EMULATE=1 (on a GPU: test_cuda_one_launch_each_way)")
    require_backend("cmpa", "cuda", "cpu")
    from fastprompt.ops import cuda as cuda_backend

    monkeypatch.setenv("FASTPROMPT_CUDA_EMULATE_COOPERATIVE", "1" if cooperative else "0")
    dv, hv, dt, ht = widths
    module = make_module(dv, hv, dt, ht, fusing, seed=17, backend="cuda")
    visual, text = leaf(torch.randn(7, 4, dv)), leaf(torch.randn(7, 6, dt))
    upstream = [torch.randn(7, 4, dv), torch.randn(7, 6, dt)]

    def counts():
        return cuda_backend.launches(), torch.ops.cuda_emulator.kernel_launches()

    before = counts()
    with poisoned_outputs():
        new_v, new_t = module(visual, text)
    middle = counts()
    params = dict(module.named_parameters())
    grads = grads_of([new_v, new_t], [visual, text] + list(params.values()), upstream)
    after = counts()
    expected = (1, 1) if cooperative else (9, 13)
    assert (middle[0] - before[0], after[0] - middle[0]) == expected, "launches reported by the extension"
    assert (middle[1] - before[1], after[1] - middle[1]) == expected, "launches run by the emulator"
    assert_matches((new_v, new_t), dict(zip(["visual", "text"] + list(params), grads)),
                   *run_naive(module, visual, text, (hv, ht), upstream))


def _cuda_kernels(fn) -> int:
    """CUDA kernels launched by fn, counted by the profiler."""
    fn()  # compile first
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b", [4, 37], ids=["one-chunk", "several-chunks"])
def test_max_pooling_propagates_nan_as_torch_max(backend, b):
    """torch.max (the original module's pooling) returns the first NaN of a column as its maximum: the outputs
    turn NaN where the naive float64 ones do, and the gradient goes to that NaN's row, not another one."""
    dev = require_backend("cmpa", backend, "cpu")
    module = make_module(24, 3, 40, 5, "max", seed=5, backend=backend)
    visual, text = torch.randn(3, b, 24), torch.randn(3, 6, 40)
    visual[1, 2, 5] = visual[1, b - 1, 5] = visual[2, b - 1, 7] = float("nan")
    outs, grads = run_module(module, visual, text)
    ref_outs, ref_grads = run_naive(module, visual, text, (3, 5))
    for got, ref in zip(outs, ref_outs):
        assert torch.equal(got.isnan(), ref.isnan())
    for name in ("visual", "text"):
        assert torch.equal(grads[name].isnan(), ref_grads[name].isnan()), name
        assert torch.equal(grads[name] != 0, ref_grads[name] != 0), name
    assert dev.type == "cpu"


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    """No atomics: two runs give bit-identical outputs and gradients."""
    require_backend("cmpa", backend, "cpu")
    module = make_module(40, 5, 24, 3, "mean", seed=14, backend=backend)
    visual, text = torch.randn(7, 5, 40), torch.randn(7, 3, 24)
    upstream = [torch.randn(7, 5, 40), torch.randn(7, 3, 24)]
    first = run_module(module, visual, text, upstream)
    second = run_module(module, visual, text, upstream)
    for a, b in zip(first[0], second[0]):
        assert torch.equal(a, b)
    for name in first[1]:
        assert torch.equal(first[1][name], second[1][name]), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_sixty_four_prompts(backend):
    dev = require_backend("cmpa", backend, "cpu")
    module = make_module(24, 3, 40, 5, "max", seed=15, backend=backend).to(dev)
    visual, text = torch.randn(64, 2, 24), torch.randn(64, 3, 40)
    with poisoned_outputs():
        outs, grads = run_module(module, visual, text)
    assert_matches(outs, grads, *run_naive(module, visual, text, (3, 5)))


def test_triton_refuses_more_than_64_prompts_with_a_reason():
    if fastprompt.backends.load_error("triton") is not None:
        pytest.skip(fastprompt.backends.load_error("triton"))
    from fastprompt.kernels import cmpa as triton_cmpa

    problem = dict(dtype=torch.float32, m=65, dv=24, dt=40)
    assert "up to 64 prompts, got M=65" in triton_cmpa.supports(problem)
    assert "widths up to 1024" in triton_cmpa.supports(dict(problem, m=3, dv=1280))
    assert "float64" in triton_cmpa.supports(dict(problem, m=3, dtype=torch.float64))
    assert triton_cmpa.supports(dict(problem, m=64)) is None


def test_outputs_are_stride0_broadcasts_like_the_original():
    m, b, c = 3, 4, 6
    module = make_module(24, 3, 40, 5)
    new_v, new_t = module(torch.randn(m, b, 24), torch.randn(m, c, 40))
    assert new_v.shape == (m, b, 24) and new_v.stride() == (24, 0, 1)
    assert new_t.shape == (m, c, 40) and new_t.stride() == (40, 0, 1)
    first = make_module(24, 3, 40, 5, batch_first=True)
    first.load_state_dict(module.state_dict())
    fv, ft = first(torch.randn(b, m, 24), torch.randn(c, m, 40))
    assert fv.shape == (b, m, 24) and fv.stride()[0] == 0
    assert ft.shape == (c, m, 40) and ft.stride()[0] == 0


def test_batch_first_equals_lnd():
    m, b, c = 3, 4, 6
    lnd = make_module(24, 3, 40, 5, "max", seed=5)
    bf = make_module(24, 3, 40, 5, "max", seed=6, batch_first=True)
    bf.load_state_dict(lnd.state_dict())
    visual, text = torch.randn(m, b, 24), torch.randn(m, c, 40)
    (v1, t1), g1 = run_module(lnd, visual, text)
    (v2, t2), g2 = run_module(bf, visual.transpose(0, 1), text.transpose(0, 1))
    torch.testing.assert_close(v2.transpose(0, 1), v1, rtol=0, atol=0)
    torch.testing.assert_close(t2.transpose(0, 1), t1, rtol=0, atol=0)
    torch.testing.assert_close(g2["visual"].transpose(0, 1), g1["visual"], rtol=0, atol=0)
    torch.testing.assert_close(g2["proj_v2t.weight"], g1["proj_v2t.weight"], rtol=0, atol=0)


def test_the_two_sides_are_coupled():
    """M >= 2: each side's output depends on the other side's input (through the query projection)."""
    module = make_module(24, 3, 40, 5, seed=8)
    visual, text = torch.randn(3, 2, 24), torch.randn(3, 4, 40)
    v1, t1 = module(visual, text)
    v2, t2 = module(visual, text + torch.randn_like(text))
    v3, t3 = module(visual + torch.randn_like(visual), text)
    assert (v1 - v2).abs().max() > 1e-3, "the visual output ignores the text input"
    assert (t1 - t3).abs().max() > 1e-3, "the text output ignores the visual input"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b", [4, 70], ids=["short-batch", "long-batch"])
def test_max_pooling_sends_the_gradient_to_the_first_maximum(backend, b):
    """Ties, also between batch elements far apart (kernels pool a long batch in chunks)."""
    require_backend("cmpa", backend, "cpu")
    module = make_module(24, 3, 40, 5, "max", seed=9, backend=backend)
    visual = torch.randn(3, b, 24)
    visual[:, 0, ::2] += 5  # elements 0 and 1 hold the maxima, so that their copies tie with them
    visual[:, 1, 1::2] += 5
    copies = {2: 1, 3: 0} if b == 4 else {2: 1, 3: 0, 40: 1, 66: 0, 69: 40}
    for dst, src in copies.items():  # ties wherever the source holds the maximum
        visual[:, dst] = visual[:, src]
    text = torch.randn(3, 2, 40)
    upstream = [torch.randn(3, b, 24), torch.randn(3, 2, 40)]
    with poisoned_outputs():
        _, grads = run_module(module, visual, text, upstream)
    for dst in copies:
        assert torch.count_nonzero(grads["visual"][:, dst]) == 0, dst
    assert torch.count_nonzero(grads["visual"][:, :2]) > 0
    ref_outs, ref_grads = run_naive(module, visual, text, (3, 5), upstream)
    assert_close("grad visual", grads["visual"], ref_grads["visual"])


@pytest.mark.parametrize("fusing", FUSINGS)
def test_gradcheck_float64(fusing):
    torch.manual_seed(0)
    m, b, c, dv, hv, dt, ht = 2, 2, 3, 4, 2, 6, 3
    module = make_module(dv, hv, dt, ht, fusing).double()
    vp = [leaf(p) for p in module.side_params("visual")]
    tp = [leaf(p) for p in module.side_params("text")]
    visual = leaf(torch.randn(m, b, dv, dtype=torch.float64))
    text = leaf(torch.randn(m, c, dt, dtype=torch.float64))

    def fn(visual, text, *params):
        return cross_modal_prompt_attention(visual, text, params[:14], params[14:], n_head_visual=hv,
                                            n_head_text=ht, fusing=fusing, backend="reference")

    assert torch.autograd.gradcheck(fn, (visual, text, *vp, *tp))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fusing", FUSINGS)
@pytest.mark.parametrize("compute_text", [True, False], ids=["both-sides", "visual-only"])
def test_opcheck_raw_ops(backend, fusing, compute_text):
    require_backend("cmpa", backend, "cpu")
    fwd = getattr(torch.ops.fastprompt, f"cmpa_fwd_{backend}").default
    bwd = getattr(torch.ops.fastprompt, f"cmpa_bwd_{backend}").default
    module = make_module(24, 3, 40, 5, fusing)
    vp = [p.detach() for p in module.side_params("visual")]
    tp = [p.detach() for p in module.side_params("text")]
    visual, text = torch.randn(3, 4, 24), torch.randn(3, 6, 40)
    args = (visual, text, vp, tp, 3, 5, fusing, 1e-5, compute_text)
    torch.library.opcheck(fwd, args)
    _, _, saved = fwd(*args)
    upstreams = [(torch.randn(3, 4, 24), torch.randn(3, 6, 40) if compute_text else None),
                 (torch.ones(3, 1, 24).expand(3, 4, 24), None)]
    if compute_text:
        upstreams.append((None, torch.randn(3, 6, 40)))
    for gv, gt in upstreams:
        torch.library.opcheck(bwd, (gv, gt, visual, text, vp, tp, saved, 3, 5, fusing, 1e-5, compute_text))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fusing", FUSINGS)
def test_visual_side_only(backend, fusing):
    """compute_text=False: the visual output and every gradient it sends back, the text input's through
    proj_t2v included, as with both sides and no gradient from the text output; no text parameter gets one."""
    dev = require_backend("cmpa", backend, "cpu")
    m, b, c = 3, 5, 4
    module = make_module(24, 3, 40, 5, fusing, seed=16, backend=backend).to(dev)
    module.compute_text = False
    visual, text = leaf(torch.randn(m, b, 24)), leaf(torch.randn(m, c, 40))
    upstream = torch.randn(m, b, 24)
    with poisoned_outputs():
        new_v, new_t = module(visual, text)
    assert new_t is None
    new_v.backward(upstream)
    ref_outs, ref_grads = run_naive(module, visual, text, (3, 5), [upstream, torch.zeros(m, c, 40)])
    assert_close("new_visual", new_v, ref_outs[0])
    assert_close("grad visual", visual.grad, ref_grads["visual"])
    assert_close("grad text", text.grad, ref_grads["text"])
    for name, p in module.named_parameters():
        if name.endswith("_text") or "_text." in name or name.startswith("proj_v2t"):
            assert p.grad is None, name
        else:
            assert_close(f"grad {name}", p.grad, ref_grads[name])


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    module = make_module(24, 3, 40, 5, "max", seed=4)
    visual, text = torch.randn(3, 4, 24), torch.randn(3, 6, 40)
    upstream = [torch.randn(3, 4, 24), torch.randn(3, 6, 40)]
    eager_outs, eager_grads = run_module(module, visual, text, upstream)
    compiled = torch.compile(module, fullgraph=True)
    outs, grads = run_module(compiled, visual, text, upstream)
    for a, b in zip(outs, eager_outs):
        torch.testing.assert_close(a, b)
    for name, g in eager_grads.items():
        torch.testing.assert_close(grads[name], g)


def test_autocast_follows_the_autocast_dtype():
    module = make_module(24, 3, 40, 5, seed=2)
    visual, text = leaf(torch.randn(3, 4, 24)), leaf(torch.randn(3, 6, 40))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        new_v, new_t = module(visual, text)
    assert new_v.dtype == torch.bfloat16 and new_t.dtype == torch.bfloat16
    (new_v.float().sum() + new_t.float().sum()).backward()
    assert module.proj_t2v.weight.grad.dtype == torch.float32 and visual.grad.dtype == torch.float32
    # the same as casting everything to bf16 by hand
    vp = [p.detach().bfloat16() for p in module.side_params("visual")]
    tp = [p.detach().bfloat16() for p in module.side_params("text")]
    by_hand = cross_modal_prompt_attention(visual.detach().bfloat16(), text.detach().bfloat16(), vp, tp,
                                           n_head_visual=3, n_head_text=5)
    torch.testing.assert_close(new_v, by_hand[0], rtol=0, atol=0)


def test_constructor_contract():
    assert fastprompt.CrossModalPromptAttention(24, 3, 40, 5).fusing == "mean"
    assert fastprompt.CrossModalPromptAttention(24, 3, 40, 5, {"fusing": "max"}).fusing == "max"
    assert fastprompt.CrossModalPromptAttention(24, 3, 40, 5, {"fusing": "max"}, fusing="max").fusing == "max"
    assert fastprompt.CrossModalPromptAttention(24, 3, 40, 5, None, fusing="first").fusing == "first"
    with pytest.raises(ValueError, match="contradicts"):
        fastprompt.CrossModalPromptAttention(24, 3, 40, 5, {"fusing": "max"}, fusing="mean")
    with pytest.raises(ValueError, match="fusing must be one of"):
        fastprompt.CrossModalPromptAttention(24, 3, 40, 5, {"fusing": "sum"})
    default = fastprompt.CrossModalPromptAttention()
    assert default.proj_t2v.weight.shape == (768, 512) and default.promt_attention_text.num_heads == 8


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.integers(1, 6), b=st.integers(1, 5), c=st.integers(1, 5), hv=st.integers(1, 4), dhv=st.integers(1, 6),
       ht=st.integers(1, 4), dht=st.integers(1, 6), fusing=st.sampled_from(FUSINGS), batch_first=st.booleans(),
       seed=st.integers(0, 2**16))
def test_property_reference_matches_naive(m, b, c, hv, dhv, ht, dht, fusing, batch_first, seed):
    dv, dt = hv * dhv, ht * dht
    module = make_module(dv, hv, dt, ht, fusing, seed=seed, batch_first=batch_first).double()
    module.backend = "reference"
    gen = torch.Generator().manual_seed(seed)
    visual = torch.randn(m, b, dv, generator=gen, dtype=torch.float64)
    text = torch.randn(m, c, dt, generator=gen, dtype=torch.float64)
    ins = (visual.transpose(0, 1), text.transpose(0, 1)) if batch_first else (visual, text)
    (new_v, new_t), grads = run_module(module, *ins)
    if batch_first:
        new_v, new_t = new_v.transpose(0, 1), new_t.transpose(0, 1)
        grads["visual"], grads["text"] = grads["visual"].transpose(0, 1), grads["text"].transpose(0, 1)
    ref_outs, ref_grads = run_naive(module, visual, text, (hv, ht))
    torch.testing.assert_close(new_v, ref_outs[0], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(new_t, ref_outs[1], rtol=1e-9, atol=1e-10)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-9, atol=1e-10, msg=name)


# ---- bad input ---------------------------------------------------------------------------------

def _params(module):
    return module.side_params("visual"), module.side_params("text")


def _call(visual, text, **kw):
    vp, tp = _params(make_module(24, 3, 40, 5))
    return cross_modal_prompt_attention(visual, text, vp, tp, **(dict(n_head_visual=3, n_head_text=5) | kw))


@pytest.mark.parametrize("visual,text,kw,error,match", [
    (torch.randn(3, 24), torch.randn(3, 2, 40), {}, ValueError, r"visual must be 3-D \(M, B, Dv\)"),
    (torch.randn(3, 2, 24), torch.randn(1, 3, 2, 40), {}, ValueError, "text must be 3-D"),
    (torch.randn(3, 2, 24), torch.randn(4, 2, 40), {}, ValueError, "same number of prompts M"),
    (torch.randn(3, 2, 32), torch.randn(3, 2, 40), {}, ValueError, r"visual_params.proj_weight must have shape \(32, 40\)"),
    (torch.randn(3, 2, 24), torch.randn(3, 2, 48), {}, ValueError, "visual_params.proj_weight must have shape"),
    (torch.randn(3, 0, 24), torch.randn(3, 2, 40), {}, ValueError, "visual is empty"),
    (torch.randn(0, 2, 24), torch.randn(0, 2, 40), {}, ValueError, "empty"),
    (torch.randn(3, 2, 24), torch.randn(3, 2, 40), {"fusing": "sum"}, ValueError, "fusing must be one of"),
    (torch.randn(3, 2, 24), torch.randn(3, 2, 40), {"n_head_visual": 5}, ValueError, "not divisible by n_head_visual"),
    (torch.randn(3, 2, 24), torch.randn(3, 2, 40).double(), {}, TypeError, "mixed dtypes"),
    (torch.randn(3, 2, 24).bfloat16(), torch.randn(3, 2, 40).bfloat16(), {}, TypeError, "mixed dtypes"),
    (torch.randint(0, 5, (3, 2, 24)), torch.randn(3, 2, 40), {}, TypeError, "dtype torch.int64"),
    (torch.randn(3, 2, 24), torch.randn(3, 2, 40), {"backend": "fast"}, ValueError, "backend must be one of"),
    pytest.param(torch.randn(3, 2, 24), torch.randn(3, 2, 40), {"backend": "cuda"}, fastprompt.BackendUnavailableError,
                 "backend 'cuda' cannot run cmpa here", marks=NOT_EMULATED),
])
def test_bad_input_raises_a_clear_error(visual, text, kw, error, match):
    with pytest.raises(error, match=match):
        _call(visual, text, **kw)


def test_bad_params_raise_a_clear_error():
    module = make_module(24, 3, 40, 5)
    vp, tp = _params(module)
    with pytest.raises(ValueError, match="take 14 tensors each"):
        cross_modal_prompt_attention(torch.randn(3, 2, 24), torch.randn(3, 2, 40), list(vp)[:13], tp,
                                     n_head_visual=3, n_head_text=5)
    bad = CMPASideParams(*vp)._replace(in_proj_weight=torch.randn(24, 24))
    with pytest.raises(ValueError, match=r"visual_params.in_proj_weight must have shape \(72, 24\)"):
        cross_modal_prompt_attention(torch.randn(3, 2, 24), torch.randn(3, 2, 40), bad, tp, n_head_visual=3,
                                     n_head_text=5)
    with pytest.raises(TypeError, match="text_params.ln2_bias must be a torch.Tensor"):
        cross_modal_prompt_attention(torch.randn(3, 2, 24), torch.randn(3, 2, 40), vp,
                                     CMPASideParams(*tp)._replace(ln2_bias=None), n_head_visual=3, n_head_text=5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixing devices needs a CUDA device")
def test_mixed_devices_raise_a_clear_error():
    module = make_module(24, 3, 40, 5)
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        module(torch.randn(3, 2, 24, device="cuda"), torch.randn(3, 2, 40, device="cuda"))


def test_mixed_devices_raise_a_clear_error_on_any_machine():
    """The meta device stands in for a second device on a machine without a GPU."""
    module = make_module(24, 3, 40, 5)
    with pytest.raises(ValueError, match="visual is on cpu and text is on meta"):
        module(torch.randn(3, 2, 24), torch.randn(3, 2, 40, device="meta"))
