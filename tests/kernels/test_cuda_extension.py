"""The CUDA C++ extension on a machine without a GPU: it builds and loads, its raw ops are registered with the
declared schemas and fakes, the C++ input checks say what is wrong, and CPU tensors get a clear error.

CI builds fastprompt._C (sm_90, `make ext`) before the tests and sets FASTPROMPT_EXPECT_CUDA_EXTENSION=1, so
there a missing or broken build fails here instead of skipping. Whether the kernels compute the right numbers
is the GPU half: the op tests' `cuda` backend cases (tests/ops/test_cmpa.py, test_dafe.py, test_insert_prompts.py) on a device.
"""

import importlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastprompt
from fastprompt import _extension, backends, info
from fastprompt.declaration import find

from ..ops.test_cmpa import make_module

RAW_OPS = [f"{op}_{stage}" for op in backends.OPS for stage in ("fwd", "bwd")]

# Under FASTPROMPT_CUDA_EMULATE=1 the process holds the emulator's build of the ops (tests/cuda_emulator/), never
# fastprompt._C: what this file checks is the real extension's loading, build info and CPU-tensor refusals.
pytestmark = pytest.mark.skipif(_extension.emulated(), reason="FASTPROMPT_CUDA_EMULATE=1: the cuda ops are the "
                                "CPU emulator's, not fastprompt._C (tests/kernels/test_cuda_emulator.py tests those)")


@pytest.fixture(scope="module")
def extension():
    reason = backends.load_error("cuda")
    if reason is not None:
        if os.environ.get("FASTPROMPT_EXPECT_CUDA_EXTENSION") == "1":
            pytest.fail(f"FASTPROMPT_EXPECT_CUDA_EXTENSION=1 but the cuda backend did not load: {reason}")
        pytest.skip(f"fastprompt._C is not available: {reason}")
    return torch.ops.fastprompt


def test_extension_loads_and_reports_its_build(extension):
    built = _extension.build_info()
    assert _extension._major_minor(built["torch"]) == _extension._major_minor(torch.__version__)
    assert built["cuda"].split(".")[0] == torch.version.cuda.split(".")[0]
    assert "loaded, built for torch" in info.format_report(info.report())
    # the same versions can be read from the file, without loading it (what a build for another torch needs)
    module = sys.modules.get("fastprompt._C")  # the JIT path loads its library with torch.ops.load_library
    library = module.__file__ if module else next(p for p in torch.ops.loaded_libraries if "fastprompt_C_jit" in p)
    assert _extension._file_build_info(library) == built


@pytest.mark.parametrize("raw", RAW_OPS)
def test_raw_op_has_the_declared_schema_as_the_triton_op_does(extension, raw):
    """The library's schema is the declaration's (tests/ops/test_op_declarations.py checks the same of the source,
    without a build), argument for argument as the Triton op's, so one autograd Function drives both."""
    pytest.importorskip("triton")
    op, stage = raw.rsplit("_", 1)
    assert backends.implementation(op, "triton") is not None  # defines the Triton ops
    cuda = getattr(extension, f"{raw}_cuda").default._schema
    triton = getattr(extension, f"{raw}_triton").default._schema
    assert str(cuda) == str(torch._C.parse_schema(find(op).schema(stage, "cuda")))
    assert [(a.name, str(a.real_type)) for a in cuda.arguments] == [(a.name, str(a.real_type)) for a in triton.arguments]
    assert [str(r.real_type) for r in cuda.returns] == [str(r.real_type) for r in triton.returns]


@pytest.mark.parametrize("op", backends.OPS)
def test_cuda_backend_is_registered_for_cuda_tensors(extension, op):
    impl = backends.implementation(op, "cuda")
    assert impl.forward is getattr(extension, f"{op}_fwd_cuda").default
    assert backends.unavailable_reason(op, "cuda", torch.device("cuda")) is None


def test_launch_counter_is_exposed(extension):
    from fastprompt.ops import cuda as cuda_backend

    assert cuda_backend.launches() >= 0


# ---- fakes: torch.compile traces the cuda ops without running them ------------------------------------------

