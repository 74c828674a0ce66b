"""DAFE layer fusion: every backend against the naive float64 implementation, forward and backward, on
odd shapes and all gate modes; layouts, autocast, opcheck, torch.compile, a property test and bad input."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastprompt
from fastprompt.ops import dafe_fusion
from fastprompt.testing import assert_close, poisoned_outputs

from .. import naive
from ..helpers import BACKENDS, DEVICES, LOW_PRECISION, NOT_EMULATED, grads_of, leaf, require_backend

GATES = ["channel", "token", "scalar"]


def make_module(dim, gate, seed=0) -> fastprompt.DeepAdaptiveFeatureEnhancement:
    """Random parameters (the zero-initialised gates would make every gate exactly 0.5), at the scale of
    nn.Linear's initialisation: gate logits of order 1, as in training."""
    torch.manual_seed(seed)
    module = fastprompt.DeepAdaptiveFeatureEnhancement(dim, gate)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = dim ** -0.5 if p.dim() == 2 else 0.5
            p.copy_(torch.randn_like(p) * scale + (1.0 if name == "norm.weight" else 0.0))
    return module


def run_module(module, prev, task, upstream):
    prev, task = leaf(prev), leaf(task)
    out = module(prev, task)
    params = dict(module.named_parameters())
    grads = grads_of([out], [prev, task] + list(params.values()), [upstream])
    names = [n.removeprefix("_orig_mod.") for n in params]
    return out, dict(zip(["prev", "task"] + names, grads))


def run_naive(module, prev, task, upstream, dtype=torch.float64):
    params = {k: leaf(v, dtype) for k, v in module.named_parameters()}
    prev, task = leaf(prev, dtype), leaf(task, dtype)
    out = naive.dafe(prev, task, module.gate, params)
    grads = grads_of([out], [prev, task] + list(params.values()), [upstream.to(dtype)])
    return out, dict(zip(["prev", "task"] + list(params), grads))


def assert_matches(out, grads, ref_out, ref_grads, eager_out=None, eager_grads=None):
    assert_close("out", out, ref_out, eager_out)
    for name, ref in ref_grads.items():
        assert_close(f"grad {name}", grads[name], ref, None if eager_grads is None else eager_grads[name])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("d", [24, 40, 96])
@pytest.mark.parametrize("m", [1, 2, 3, 7])
@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("shared_task", [True, False], ids=["shared", "per-sample"])
def test_matches_naive_fp32(device, backend, gate, d, m, n, shared_task):
    dev = require_backend("dafe", backend, device)
    module = make_module(d, gate, seed=d + m).to(dev)
    module.backend = backend
    prev = torch.randn(n, m, d, device=dev)
    task = torch.randn(m, d, device=dev) if shared_task else torch.randn(n, m, d, device=dev)
    upstream = torch.randn(n, m, d, device=dev)
    with poisoned_outputs():
        out, grads = run_module(module, prev, task, upstream)
    assert_matches(out, grads, *run_naive(module, prev, task, upstream))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("shared_task", [True, False], ids=["shared", "per-sample"])
def test_many_rows_and_a_wide_row(backend, gate, shared_task):
    """More rows than one row chunk of the weight-gradient loops, and rows wider than one column chunk."""
    dev = require_backend("dafe", backend, "cpu")
    n, m, d = 20, 7, 200
    module = make_module(d, gate, seed=13).to(dev)
    module.backend = backend
    prev = torch.randn(n, m, d)
    task = torch.randn(m, d) if shared_task else torch.randn(n, m, d)
    upstream = torch.randn(n, m, d)
    with poisoned_outputs():
        out, grads = run_module(module, prev, task, upstream)
    assert_matches(out, grads, *run_naive(module, prev, task, upstream))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", GATES)
