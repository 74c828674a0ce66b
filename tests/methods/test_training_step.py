"""A small prompted model that uses all three ops trains along the same loss trajectory on every backend:
20 SGD steps, fp32, the loss of each step within 1e-5 (relative) of the reference backend's."""

import pytest
import torch
from torch import nn

import fastprompt

from ..helpers import require_backend


class TinyPromptedModel(nn.Module):
    """Two token streams (vision-like and text-like) with learnable prompts: insertion fused with a block
    LayerNorm, CMPA coupling the prompt rows, DAFE blending them with fresh prompts, a second insertion
    (per-sequence offsets on the text side), and a contrastive head."""

    def __init__(self, dv=24, dt=40, m=2, n_classes=4, backend="auto"):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.m = m
        self.prompts_v = nn.Parameter(0.5 * torch.randn(m, dv, generator=g))
        self.prompts_t = nn.Parameter(0.5 * torch.randn(m, dt, generator=g))
        self.fresh_v = nn.Parameter(0.5 * torch.randn(m, dv, generator=g))
        self.fresh_t = nn.Parameter(0.5 * torch.randn(n_classes, m, dt, generator=g))
        self.ln_v = nn.LayerNorm(dv)
        self.ln_t = nn.LayerNorm(dt)
        self.cmpa = fastprompt.CrossModalPromptAttention(dv, 3, dt, 5, fusing="mean", backend=backend)
        self.dafe_v = fastprompt.DeepAdaptiveFeatureEnhancement(dv, "channel", backend=backend)
        self.dafe_t = fastprompt.DeepAdaptiveFeatureEnhancement(dt, "token", backend=backend)
        with torch.no_grad():  # leave the zero-initialised gates so that they matter from step 1
            for p in list(self.dafe_v.parameters()) + list(self.dafe_t.parameters()):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        self.head_v = nn.Linear(dv, 16, bias=False)
        self.head_t = nn.Linear(dt, 16, bias=False)
        self.backend = backend

    def forward(self, xv, xt, text_starts):
        b, lv, _ = xv.shape
        kw = dict(backend=self.backend)
        yv, yv_ln = fastprompt.insert_prompts(xv, self.prompts_v, lv - self.m, self.ln_v.weight, self.ln_v.bias, **kw)
        yt, yt_ln = fastprompt.insert_prompts(xt, self.prompts_t, text_starts, self.ln_t.weight, self.ln_t.bias, **kw)
        rows_t = torch.stack([yt_ln[c, s:s + self.m] for c, s in enumerate(text_starts.tolist())])
        new_v, new_t = self.cmpa(yv_ln[:, -self.m:].transpose(0, 1), rows_t.transpose(0, 1))
        fused_v = self.dafe_v(new_v.transpose(0, 1), self.fresh_v)
        fused_t = self.dafe_t(new_t.transpose(0, 1), self.fresh_t)
        _, zv = fastprompt.insert_prompts(yv, fused_v, lv - self.m, self.ln_v.weight, self.ln_v.bias, **kw)
        _, zt = fastprompt.insert_prompts(yt, fused_t, text_starts, self.ln_t.weight, self.ln_t.bias, **kw)
        fv = nn.functional.normalize(self.head_v(zv.mean(1)), dim=-1)
        ft = nn.functional.normalize(self.head_t(zt.mean(1)), dim=-1)
        return 10.0 * fv @ ft.t()


def _trajectory(backend: str, steps: int = 20) -> list[float]:
    torch.manual_seed(0)
    model = TinyPromptedModel(backend=backend)
    g = torch.Generator().manual_seed(1)
    xv, xt = torch.randn(3, 6, 24, generator=g), torch.randn(4, 7, 40, generator=g)
    starts = torch.tensor([1, 3, 2, 5])
    labels = torch.tensor([0, 3, 1])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xv, xt, starts), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("backend", [b for b in fastprompt.backends.BACKENDS if b != "reference"])
def test_same_loss_trajectory_as_the_reference(backend):
    require_backend("cmpa", backend, "cpu")
    reference = _trajectory("reference")
    assert reference[-1] < 0.5 * reference[0], "the model does not train: the comparison would be vacuous"
    other = _trajectory(backend)
    for step, (a, b) in enumerate(zip(other, reference)):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: {backend} loss {a!r}, reference {b!r}"
