"""Backend selection: per call, per module, by context manager, by set_backend and by the environment;
a backend that cannot serve the inputs says why; auto picks the reference on the CPU."""

import os
import subprocess
import sys

import pytest
import torch

import fastprompt
from fastprompt import backends

from ..helpers import NOT_EMULATED
from .test_cmpa import make_module


@pytest.fixture(autouse=True)
def _reset_global_choice():
    yield
    fastprompt.set_backend(None)


def _inputs():
    return torch.randn(3, 2, 24), torch.randn(3, 4, 40)


def test_auto_picks_the_reference_on_cpu_tensors():
    impl = backends.select("cmpa", "auto", torch.device("cpu"), {})
    assert impl.backend == "reference"


@NOT_EMULATED  # these use the cuda backend as the one that cannot serve CPU tensors
def test_cuda_cannot_serve_cpu_tensors_and_says_why():
    module = make_module(24, 3, 40, 5, backend="cuda")
    with pytest.raises(fastprompt.BackendUnavailableError, match="backend 'cuda' cannot run cmpa here: ") as err:
        module(*_inputs())
    message = str(err.value)
    assert "not built" in message or "CUDA tensors" in message or "built for" in message


def test_triton_cannot_serve_cpu_tensors_without_the_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import torch, fastprompt\n"
            "try:\n    fastprompt.insert_prompts(torch.randn(2, 5, 8), torch.randn(2, 8), 1, backend='triton')\n"
            "except fastprompt.BackendUnavailableError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "backend 'triton' cannot run insert_prompts here" in out.stdout
    assert "TRITON_INTERPRET=1" in out.stdout


@NOT_EMULATED
def test_context_manager_applies_inside_the_block_only():
    module = make_module(24, 3, 40, 5)
    with fastprompt.backend("cuda"):
        assert backends.current_backend() == "cuda"
        with pytest.raises(fastprompt.BackendUnavailableError):
            module(*_inputs())
        with fastprompt.backend("reference"):  # the innermost block wins
            module(*_inputs())
    assert backends.current_backend() == backends._env_choice
    module(*_inputs())


@NOT_EMULATED
def test_module_and_call_arguments_beat_the_context_manager():
    module = make_module(24, 3, 40, 5, backend="reference")
    with fastprompt.backend("cuda"):
        module(*_inputs())  # the module pins reference
        x, p = torch.randn(2, 5, 8), torch.randn(2, 8)
        fastprompt.insert_prompts(x, p, 1, backend="reference")  # the call pins reference
        with pytest.raises(fastprompt.BackendUnavailableError):
            fastprompt.insert_prompts(x, p, 1)  # "auto" defers to the context


@NOT_EMULATED
def test_set_backend_is_process_wide_and_resets_to_the_environment():
    module = make_module(24, 3, 40, 5)
    fastprompt.set_backend("cuda")
    assert backends.current_backend() == "cuda"
    with pytest.raises(fastprompt.BackendUnavailableError):
        module(*_inputs())
    with fastprompt.backend("auto"):  # a block can hand the choice back to auto
        module(*_inputs())
    fastprompt.set_backend(None)
    module(*_inputs())


def test_unknown_backend_names_are_rejected():
    with pytest.raises(ValueError, match="must be one of"):
        fastprompt.set_backend("fast")
    with pytest.raises(ValueError, match="must be one of"):
        with fastprompt.backend("gpu"):
            pass
    with pytest.raises(ValueError, match="must be one of"):
        fastprompt.insert_prompts(torch.randn(1, 3, 4), torch.randn(1, 4), 0, backend="Reference")


def _python(code: str, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


@NOT_EMULATED
def test_environment_variable_selects_the_backend():
    code = ("import torch, fastprompt\n"
            "x, p = torch.randn(2, 5, 8), torch.randn(2, 8)\n"
            "try:\n    fastprompt.insert_prompts(x, p, 1)\nexcept fastprompt.BackendUnavailableError as e:\n"
            "    print('refused:', e)\nelse:\n    print('ran')\n")
    assert "refused: fastprompt: backend 'cuda'" in _python(code, FASTPROMPT_BACKEND="cuda").stdout
    assert _python(code, FASTPROMPT_BACKEND="reference").stdout.strip() == "ran"
    bad = _python("import fastprompt", FASTPROMPT_BACKEND="turbo")
    assert bad.returncode != 0 and "FASTPROMPT_BACKEND='turbo' is not one of" in bad.stderr


@NOT_EMULATED
def test_available_backends_lists_what_runs_here():
    cpu = fastprompt.available_backends(device="cpu")
    assert "reference" in cpu and "cuda" not in cpu
    assert fastprompt.available_backends("cmpa", "cpu")[0] == "reference"


def test_every_op_has_a_reference_implementation_registered_as_a_custom_op():
    for op in backends.OPS:
        impl = backends.implementation(op, "reference")
        assert impl.forward.name() == f"fastprompt::{op}_fwd_reference"
        assert impl.backward.name() == f"fastprompt::{op}_bwd_reference"
        assert impl.forward is getattr(torch.ops.fastprompt, f"{op}_fwd_reference").default


def test_the_package_works_without_the_extension():
    reason = backends.load_error("cuda")
    if reason is None:
        pytest.skip("the extension is built here")
    assert "fastprompt._C" in reason
    assert backends.unavailable_reason("cmpa", "cuda", torch.device("cpu")) == reason


@pytest.mark.slow  # a fresh interpreter and a first torch.compile: 10 to 20 s on 2 cores
def test_a_compiled_call_needs_no_eager_call_before_it():
    """The reference implementations load with fastprompt.ops: torch.compile(fullgraph=True) traces the dispatch,
    which could not import them while tracing."""
    code = ("import torch, fastprompt\n"
            "m = fastprompt.DeepAdaptiveFeatureEnhancement(24)\n"
            "out = torch.compile(m, fullgraph=True)(torch.randn(2, 3, 24), torch.randn(3, 24))\n"
            "print(tuple(out.shape))\n")
    run = _python(code)
    assert run.returncode == 0 and run.stdout.strip() == "(2, 3, 24)", run.stderr[-3000:]


@pytest.mark.slow  # a fresh interpreter and a first torch.compile
def test_a_compiled_op_needs_no_eager_call_of_that_op_on_its_backend():
    """A backend implements every op when it loads: after an eager Triton call of one op, a compiled function
    that calls another op on Triton traces (it could not import that op's kernels module while tracing)."""
    code = ("import torch, fastprompt\n"
            "from fastprompt import ops\n"
            "ops.dafe_fusion(torch.randn(2, 2, 24), torch.randn(2, 24), gate='scalar', alpha=torch.tensor(0.3),\n"
            "                backend='triton')\n"
            "w, b = torch.ones(24), torch.zeros(24)\n"
            "f = lambda x, p: ops.insert_prompts(x, p, 1, w, b, backend='triton')[1]\n"
            "out = torch.compile(f, fullgraph=True, backend='eager')(torch.randn(2, 6, 24), torch.randn(2, 24))\n"
            "print(tuple(out.shape))\n")
    run = _python(code, TRITON_INTERPRET="1")
    assert run.returncode == 0 and run.stdout.strip() == "(2, 6, 24)", run.stderr[-3000:]