def test_sum_backward_with_stride0_upstream(backend, gate):
    dev = require_backend("dafe", backend, "cpu")
    module = make_module(40, gate, seed=1).to(dev)
    module.backend = backend
    prev, task = leaf(torch.randn(5, 3, 40)), leaf(torch.randn(3, 40))
    module(prev, task).sum().backward()  # the upstream gradient is a stride-0 view
    ref_prev, ref_task = leaf(prev, torch.float64), leaf(task, torch.float64)
    params = {k: leaf(v, torch.float64) for k, v in module.named_parameters()}
    naive.dafe(ref_prev, ref_task, gate, params).sum().backward()
    assert_close("grad prev", prev.grad, ref_prev.grad)
    assert_close("grad task", task.grad, ref_task.grad)
    for name, p in module.named_parameters():
        assert_close(f"grad {name}", p.grad, params[name].grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("gate", GATES)
def test_low_precision_within_twice_eager_error(device, backend, dtype, gate):
    dev = require_backend("dafe", backend, device, dtype)
    module = make_module(40, gate, seed=3).to(dev)
    prev, task, upstream = torch.randn(5, 7, 40, device=dev), torch.randn(7, 40, device=dev), torch.randn(5, 7, 40,
                                                                                                        device=dev)
    ref = run_naive(module, prev, task, upstream)
    eager = run_naive(module.to(dtype), prev.to(dtype), task.to(dtype), upstream, dtype)
    module.backend = backend
    with poisoned_outputs():
        out, grads = run_module(module, prev.to(dtype), task.to(dtype), upstream.to(dtype))
    assert out.dtype == dtype
    assert_matches(out, grads, *ref, *eager)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    require_backend("dafe", backend, "cpu")
    module = make_module(24, "channel", seed=4)
    module.backend = backend
    prev = torch.randn(3, 5, 24).transpose(0, 1)   # (N=5, M=3, D) with M-major storage
    task = torch.randn(3, 48)[:, ::2]               # stride 2 in the last dim
    upstream = torch.randn(5, 3, 24)
    with poisoned_outputs():
        out, grads = run_module(module, prev, task, upstream)
    assert_matches(out, grads, *run_naive(module, prev, task, upstream))


def test_initial_gate_is_one_half_in_every_mode():
    prev, task = torch.randn(2, 3, 24), torch.randn(3, 24)
    for gate in GATES:
        out = fastprompt.DeepAdaptiveFeatureEnhancement(24, gate)(prev, task)
        torch.testing.assert_close(out, 0.5 * prev + 0.5 * task)


def test_parameter_names_are_the_designed_ones():
    assert set(fastprompt.DeepAdaptiveFeatureEnhancement(8, "channel").state_dict()) == {
        "norm.weight", "norm.bias", "gate_prev.weight", "gate_prev.bias", "gate_task.weight"}
    token = fastprompt.DeepAdaptiveFeatureEnhancement(8, "token")
    assert token.gate_prev.weight.shape == (1, 8) and token.gate_task.weight.shape == (1, 8)
    assert set(fastprompt.DeepAdaptiveFeatureEnhancement(8, "scalar").state_dict()) == {"alpha"}
    with pytest.raises(ValueError, match="gate must be one of"):
        fastprompt.DeepAdaptiveFeatureEnhancement(8, "vector")


@pytest.mark.parametrize("gate", GATES)
def test_gradcheck_float64(gate):
    module = make_module(6, gate, seed=5).double()
    params = [leaf(p) for p in module.parameters()]
    prev, task = leaf(torch.randn(2, 3, 6, dtype=torch.float64)), leaf(torch.randn(3, 6, dtype=torch.float64))

    def fn(prev, task, *params):
        if gate == "scalar":
            return dafe_fusion(prev, task, gate=gate, alpha=params[0], backend="reference")
        return dafe_fusion(prev, task, gate=gate, ln_weight=params[0], ln_bias=params[1], gate_prev_weight=params[2],
                           gate_prev_bias=params[3], gate_task_weight=params[4], backend="reference")

    assert [n for n, _ in module.named_parameters()][:1] == (["alpha"] if gate == "scalar" else ["norm.weight"])
    assert torch.autograd.gradcheck(fn, (prev, task, *params))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("shared_task", [True, False])
def test_opcheck_raw_ops(backend, gate, shared_task):
    require_backend("dafe", backend, "cpu")
    fwd = getattr(torch.ops.fastprompt, f"dafe_fwd_{backend}").default
    bwd = getattr(torch.ops.fastprompt, f"dafe_bwd_{backend}").default
    module = make_module(24, gate)
    params = [p.detach() for p in module.parameters()]
    prev = torch.randn(5, 3, 24)
    task = torch.randn(3, 24) if shared_task else torch.randn(5, 3, 24)
    torch.library.opcheck(fwd, (prev, task, params, gate, 1e-5))
    _, saved = fwd(prev, task, params, gate, 1e-5)
    torch.library.opcheck(bwd, (torch.randn(5, 3, 24), prev, task, params, saved, gate, 1e-5))


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", ["channel", "scalar"])
def test_torch_compile_fullgraph_matches_eager(backend, gate):
    require_backend("dafe", backend, "cpu")
    module = make_module(24, gate, seed=6)
    module.backend = backend
    prev, task, upstream = torch.randn(5, 3, 24), torch.randn(3, 24), torch.randn(5, 3, 24)
    eager_out, eager_grads = run_module(module, prev, task, upstream)
    out, grads = run_module(torch.compile(module, fullgraph=True), prev, task, upstream)
    torch.testing.assert_close(out, eager_out)
    for name, g in eager_grads.items():
        torch.testing.assert_close(grads[name], g)


def test_autocast_follows_the_autocast_dtype():
    module = make_module(24, "channel", seed=7)
    prev, task = leaf(torch.randn(5, 3, 24)), leaf(torch.randn(3, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(prev, task)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert module.gate_prev.weight.grad.dtype == torch.float32 and prev.grad.dtype == torch.float32


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 6), m=st.integers(1, 6), d=st.integers(1, 40), gate=st.sampled_from(GATES),
       shared_task=st.booleans(), transposed=st.booleans(), seed=st.integers(0, 2**16))
def test_property_reference_matches_naive(n, m, d, gate, shared_task, transposed, seed):
    module = make_module(d, gate, seed=seed).double()
    module.backend = "reference"
    gen = torch.Generator().manual_seed(seed)
    prev = torch.randn(m, n, d, generator=gen, dtype=torch.float64).transpose(0, 1) if transposed else \
        torch.randn(n, m, d, generator=gen, dtype=torch.float64)
    task = torch.randn(*((m, d) if shared_task else (n, m, d)), generator=gen, dtype=torch.float64)
    upstream = torch.randn(n, m, d, generator=gen, dtype=torch.float64)
    out, grads = run_module(module, prev, task, upstream)
    ref_out, ref_grads = run_naive(module, prev, task, upstream)
    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-10)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-9, atol=1e-10, msg=name)


