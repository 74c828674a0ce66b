"""Forward + backward of each op at the shapes of real runs (ViT-B/16 widths): eager PyTorch,
torch.compile of the reference math, CUDA-graph replay of it, and every fastprompt backend that runs
here. `pytest benches/ --benchmark-only`; the medians are in pytest-benchmark's table."""

import itertools

import pytest
import torch

from fastprompt import insert_prompts
from fastprompt.modules import CrossModalPromptAttention, DeepAdaptiveFeatureEnhancement
from fastprompt.ops import cross_modal_prompt_attention, dafe_fusion
from fastprompt.reference.cmpa import cmpa_eager
from fastprompt.reference.dafe import dafe_eager
from fastprompt.reference.insert_prompts import insert_eager

from .conftest import DEVICE, DTYPE, ON_GPU, make_step, providers, run_benchmark

# CMPA: M prompts, B images, C classes at ViT-B/16 widths (768 / 12 heads, 512 / 8 heads)
CMPA_SHAPES = list(itertools.product([2, 4, 16], [4, 32], [1, 100, 1000])) if ON_GPU else [(4, 4, 10)]
CMPA_WIDTHS = (768, 12, 512, 8) if ON_GPU else (96, 4, 64, 4)
# DAFE and insertion: the vision tower (B = 32, L = 197 + M, D = 768) and the text tower (C = 1000, L = 77, D = 512)
DAFE_SHAPES = [(32, 16, 768), (1000, 4, 512)] if ON_GPU else [(8, 4, 96)]
INSERT_SHAPES = [(32, 197 + 16, 16, 768), (1000, 77, 4, 512)] if ON_GPU else [(8, 50, 4, 96)]


def _leaves(*tensors):
    return [t.detach().to(DEVICE, DTYPE).requires_grad_() for t in tensors]


@pytest.mark.parametrize("provider", providers("cmpa"))
@pytest.mark.parametrize("shape", CMPA_SHAPES, ids=lambda s: "M{}-B{}-C{}".format(*s))
def test_cmpa(benchmark, provider, shape):
    m, b, c = shape
    dv, hv, dt, ht = CMPA_WIDTHS
    module = CrossModalPromptAttention(dv, hv, dt, ht).to(DEVICE, DTYPE)
    leaves = _leaves(torch.randn(m, b, dv), torch.randn(m, c, dt)) \
        + list(module.side_params("visual")) + list(module.side_params("text"))

    def eager(v, t, *p):
        return cmpa_eager(v, t, p[:14], p[14:], hv, ht, "mean")

    def kernel(backend):
        return lambda v, t, *p: cross_modal_prompt_attention(v, t, p[:14], p[14:], n_head_visual=hv,
                                                             n_head_text=ht, backend=backend)

    run_benchmark(benchmark, make_step(provider, eager, kernel, leaves))


@pytest.mark.parametrize("provider", providers("dafe"))
@pytest.mark.parametrize("shape", DAFE_SHAPES, ids=lambda s: "N{}-M{}-D{}".format(*s))
def test_dafe(benchmark, provider, shape):
    n, m, d = shape
    module = DeepAdaptiveFeatureEnhancement(d).to(DEVICE, DTYPE)
    leaves = _leaves(torch.randn(n, m, d), torch.randn(m, d)) + list(module.parameters())

    def eager(prev, task, *p):
        return dafe_eager(prev, task, list(p), "channel")

    def kernel(backend):
        return lambda prev, task, w, b, wp, bp, wt: dafe_fusion(
            prev, task, ln_weight=w, ln_bias=b, gate_prev_weight=wp, gate_prev_bias=bp, gate_task_weight=wt,
            backend=backend)

    run_benchmark(benchmark, make_step(provider, eager, kernel, leaves))


@pytest.mark.parametrize("provider", providers("insert_prompts"))
@pytest.mark.parametrize("shape", INSERT_SHAPES, ids=lambda s: "N{}-L{}-M{}-D{}".format(*s))
def test_insert_prompts(benchmark, provider, shape):
    n, length, m, d = shape
    leaves = _leaves(torch.randn(n, length, d), torch.randn(m, d), torch.ones(d), torch.zeros(d))
    start = length - m if length > 100 else 1  # vision: the rows after the patches; text: after SOS

    def eager(x, p, w, b):
        return insert_eager(x, p, start, w, b)

    def kernel(backend):
        return lambda x, p, w, b: insert_prompts(x, p, start, w, b, backend=backend)

    run_benchmark(benchmark, make_step(provider, eager, kernel, leaves))