def test_fake_shapes_of_the_cmpa_ops(extension):
    module = make_module(24, 3, 40, 5, "max")
    vp_real = [p.detach() for p in module.side_params("visual")]
    tp_real = [p.detach() for p in module.side_params("text")]
    with FakeTensorMode() as mode:
        visual = torch.empty(3, 4, 24, device="cuda")
        text = torch.empty(3, 6, 40, device="cuda")
        vp = [mode.from_tensor(p).to("cuda") for p in vp_real]
        tp = [mode.from_tensor(p).to("cuda") for p in tp_real]
        out_v, out_t, saved = extension.cmpa_fwd_cuda(visual, text, vp, tp, 3, 5, "max", 1e-5, True)
        assert out_v.shape == (3, 24) and out_t.shape == (3, 40) and out_v.device.type == "cuda"
        assert [s.dtype for s in saved] == [torch.float32, torch.float32, torch.int32, torch.int32]
        dv, dt, gv, gt = extension.cmpa_bwd_cuda(torch.empty(3, 4, 24, device="cuda"), None, visual, text, vp, tp,
                                                 saved, 3, 5, "max", 1e-5, False)
        assert dv.shape == visual.shape and dt.shape == text.shape
        assert [g.shape for g in gv] == [p.shape for p in vp] and all(g.numel() == 0 for g in gt)


# ---- CPU tensors and bad input: the C++ checks run before anything touches CUDA ------------------------------

def test_the_api_refuses_cpu_tensors_for_the_cuda_backend(extension):
    module = make_module(24, 3, 40, 5, backend="cuda")
    with pytest.raises(fastprompt.BackendUnavailableError, match="the cuda backend needs CUDA tensors"):
        module(torch.randn(3, 2, 24), torch.randn(3, 4, 40))


def _cmpa_args(dv=24, hv=3, dt=40, ht=5, m=3, dtype=torch.float32):
    module = make_module(dv, hv, dt, ht)
    vp = [p.detach().to(dtype) for p in module.side_params("visual")]
    tp = [p.detach().to(dtype) for p in module.side_params("text")]
    return [torch.randn(m, 2, dv, dtype=dtype), torch.randn(m, 4, dt, dtype=dtype), vp, tp, hv, ht, "mean", 1e-5,
            True]


def _with(args, index, value):
    args = list(args)
    args[index] = value
    return args


def _with_param(args, side, index, value):
    args = list(args)
    params = list(args[side])
    params[index] = value
    args[side] = params
    return args


def _cmpa_cases():
    good = _cmpa_args()
    return [
        ("valid, but on the CPU", good, "the cuda backend takes CUDA tensors"),
        ("2-D visual", _with(good, 0, torch.randn(3, 24)), "must be 3-D"),
        ("different M", _with(good, 1, torch.randn(5, 4, 40)), "must share M"),
        ("mixed dtypes", _with(good, 1, torch.randn(3, 4, 40, dtype=torch.float16)), "mixed dtypes"),
        ("float64", _cmpa_args(dtype=torch.float64), "float32, float16 and bfloat16"),
        ("empty rows", _with(good, 0, torch.randn(3, 0, 24)), "is empty"),
        ("13 parameters", _with(good, 2, good[2][:13]), "14 parameters"),
        ("wrong proj width", _with_param(good, 2, 0, torch.randn(24, 41)), r"proj_weight must have shape \[24, 40\]"),
        ("wrong MLP bias", _with_param(good, 3, 11, torch.randn(7)), r"fc_bias must have shape \[160\]"),
        ("param dtype", _with_param(good, 2, 1, torch.randn(24, dtype=torch.float64)), "proj_bias .*mixed dtypes"),
        ("heads", _with(good, 4, 5), "not divisible by 5 heads"),
        ("fusing", _with(good, 6, "median"), "fusing must be mean, first or max"),
    ]


@pytest.mark.parametrize("case", _cmpa_cases(), ids=lambda c: c[0])
def test_cmpa_raw_op_checks(extension, case):
    _, args, message = case
    with pytest.raises(RuntimeError, match=message):
        extension.cmpa_fwd_cuda(*args)


def test_cmpa_backward_checks_the_saved_workspaces_and_gradients(extension):
    visual, text, vp, tp, hv, ht, fusing, eps, compute_text = _cmpa_args()
    saved = [torch.empty(10), torch.empty(10), torch.empty(0, dtype=torch.int32), torch.empty(0, dtype=torch.int32)]
    with pytest.raises(RuntimeError, match="not the forward's fp32 workspace"):
        extension.cmpa_bwd_cuda(None, None, visual, text, vp, tp, saved, hv, ht, fusing, eps, compute_text)
    with pytest.raises(RuntimeError, match="4 saved tensors"):
        extension.cmpa_bwd_cuda(None, None, visual, text, vp, tp, saved[:2], hv, ht, fusing, eps, compute_text)


