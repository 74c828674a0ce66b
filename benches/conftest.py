"""Shared benchmark plumbing: providers, CUDA-synchronised timing, and CUDA-graph capture.

Providers for each op:
  eager      the reference math as plain differentiable PyTorch (what eager prompt-learning code runs)
  compile    torch.compile of that math
  cudagraph  that math, forward and backward, captured once in a CUDA graph and replayed (GPU only)
  reference, triton, cuda   fastprompt's backends, where they can run here
Every provider runs forward + backward. Without a GPU the suites run at small shapes on the CPU, so
`pytest benches/ --benchmark-only` works everywhere; on a CPU only algorithmic savings mean anything.
"""

import pytest
import torch

from fastprompt import backends

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
BASELINES = ["eager", "compile"] + (["cudagraph"] if ON_GPU else [])


def providers(op: str) -> list:
    """The baselines, then every fastprompt backend, skipped with its reason where it cannot run here."""
    out = list(BASELINES)
    for name in backends.BACKENDS:
        reason = backends.unavailable_reason(op, name, DEVICE)
        if name == "triton" and DEVICE.type == "cpu":
            reason = reason or "the Triton interpreter is not a fast path"
        marks = [pytest.mark.skip(reason=f"{name}: {reason}")] if reason else []
        out.append(pytest.param(name, marks=marks))
    return out


def fwd_bwd(fn, leaves):
    """One forward + backward of fn(*leaves), every output receiving a gradient of ones."""
    def step():
        outs = fn(*leaves)
        outs = [o for o in (outs if isinstance(outs, tuple) else (outs,)) if o is not None]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return step


def graphed(step):
    """Capture step (forward + backward on static tensors) in a CUDA graph; return its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up on a side stream, as capture requires
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def make_step(provider: str, eager_fn, kernel_fn, leaves):
    """The timed callable of a provider: eager_fn is the reference math, kernel_fn(backend) the fastprompt op."""
    if provider == "eager":
        return fwd_bwd(eager_fn, leaves)
    if provider == "compile":
        return fwd_bwd(torch.compile(eager_fn), leaves)
    if provider == "cudagraph":
        return graphed(fwd_bwd(eager_fn, leaves))
    return fwd_bwd(kernel_fn(provider), leaves)


def run_benchmark(benchmark, step, rounds=50, warmup=5):
    """Median of `rounds` synchronised calls after `warmup` (compilation, autotuning, allocator warm-up)."""
    def timed():
        step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
    for _ in range(warmup):
        timed()
    benchmark.pedantic(timed, rounds=rounds if ON_GPU else 10, iterations=1)
