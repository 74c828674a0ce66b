"""What the op tests share: the backend × device × dtype matrix, and float64 copies of leaves."""

import pytest
import torch

from fastprompt import _extension, backends

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
BACKENDS = list(backends.BACKENDS)
LOW_PRECISION = [torch.float16, torch.bfloat16]
# FASTPROMPT_CUDA_EMULATE=1 (read at import): the cuda backend is the CPU emulator of tests/cuda_emulator/
CUDA_EMULATED = _extension.emulated()
# for the cases that need the cuda backend to be unavailable on CPU tensors
NOT_EMULATED = pytest.mark.skipif(CUDA_EMULATED, reason="FASTPROMPT_CUDA_EMULATE=1 runs the cuda backend on the CPU")


def require_backend(op: str, backend: str, device: str, dtype: torch.dtype = torch.float32) -> torch.device:
    """Skip (with the backend's own reason) what cannot run here: a GPU-only backend or device on a
    machine without one, a backend not built, or bf16 under the Triton interpreter (which mishandles it).
    The cuda backend under the emulator runs on CPU tensors in every dtype (its fp16 / bf16 are exact software
    conversions); there a failed emulated build fails the test instead of skipping it."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    dev = torch.device(device)
    reason = backends.unavailable_reason(op, backend, dev)
    if reason is not None:
        if backend == "cuda" and CUDA_EMULATED and dev.type == "cpu":
            pytest.fail(f"FASTPROMPT_CUDA_EMULATE=1 but the emulated cuda backend is unavailable: {reason}")
        pytest.skip(f"{backend} backend unavailable: {reason}")
    if backend == "triton" and dev.type == "cpu" and dtype != torch.float32:
        pytest.skip("the Triton interpreter is tested in fp32 only (it mishandles bf16); low precision runs on a GPU")
    return dev


def leaf(t: torch.Tensor, dtype=None, device=None) -> torch.Tensor:
    """A fresh leaf copy that requires grad."""
    return t.detach().to(dtype=dtype or t.dtype, device=device or t.device).clone().requires_grad_()


def as_float64(tensors):
    return [leaf(t, torch.float64) for t in tensors]


def grads_of(outputs, inputs, upstream):
    """d(Σ outputs·upstream)/d inputs, with None for inputs the outputs do not reach."""
    return torch.autograd.grad(outputs, inputs, upstream, allow_unused=True)


def random_like_list(tensors, generator=None):
    return [torch.randn(t.shape, dtype=t.dtype, device=t.device, generator=generator) for t in tensors]


class TritonLaunchCounter:
    """Records Triton kernel launches (kernel names, and grids) while active, by wrapping the `run` method of
    the kernels' class (the interpreter's on a CPU machine, the JIT's on a GPU): independent of what the
    launchers themselves report. With run_kernels=False the launches are only recorded, not made (outputs
    stay garbage): for what a launch asks of the GPU at sizes too large to run here."""

    def __init__(self, any_kernel, run_kernels: bool = True):
        self.cls = type(any_kernel)
        self.run_kernels = run_kernels
        self.names: list[str] = []
        self.grids: list[tuple] = []

    def __enter__(self):
        self.original = self.cls.run
        counter = self

        def run(kernel, *args, grid, **kwargs):
            counter.names.append(getattr(getattr(kernel, "fn", None), "__name__", repr(kernel)))
            counter.grids.append(tuple(grid(kwargs) if callable(grid) else grid))
            if counter.run_kernels:
                return counter.original(kernel, *args, grid=grid, **kwargs)
            return None

        self.cls.run = run
        return self

    def __exit__(self, *exc):
        self.cls.run = self.original
        return False