# ---- bad input ---------------------------------------------------------------------------------

def _channel_params(d=24, k=None):
    k = k or d
    return dict(ln_weight=torch.ones(d), ln_bias=torch.zeros(d), gate_prev_weight=torch.zeros(k, d),
                gate_prev_bias=torch.zeros(k), gate_task_weight=torch.zeros(k, d))


@pytest.mark.parametrize("prev,task,kw,error,match", [
    (torch.randn(3, 24), torch.randn(3, 24), _channel_params(), ValueError, r"prev must be 3-D \(N, M, D\)"),
    (torch.randn(2, 3, 24), torch.randn(24), _channel_params(), ValueError, "task must be 2-D or 3-D"),
    (torch.randn(2, 3, 24), torch.randn(4, 24), _channel_params(), ValueError, r"task must have shape \(3, 24\)"),
    (torch.randn(2, 3, 24), torch.randn(5, 3, 24), _channel_params(), ValueError, r"task must have shape \(2, 3, 24\)"),
    (torch.randn(2, 0, 24), torch.randn(0, 24), _channel_params(), ValueError, "prev is empty"),
    (torch.randn(2, 3, 24), torch.randn(3, 24), _channel_params(d=16), ValueError,
     r"ln_weight must have shape \(24,\)"),
    (torch.randn(2, 3, 24), torch.randn(3, 24), _channel_params(k=1), ValueError,
     r"gate_prev_weight must have shape \(24, 24\)"),
    (torch.randn(2, 3, 24), torch.randn(3, 24), dict(_channel_params(), gate="token"), ValueError,
     r"gate_prev_weight must have shape \(1, 24\)"),
    (torch.randn(2, 3, 24), torch.randn(3, 24), dict(_channel_params(), gate_task_weight=None), ValueError,
     "the channel gate needs gate_task_weight"),
    (torch.randn(2, 3, 24), torch.randn(3, 24), dict(_channel_params(), gate="scalar"), ValueError,
     "the scalar gate takes only alpha"),
    (torch.randn(2, 3, 24), torch.randn(3, 24), dict(gate="scalar", alpha=torch.zeros(1)), ValueError,
     "alpha must be 0-D"),
    (torch.randn(2, 3, 24), torch.randn(3, 24), dict(_channel_params(), alpha=torch.zeros(())), ValueError,
     "alpha belongs to the scalar gate"),
    (torch.randn(2, 3, 24), torch.randn(3, 24), dict(_channel_params(), gate="sum"), ValueError,
     "gate must be one of"),
    (torch.randn(2, 3, 24), torch.randn(3, 24).half(), _channel_params(), TypeError, "mixed dtypes"),
    (torch.randn(2, 3, 24).int(), torch.randn(3, 24), _channel_params(), TypeError, "dtype torch.int32"),
    (torch.randn(2, 3, 24), torch.randn(3, 24, device="meta"), _channel_params(), ValueError,
     "prev is on cpu and task is on meta"),
    pytest.param(torch.randn(2, 3, 24), torch.randn(3, 24), dict(_channel_params(), backend="cuda"),
                 fastprompt.BackendUnavailableError, "backend 'cuda' cannot run dafe here", marks=NOT_EMULATED),
])
def test_bad_input_raises_a_clear_error(prev, task, kw, error, match):
    with pytest.raises(error, match=match):
        dafe_fusion(prev, task, **kw)
