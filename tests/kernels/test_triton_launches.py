"""What the interpreter cannot check about the Triton launches, checked without running them.

Grids: a grid's first axis may hold 2³¹ − 1 programs, its second and third only 65535; a launch past that fails
on a GPU, but the interpreter (where CI runs the kernels) has no such limit, so the op tests cannot see it. B·C
text sequences reach it in real runs (CoCoOp / TMML at ImageNet scale: 128 images × 1000 classes). Here the
launches are recorded and skipped (no kernel runs, outputs stay garbage), at 70 000 sequences, images and classes.

Devices: Triton launches on the current CUDA device, whatever device the tensors are on; every launcher runs
with its inputs' device made current (kernels/_common.py `on_the_inputs_device`)."""

import pytest
import torch

import fastprompt
from fastprompt import backends
from fastprompt.ops import cross_modal_prompt_attention

from ..helpers import TritonLaunchCounter, require_backend

MANY = 70_000  # past 65535
FIRST_AXIS_LIMIT, OTHER_AXES_LIMIT = 2 ** 31 - 1, 65535


class SkippedLaunches(TritonLaunchCounter):
    """Every Triton launch recorded, none made."""

    def __init__(self):
        backends.implementation("insert_prompts", "triton")
        from fastprompt.kernels import insert_prompts

        super().__init__(insert_prompts._insert_fwd_kernel, run_kernels=False)

    def assert_within_limits(self):
        assert self.grids, "no launch was recorded"
        for name, grid in zip(self.names, self.grids):
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


# ---- devices ---------------------------------------------------------------------------------------------

class _OnCuda1(torch.Tensor):
    """A CPU tensor that says it lives on cuda:1 (what the guard reads), for a machine without two GPUs."""

    @property
    def device(self):
        return torch.device("cuda", 1)


def test_launchers_make_their_inputs_device_current(monkeypatch):
    backends.load_error("triton")
    from fastprompt.kernels import _common

    entered = []

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("exit")
            return False

    monkeypatch.setattr(torch.cuda, "device", Recorder)
    launcher = _common.on_the_inputs_device(lambda grad, x, params: (grad, x, params))
    x = torch.Tensor._make_subclass(_OnCuda1, torch.zeros(1))
    assert launcher(None, x, [x])[1] is x  # an Optional first argument: the first tensor decides
    assert entered == [torch.device("cuda", 1), "exit"]
    entered.clear()
    launcher(None, torch.zeros(1), [])  # CPU tensors (the interpreter): no guard
    assert entered == []


@pytest.mark.parametrize("op", backends.OPS)
def test_every_triton_op_has_the_guard(op):
    """Every raw Triton op runs its launcher under on_the_inputs_device (the triton backend's `implement` of
    kernels/_common.py wraps both launchers it is given)."""
    require_backend(op, "triton", "cpu")
    impl = backends.implementation(op, "triton")
    assert impl.functions is not None and len(impl.functions) == 2
    assert all(getattr(f, "runs_on_the_inputs_device", False) for f in impl.functions), impl.functions


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_ops_on_cuda_1_while_cuda_0_is_current():
    """On cuda:1 while cuda:0 is current, forward and backward of each op on the Triton backend agree with the
    reference on the same device. What is checked is the device (without the guard the launch fails or reads
    another GPU's memory), so fp32 agreement to 1e-4 suffices; the precision tests are the ops' own."""
    require_backend("cmpa", "triton", "cuda")
    assert torch.cuda.current_device() == 0
    dev = torch.device("cuda", 1)
    torch.manual_seed(0)
    cmpa = fastprompt.CrossModalPromptAttention(64, 4, 32, 2).to(dev)
    dafe = fastprompt.DeepAdaptiveFeatureEnhancement(64).to(dev)
    for p in dafe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    inputs = [torch.randn(3, 5, 64, device=dev), torch.randn(3, 7, 32, device=dev),  # CMPA
              torch.randn(4, 9, 64, device=dev), torch.randn(2, 64, device=dev),  # insertion
              torch.randn(4, 2, 64, device=dev), torch.randn(2, 64, device=dev)]  # DAFE

    def run(backend):
        v, t, x, prompts, prev, task = leaves = [a.clone().requires_grad_() for a in inputs]
        new_v, new_t = cross_modal_prompt_attention(v, t, list(cmpa.side_params("visual")),
                                                    list(cmpa.side_params("text")), n_head_visual=4,
                                                    n_head_text=2, backend=backend)
        y, y_ln = fastprompt.insert_prompts(x, prompts, 1, torch.ones(64, device=dev), torch.zeros(64, device=dev),
                                            backend=backend)
        dafe.backend = backend
        fused = dafe(prev, task)
        outs = [new_v, new_t, y, y_ln, fused]
        grads = torch.autograd.grad([o.square().sum() for o in outs], leaves)
        torch.cuda.synchronize(dev)
        return outs + list(grads)

    for got, ref in zip(run("triton"), run("reference")):
        assert got.device == dev
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