def _insert_cases():
    x, p = torch.randn(2, 7, 24), torch.randn(3, 24)
    w, b = torch.randn(24), torch.randn(24)
    return [
        ("valid, but on the CPU", (x, p, 1, None, w, b, 1e-5, "replace"), "the cuda backend takes CUDA tensors"),
        ("2-D x", (x[0], p, 1, None, None, None, 1e-5, "replace"), "must be 3-D"),
        ("widths", (x, torch.randn(3, 25), 1, None, None, None, 1e-5, "replace"), "prompts have width 25"),
        ("start", (x, p, 5, None, None, None, 1e-5, "replace"), r"start=5 is out of range: 0 <= start <= 4"),
        ("mode", (x, p, 0, None, None, None, 1e-5, "append"), "mode must be replace or insert"),
        ("mixed dtypes", (x, p.half(), 0, None, None, None, 1e-5, "insert"), "mixed dtypes"),
        ("LayerNorm width", (x, p, 0, None, torch.randn(23), None, 1e-5, "insert"), r"LayerNorm parameters"),
        ("empty", (x[:, :0], p, 0, None, None, None, 1e-5, "insert"), "is empty"),
        ("per-sequence N", (x, torch.randn(3, 3, 24), 0, None, None, None, 1e-5, "insert"), "must have N = 2"),
        ("starts dtype", (x, p, 0, torch.zeros(2, dtype=torch.int32), None, None, 1e-5, "insert"),
         "starts must be a contiguous int64"),
    ]


@pytest.mark.parametrize("case", _insert_cases(), ids=lambda c: c[0])
def test_insert_raw_op_checks(extension, case):
    _, args, message = case
    with pytest.raises(RuntimeError, match=message):
        extension.insert_prompts_fwd_cuda(*args)


def test_insert_backward_checks_the_gradient_shape(extension):
    x, p = torch.randn(2, 7, 24), torch.randn(3, 24)
    with pytest.raises(RuntimeError, match=r"grad_y must have shape \[2, 10, 24\]"):
        extension.insert_prompts_bwd_cuda(torch.randn(2, 7, 24), None, x, p, 0, None, None, None, [], 1e-5, "insert")



def _insert_packed_cases():
    x, p, cu = torch.randn(9, 24), torch.randn(2, 24), torch.tensor([0, 4, 9])
    w, b = torch.randn(24), torch.randn(24)
    return [
        ("valid, but on the CPU", (x, p, cu, 1, None, w, b, 1e-5), "the cuda backend takes CUDA tensors"),
        ("3-D x", (x[None], p, cu, 1, None, None, None, 1e-5), r"x must be 2-D \(T, D\)"),
        ("widths", (x, torch.randn(2, 25), cu, 1, None, None, None, 1e-5), "prompts have width 25"),
        ("start", (x, p, cu, -1, None, None, None, 1e-5), "start=-1 is out of range"),
        ("cu_seqlens dtype", (x, p, cu.int(), 0, None, None, None, 1e-5), "cu_seqlens must be a contiguous int64"),
        ("cu_seqlens shape", (x, p, cu[:1], 0, None, None, None, 1e-5), r"cu_seqlens must be .* \(N \+ 1,\), N >= 1"),
        ("strided cu_seqlens", (x, p, torch.tensor([0, 7, 4, 7, 9])[::2], 0, None, None, None, 1e-5),
         "cu_seqlens must be a contiguous int64"),
        ("mixed dtypes", (x, p.half(), cu, 0, None, None, None, 1e-5), "mixed dtypes"),
        ("LayerNorm width", (x, p, cu, 0, None, torch.randn(23), None, 1e-5), r"LayerNorm parameters"),
        ("empty", (x[:0], p, cu, 0, None, None, None, 1e-5), "is empty"),
        ("per-sequence N", (x, torch.randn(3, 2, 24), cu, 0, None, None, None, 1e-5), "must have N = 2"),
        ("starts dtype", (x, p, cu, 0, torch.zeros(2, dtype=torch.int32), None, None, 1e-5),
         "starts must be a contiguous int64"),
    ]


@pytest.mark.parametrize("case", _insert_packed_cases(), ids=lambda c: c[0])
def test_insert_packed_raw_op_checks(extension, case):
    _, args, message = case
    with pytest.raises(RuntimeError, match=message):
        extension.insert_prompts_packed_fwd_cuda(*args)


