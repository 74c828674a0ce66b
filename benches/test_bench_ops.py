"""Forward + backward of each op: eager PyTorch, torch.compile of the reference math, and every fastprompt
backend that runs here. `pytest benches/ --benchmark-only`; medians are in the table pytest-benchmark prints."""

import pytest
import torch

from fastprompt import insert_prompts
from fastprompt.modules import CrossModalPromptAttention, DeepAdaptiveFeatureEnhancement
from fastprompt.ops import cross_modal_prompt_attention, dafe_fusion
from fastprompt.reference.cmpa import cmpa_eager
from fastprompt.reference.dafe import dafe_eager
from fastprompt.reference.insert import insert_eager

from .conftest import DEVICE, DTYPE, ON_GPU, kernel_providers, run_benchmark

BASELINES = ["eager", "compile"]

# (M, B, C) at ViT-B/16 widths on a GPU; small on the CPU
CMPA_SHAPES = [(2, 4, 100), (16, 32, 1000), (16, 4, 1)] if ON_GPU else [(4, 4, 10)]
CMPA_WIDTHS = (768, 12, 512, 8) if ON_GPU else (96, 4, 64, 4)
DAFE_SHAPES = [(32, 4, 768), (1000, 4, 512)] if ON_GPU else [(8, 4, 96)]
INSERT_SHAPES = [(32, 197 + 16, 16, 768), (1000, 77, 16, 512)] if ON_GPU else [(8, 50, 4, 96)]


def _leaves(*tensors):
    return [t.detach().to(DEVICE, DTYPE).requires_grad_() for t in tensors]


def _fwd_bwd(fn, leaves):
    def step():
        outs = fn(*leaves)
        outs = [o for o in (outs if isinstance(outs, tuple) else (outs,)) if o is not None]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return step


@pytest.mark.parametrize("provider", BASELINES + kernel_providers("cmpa"))
@pytest.mark.parametrize("shape", CMPA_SHAPES, ids=lambda s: "M{}-B{}-C{}".format(*s))
def test_cmpa(benchmark, provider, shape):
    m, b, c = shape
    dv, hv, dt, ht = CMPA_WIDTHS
    module = CrossModalPromptAttention(dv, hv, dt, ht).to(DEVICE, DTYPE)
    vp, tp = list(module.side_params("visual")), list(module.side_params("text"))
    leaves = _leaves(torch.randn(m, b, dv), torch.randn(m, c, dt)) + vp + tp
    if provider in BASELINES:
        fn = lambda v, t, *p: cmpa_eager(v, t, p[:14], p[14:], hv, ht, "mean")  # noqa: E731
        fn = torch.compile(fn) if provider == "compile" else fn
    else:
        def fn(v, t, *p):
            return cross_modal_prompt_attention(v, t, p[:14], p[14:], n_head_visual=hv, n_head_text=ht,
                                                backend=provider)
    run_benchmark(benchmark, _fwd_bwd(fn, leaves))


@pytest.mark.parametrize("provider", BASELINES + kernel_providers("dafe"))
@pytest.mark.parametrize("shape", DAFE_SHAPES, ids=lambda s: "N{}-M{}-D{}".format(*s))
def test_dafe(benchmark, provider, shape):
    n, m, d = shape
    module = DeepAdaptiveFeatureEnhancement(d).to(DEVICE, DTYPE)
    params = list(module.parameters())
    leaves = _leaves(torch.randn(n, m, d), torch.randn(m, d)) + params
    if provider in BASELINES:
        fn = lambda prev, task, *p: dafe_eager(prev, task, list(p), "channel")  # noqa: E731
        fn = torch.compile(fn) if provider == "compile" else fn
    else:
        def fn(prev, task, w, b, wp, bp, wt):
            return dafe_fusion(prev, task, ln_weight=w, ln_bias=b, gate_prev_weight=wp, gate_prev_bias=bp,
                               gate_task_weight=wt, backend=provider)
    run_benchmark(benchmark, _fwd_bwd(fn, leaves))


@pytest.mark.parametrize("provider", BASELINES + kernel_providers("insert_prompts"))
@pytest.mark.parametrize("shape", INSERT_SHAPES, ids=lambda s: "N{}-L{}-M{}-D{}".format(*s))
def test_insert_prompts(benchmark, provider, shape):
    n, length, m, d = shape
    leaves = _leaves(torch.randn(n, length, d), torch.randn(m, d), torch.ones(d), torch.zeros(d))
    start = length - m
    if provider in BASELINES:
        fn = lambda x, p, w, b: insert_eager(x, p, start, w, b)  # noqa: E731
        fn = torch.compile(fn) if provider == "compile" else fn
    else:
        def fn(x, p, w, b):
            return insert_prompts(x, p, start, w, b, backend=provider)
    run_benchmark(benchmark, _fwd_bwd(fn, leaves))
