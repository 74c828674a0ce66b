"""`fastprompt demo`: the three ops at CLIP ViT-B/16 sizes on every backend available here, each checked,
forward and backward, against the reference evaluated in float64 (DESIGN.md's fp32 tolerance), with a
median wall time per forward + backward (informative only), followed by `fastprompt info`.

This is the main job until the training harness (`fastprompt train`) replaces it.
"""

import copy
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from . import backends
from .info import format_report, report
from .modules import CrossModalPromptAttention, DeepAdaptiveFeatureEnhancement
from .ops import insert_prompts
from .train.device import resolve_device
from .testing import check_close


@dataclass
class Case:
    """One op at one shape. `prepare(backend, dtype)` builds the inputs and returns `step`, which runs a
    fixed forward + backward (seeded inputs and upstream gradients) and returns (outputs, gradients)."""

    name: str
    op: str
    shape: str
    prepare: Callable


def _perturb(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Random parameters everywhere (LayerNorm affines and zero-initialised gates included), so that
    every parameter takes part in the check."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * (0.5 / max(1, p.shape[-1]) ** 0.5)
                    + (1.0 if p.dim() == 1 and "weight" in _name_of(module, p) else 0.0))
    return module


def _name_of(module: nn.Module, param: nn.Parameter) -> str:
    return next(n for n, p in module.named_parameters() if p is param)


def _module_case(name: str, op: str, shape: str, module: nn.Module, inputs: list, device: torch.device) -> Case:
    upstream: dict = {}

    def prepare(backend: str, dtype: torch.dtype):
        mod = copy.deepcopy(module).to(device=device, dtype=dtype)
        mod.backend = backend
        xs = [t.to(device=device, dtype=dtype).requires_grad_() for t in inputs]

        def step():
            for t in xs + list(mod.parameters()):
                t.grad = None
            outs = mod(*xs)
            outs = outs if isinstance(outs, tuple) else (outs,)
            if not upstream:
                gen = torch.Generator().manual_seed(1)
                upstream["grads"] = [torch.randn(o.shape, generator=gen).to(device) for o in outs]
            torch.autograd.backward(outs, [g.to(dtype) for g in upstream["grads"]])
            return list(outs), [x.grad for x in xs] + [p.grad for p in mod.parameters()]

        return step

    return Case(name, op, shape, prepare)


def _insert_case(name: str, shape: str, x, prompts, start, mode: str, device: torch.device) -> Case:
    gen = torch.Generator().manual_seed(2)
    d = x.shape[-1]
    ln_w, ln_b = 1 + 0.1 * torch.randn(d, generator=gen), 0.1 * torch.randn(d, generator=gen)
    upstream: dict = {}

    def prepare(backend: str, dtype: torch.dtype):
        leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in (x, prompts, ln_w, ln_b)]
        s = start.to(device) if isinstance(start, torch.Tensor) else start

        def step():
            for t in leaves:
                t.grad = None
            y, y_ln = insert_prompts(leaves[0], leaves[1], s, leaves[2], leaves[3], mode=mode, backend=backend)
            if not upstream:
                g = torch.Generator().manual_seed(3)
                upstream["grads"] = [torch.randn(y.shape, generator=g).to(device) for _ in range(2)]
            torch.autograd.backward([y, y_ln], [u.to(dtype) for u in upstream["grads"]])
            return [y, y_ln], [t.grad for t in leaves]

        return step

    return Case(name, "insert_prompts", shape, prepare)


def build_cases(device: torch.device) -> list[Case]:
    gen = torch.Generator().manual_seed(0)
    m, b, c = 16, 32, 100
    cmpa = _perturb(CrossModalPromptAttention(768, 12, 512, 8, fusing="mean"), gen)
    dafe = _perturb(DeepAdaptiveFeatureEnhancement(768, "channel"), gen)
    text_starts = torch.randint(5, 20, (c,), generator=gen)
    return [
        _module_case("CMPA (DCP, mean pooling)", "cmpa", f"M={m} B={b} C={c} 768/12 heads, 512/8 heads", cmpa,
                     [torch.randn(m, b, 768, generator=gen), torch.randn(m, c, 512, generator=gen)], device),
        _module_case("DAFE (channel gate)", "dafe", f"N={b} M=4 D=768", dafe,
                     [torch.randn(b, 4, 768, generator=gen), torch.randn(4, 768, generator=gen)], device),
        _insert_case("insert + ln_1, vision block", f"N={b} L=197+{m} D=768 replace", torch.randn(b, 197 + m, 768,
                     generator=gen), torch.randn(m, 768, generator=gen), 197, "replace", device),
        _insert_case("insert + ln_1, text block", f"N={c} L=77 D=512 M=4 per-class start", torch.randn(
                     c, 77, 512, generator=gen), torch.randn(4, 512, generator=gen), text_starts, "replace", device),
    ]


def _timed(fn: Callable, device: torch.device, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_demo(device="auto", requested: tuple = (), rounds: int = 5, show_info: bool = True) -> int:
    dev = resolve_device(device)  # auto, cpu, cuda, cuda:N or a torch.device, as --device of train
    print(f"fastprompt demo on {dev}: every available backend against the float64 reference, fp32, "
          f"forward + backward (times: median of {rounds}, informative only)\n")
    failures = 0
    for case in build_cases(dev):
        ref_outs, ref_grads = case.prepare("reference", torch.float64)()
        names = list(requested) or [
            b for b in backends.BACKENDS
            if backends.unavailable_reason(case.op, b, dev) is None and not (b == "triton" and dev.type == "cpu")]
        print(f"{case.name}  [{case.shape}]")
        for name in names:
            reason = backends.unavailable_reason(case.op, name, dev)
            if reason is not None:
                print(f"  {name:<10} skipped: {reason}")
                continue
            step = case.prepare(name, torch.float32)
            outs, grads = step()
            verdicts = [check_close(f"out{i}", o, r) for i, (o, r) in enumerate(zip(outs, ref_outs))]
            verdicts += [check_close(f"grad{i}", g, r) for i, (g, r) in enumerate(zip(grads, ref_grads))]
            ok = all(v.ok for v in verdicts)
            failures += not ok
            worst = max(verdicts, key=lambda v: v.rel).text
            seconds = _timed(step, dev, rounds)
            print(f"  {name:<10} {'PASS' if ok else 'FAIL'}  {seconds * 1e3:8.2f} ms   worst {worst}")
            for verdict in verdicts:
                if not verdict.ok:
                    print(f"             {verdict.text}")
        print()
    if not any(backends.unavailable_reason("cmpa", b, dev) is None for b in ("triton", "cuda")):
        print("Only the reference backend serves this device. The triton and cuda backends need a CUDA GPU "
              "(triton also runs on the CPU under TRITON_INTERPRET=1, for tests: `fastprompt demo --backends "
              "reference triton`).\n")
    if show_info:
        print(format_report(report()))
    print(f"\n{'all checks passed' if not failures else f'{failures} backend check(s) FAILED'}")
    return 1 if failures else 0