def test_insert_packed_backward_checks_the_gradient_shape(extension):
    x, p, cu = torch.randn(9, 24), torch.randn(2, 24), torch.tensor([0, 4, 9])
    with pytest.raises(RuntimeError, match=r"grad_y must have shape \[9, 24\]"):
        extension.insert_prompts_packed_bwd_cuda(torch.randn(8, 24), None, x, p, cu, 0, None, None, None, [], 1e-5)

def _dafe_cases():
    prev, task = torch.randn(2, 3, 24), torch.randn(3, 24)
    channel = [torch.randn(24), torch.randn(24), torch.randn(24, 24), torch.randn(24), torch.randn(24, 24)]
    token = [torch.randn(24), torch.randn(24), torch.randn(1, 24), torch.randn(1), torch.randn(1, 24)]
    return [
        ("valid, but on the CPU", (prev, task, channel, "channel", 1e-5), "the cuda backend takes CUDA tensors"),
        ("token gate on the CPU", (prev, task, token, "token", 1e-5), "the cuda backend takes CUDA tensors"),
        ("2-D prev", (prev[0], task, channel, "channel", 1e-5), "must be 3-D"),
        ("task shape", (prev, torch.randn(4, 24), channel, "channel", 1e-5), r"task must have shape \[3, 24\]"),
        ("token weights on a channel gate", (prev, task, token, "channel", 1e-5),
         r"gate_prev_weight must have shape \[24, 24\]"),
        ("scalar takes one", (prev, task, channel, "scalar", 1e-5), "scalar gate takes"),
        ("gate name", (prev, task, channel, "sigmoid", 1e-5), "gate must be channel, token or scalar"),
        ("float64", (prev.double(), task.double(), [c.double() for c in channel], "channel", 1e-5),
         "float32, float16 and bfloat16"),
    ]


@pytest.mark.parametrize("case", _dafe_cases(), ids=lambda c: c[0])
def test_dafe_raw_op_checks(extension, case):
    _, args, message = case
    with pytest.raises(RuntimeError, match=message):
        extension.dafe_fwd_cuda(*args)


# ---- a build that does not match the running torch is refused with both versions ---------------------------

def test_a_mismatched_build_is_reported_with_both_versions(monkeypatch):
    monkeypatch.setattr(_extension.importlib, "import_module", lambda name: None)
    monkeypatch.setattr(_extension, "build_info", lambda: {"torch": "2.3.1", "cuda": "12.1"})
    reason = _extension.load()
    assert reason is not None and "built for torch 2.3.1" in reason and torch.__version__ in reason


def test_a_build_that_cannot_load_is_reported_with_both_versions(monkeypatch, tmp_path):
    """A build for another torch fails to load (undefined symbols): the versions it was built against are read
    from the literal csrc/bindings.cpp leaves in the file."""
    library = tmp_path / "_C.so"
    library.write_bytes(os.urandom(4096) + b"fastprompt-build-info;torch=2.3.1;cudart=12010;\0" + os.urandom(4096))

    def unloadable(name):
        raise ImportError(f"{library}: undefined symbol: _ZN3c104cuda29c10_cuda_check_implementationEiPKcS2_jb")

    monkeypatch.setattr(_extension.importlib, "import_module", unloadable)
    monkeypatch.setattr(_extension.importlib.util, "find_spec", lambda name: type("Spec", (), {"origin": str(library)}))
    reason = _extension.load()
    assert "built for torch 2.3.1 and CUDA 12.1" in reason and f"torch {torch.__version__}" in reason
    assert "undefined symbol" in reason and "FASTPROMPT_BUILD_CUDA=1" in reason

    library.write_bytes(os.urandom(4096))  # no literal (a build older than it): the reason without versions
    reason = _extension.load()
    assert "probably built for another torch" in reason and "undefined symbol" in reason


def test_a_mismatched_build_is_said_at_import(monkeypatch):
    """`import fastprompt` reads the versions from the fastprompt._C file without loading it and warns with both;
    a matching build, or none, says nothing."""
    monkeypatch.setattr(_extension, "_file_build_info", lambda: {"torch": "2.3.1", "cuda": "12.1"})
    with pytest.warns(RuntimeWarning, match=r"built for torch 2\.3\.1 but torch .* is running.*cuda backend is "
                      r"unavailable"):
        importlib.reload(fastprompt)
    monkeypatch.setattr(_extension, "_file_build_info", lambda: {"torch": torch.__version__,
                                                                   "cuda": torch.version.cuda or "none"})
    # a CPU-only torch cannot run any CUDA build: that is a mismatch too
    assert (_extension.installed_build_mismatch() is None) == (torch.version.cuda is not None)
    monkeypatch.setattr(_extension, "_file_build_info", lambda: {})
    assert _extension.installed_build_mismatch() is None


