"""Shared benchmark plumbing: providers, CUDA-synchronised timing, and the shape sets.

Providers for each op:
  eager      the reference math as plain differentiable PyTorch (what eager prompt-learning code runs)
  compile    torch.compile of that math
  reference  fastprompt's reference backend (custom ops, fp32 accumulation)
  triton, cuda   fastprompt's kernels, where they can run here
Without a GPU the suites run at small shapes on the CPU, so `pytest benches/ --benchmark-only` works
everywhere; on the CPU only algorithmic savings are meaningful, not kernel speed.
"""

import pytest
import torch

from fastprompt import backends

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE = torch.bfloat16 if ON_GPU else torch.float32


def kernel_providers(op: str) -> list:
    """Every fastprompt backend, skipped with its reason where it cannot run here."""
    out = []
    for name in backends.BACKENDS:
        reason = backends.unavailable_reason(op, name, DEVICE)
        if name == "triton" and DEVICE.type == "cpu":
            reason = reason or "the Triton interpreter is not a fast path"
        marks = [pytest.mark.skip(reason=f"{name}: {reason}")] if reason else []
        out.append(pytest.param(name, marks=marks))
    return out


def synchronised(fn):
    """Time includes the GPU work: synchronise after every call."""
    if DEVICE.type != "cuda":
        return fn

    def run():
        result = fn()
        torch.cuda.synchronize()
        return result

    return run


def run_benchmark(benchmark, fn, rounds=20, warmup=3):
    fn = synchronised(fn)
    for _ in range(warmup):  # compile, autotune and allocator warm-up stay out of the timing
        fn()
    benchmark.pedantic(fn, rounds=rounds, iterations=1)
