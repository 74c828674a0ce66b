"""Every Triton launch keeps its grid within CUDA's limits however many sequences, images or classes there are.

A grid's first axis may hold 2³¹ − 1 programs, its second and third only 65535: a launch past that fails on a
GPU, but the interpreter (where CI runs the kernels) has no such limit, so the op tests cannot see it. B·C text
sequences reach it in real runs (CoCoOp / TMML at ImageNet scale: 128 images × 1000 classes). Here the launches
are recorded and skipped (no kernel runs, outputs stay garbage), at 70 000 sequences, images and classes."""

import pytest
import torch

import fastprompt
from fastprompt import backends

from .helpers import require_backend

MANY = 70_000  # past 65535
FIRST_AXIS_LIMIT, OTHER_AXES_LIMIT = 2 ** 31 - 1, 65535


class SkippedLaunches:
    """Records the grid of every Triton launch while active and skips the launch itself, by wrapping the `run`
    method of the kernels' class (the interpreter's on a CPU machine, the JIT's on a GPU)."""

    def __init__(self):
        backends.load_error("triton")
        from fastprompt.kernels import insert

        self.cls = type(insert._insert_fwd_kernel)
        self.grids: list[tuple[str, tuple]] = []

    def __enter__(self):
        self.original = self.cls.run
        recorder = self

        def run(kernel, *args, grid, **kwargs):
            grid = grid(kwargs) if callable(grid) else grid
            recorder.grids.append((kernel.fn.__name__ if hasattr(kernel, "fn") else repr(kernel), tuple(grid)))

        self.cls.run = run
        return self

    def __exit__(self, *exc):
        self.cls.run = self.original
        return False

    def assert_within_limits(self):
        assert self.grids, "no launch was recorded"
        for name, grid in self.grids:
            assert 1 <= len(grid) <= 3 and all(g >= 1 for g in grid), (name, grid)
            assert grid[0] <= FIRST_AXIS_LIMIT and all(g <= OTHER_AXES_LIMIT for g in grid[1:]), (name, grid)


def _backward(*outputs):
    torch.autograd.backward([o for o in outputs if o is not None and o.requires_grad],
                            [torch.ones_like(o) for o in outputs if o is not None and o.requires_grad])


@pytest.mark.parametrize("per_sequence", [False, True], ids=["int-start", "per-sequence-start"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-sample"])
@pytest.mark.parametrize("mode", ["replace", "insert"])
def test_insert_prompts_grids(mode, shared, per_sequence):
    require_backend("insert_prompts", "triton", "cpu")
    n, length, m, d = MANY, 3, 1, 8
    x = torch.randn(n, length, d, requires_grad=True)
    prompts = torch.randn(*(() if shared else (n,)), m, d, requires_grad=True)
    start = torch.zeros(n, dtype=torch.int64) if per_sequence else 0
    w, b = torch.ones(d, requires_grad=True), torch.zeros(d, requires_grad=True)
    with SkippedLaunches() as launches:
        _backward(*fastprompt.insert_prompts(x, prompts, start, w, b, mode=mode, backend="triton",
                                             check_start=False))
    launches.assert_within_limits()


def test_packed_insert_prompts_grids():
    require_backend("insert_prompts_packed", "triton", "cpu")
    lengths = torch.full((MANY,), 3)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    x = torch.randn(int(cu[-1]), 8, requires_grad=True)
    prompts = torch.randn(1, 8, requires_grad=True)
    with SkippedLaunches() as launches:
        _backward(*fastprompt.insert_prompts(x, prompts, 1, torch.ones(8), torch.zeros(8), cu_seqlens=cu,
                                             backend="triton", check_start=False))
    launches.assert_within_limits()


@pytest.mark.parametrize("gate", ["channel", "token", "scalar"])
def test_dafe_grids(gate):
    require_backend("dafe", "triton", "cpu")
    dafe = fastprompt.DeepAdaptiveFeatureEnhancement(16, gate=gate, backend="triton")
    with SkippedLaunches() as launches:
        _backward(dafe(torch.randn(MANY, 2, 16, requires_grad=True), torch.randn(2, 16, requires_grad=True)))
    launches.assert_within_limits()


def test_cmpa_grids():
    require_backend("cmpa", "triton", "cpu")
    cmpa = fastprompt.CrossModalPromptAttention(32, 2, 16, 2, backend="triton")
    with SkippedLaunches() as launches:
        _backward(*cmpa(torch.randn(2, MANY, 32, requires_grad=True), torch.randn(2, MANY, 16, requires_grad=True)))
    launches.assert_within_limits()