def test_build_info_parsing():
    assert _extension.parse_build_info("torch=2.11.0;cudart=13000;") == {"torch": "2.11.0", "cuda": "13.0"}
    assert _extension.parse_build_info("torch=2.14.1;cudart=12080;") == {"torch": "2.14.1", "cuda": "12.8"}
    assert _extension.parse_build_info("torch=2.14.1;cuda=emulator;") == {"torch": "2.14.1", "cuda": "emulator"}


def test_a_missing_build_says_how_to_build(monkeypatch):
    def missing(name):
        raise ModuleNotFoundError("No module named 'fastprompt._C'")

    monkeypatch.setattr(_extension.importlib, "import_module", missing)
    monkeypatch.delenv(_extension.JIT_ENV, raising=False)
    reason = _extension.load()
    assert "not built" in reason and "FASTPROMPT_BUILD_CUDA=1" in reason and _extension.JIT_ENV in reason


# ---- the JIT path: a source checkout without a build compiles csrc/ on first use -----------------------------

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_jit_build_of_a_source_checkout(tmp_path):
    """A copy of the checkout without fastprompt._C, FASTPROMPT_JIT_BUILD=1: the cuda backend loads (about
    20 s of nvcc for sm_90 on 2 cores) with the same ops, and reports the build it made."""
    if shutil.which("nvcc") is None:
        if os.environ.get("FASTPROMPT_EXPECT_CUDA_EXTENSION") == "1":
            pytest.fail("FASTPROMPT_EXPECT_CUDA_EXTENSION=1 but nvcc is not on PATH")
        pytest.skip("no nvcc on PATH")
    checkout = tmp_path / "checkout"
    for folder in ("fastprompt", "kernels", "csrc"):
        shutil.copytree(REPO / folder, checkout / folder, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    # an editable install of this repository maps fastprompt._C to its in-place build: drop its finder
    script = textwrap.dedent("""
        import sys
        sys.meta_path = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
        import torch, fastprompt
        from fastprompt import backends
        print("package", fastprompt.__file__)
        try:
            import fastprompt._C
            print("prebuilt", fastprompt._C.__file__)
        except ImportError:
            pass
        print("reason", backends.load_error("cuda"))
        print("schema", torch.ops.fastprompt.cmpa_fwd_cuda.default._schema)
        print("cuda impl", backends.implementation("cmpa", "cuda").forward)
    """)
    env = dict(os.environ, PYTHONPATH=str(checkout), FASTPROMPT_JIT_BUILD="1", TORCH_CUDA_ARCH_LIST="9.0",
               TORCH_EXTENSIONS_DIR=str(tmp_path / "torch_extensions"))
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    assert lines["package"].startswith(str(checkout)), lines["package"]
    assert "prebuilt" not in lines, lines["prebuilt"]
    assert lines["reason"] == "None"
    assert "fastprompt::cmpa_fwd_cuda(Tensor visual, Tensor text" in lines["schema"]
    assert any((tmp_path / "torch_extensions").rglob("*.so"))


@pytest.mark.parametrize("source", ["cmpa.cu", "dafe.cu", "insert.cu"])
def test_kernels_keep_their_state_in_registers(source, tmp_path):
    """ptxas's resource report for sm_90: no kernel keeps a large stack frame. CMPA's kernels once built both
    sides' views per thread and indexed them at run time, which put 1.1 KB a thread in local memory (ptxas said
    1168 bytes); the views now come in a __grid_constant__ parameter. A few spilled registers (≤ 64 bytes in
    the cooperative CMPA kernels) are tolerated; a frame of hundreds of bytes is such a copy coming back."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed")
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run(["nvcc", "-std=c++17", "-O3", "-arch=sm_90", "-Xptxas", "-v", "-c",
                          str(root / "csrc" / source), "-o", str(tmp_path / "k.o")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    frames = [int(line.split()[0]) for line in run.stderr.splitlines() if "bytes stack frame" in line]
    assert frames, run.stderr  # the report was read
    assert max(frames) <= 64, run.stderr
