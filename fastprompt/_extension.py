"""Loading the compiled CUDA extension `fastprompt._C`, and saying why it is missing when it is.

The extension is optional: without it every op still runs on the reference and Triton backends.
An extension built against another torch or CUDA than the one running is refused at load time
with both versions in the message, instead of crashing later.

In a source checkout without a build, FASTPROMPT_JIT_BUILD=1 compiles csrc/ on first use with
torch.utils.cpp_extension.load (cached under TORCH_EXTENSIONS_DIR, rebuilt when a source changes) and
loads it as an op library: the same ops, no install step.

FASTPROMPT_CUDA_EMULATE=1 (read at import; a testing tool of a source checkout, as TRITON_INTERPRET=1 is for the
Triton kernels) loads instead the CPU emulation of csrc/ that tests/cuda_emulator/ builds with the host compiler:
the same kernels and bindings, run on CPU tensors by a scheduler that emulates the GPU's threads and barriers.
fastprompt._C is then never imported (both register the same op names).
"""

from __future__ import annotations

import importlib
import importlib.util
import mmap
import os
import subprocess
from typing import Optional

import torch

JIT_ENV = "FASTPROMPT_JIT_BUILD"
EMULATE_ENV = "FASTPROMPT_CUDA_EMULATE"
_EMULATED = os.environ.get(EMULATE_ENV, "0") == "1"
_HOW_TO_BUILD = ("build it with `FASTPROMPT_BUILD_CUDA=1 pip install --no-build-isolation -e .` "
                 f"(needs nvcc), set {JIT_ENV}=1 in a source checkout to compile it on first use, "
                 "or install a fastprompt wheel built for this torch and CUDA")


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def emulated() -> bool:
    """Whether the cuda backend is the CPU emulator (FASTPROMPT_CUDA_EMULATE=1 when fastprompt was imported)."""
    return _EMULATED


def load() -> Optional[str]:
    """Import fastprompt._C; return None on success, else why the cuda backend is unavailable."""
    if _EMULATED:
        return _load_emulator()
    try:
        importlib.import_module("fastprompt._C")
    except ImportError as exc:
        text = str(exc)
        if "No module named" in text:
            if os.environ.get(JIT_ENV, "0") == "1":
                reason = _jit_build()
                if reason is not None:
                    return reason
                return _mismatch(build_info())
            return f"the extension fastprompt._C is not built: {_HOW_TO_BUILD}"
        built = _file_build_info()
        if built:
            return (f"fastprompt._C was built for torch {built.get('torch', '?')} and CUDA {built.get('cuda', '?')} "
                    f"but torch {torch.__version__} with CUDA {torch.version.cuda or 'none'} is running, and it "
                    f"failed to load ({text}): {_HOW_TO_BUILD}")
        return f"the extension fastprompt._C failed to load ({text}); it was probably built for another torch: {_HOW_TO_BUILD}"
    except OSError as exc:  # missing libcudart and the like
        return f"the extension fastprompt._C failed to load ({exc}): {_HOW_TO_BUILD}"
    return _mismatch(build_info())


def installed_build_mismatch() -> Optional[str]:
    """Checked at `import fastprompt` without loading anything: if the fastprompt._C beside the package was
    built for another torch major.minor or CUDA major than the running ones, why, with both versions; else
    None (also when there is no build, or it predates the literal it is read from)."""
    if _EMULATED:
        return None
    built = _file_build_info()
    return _mismatch(built) if built else None


def _mismatch(info: dict) -> Optional[str]:
    built_torch, built_cuda = info.get("torch", "?"), info.get("cuda", "?")
    if _major_minor(built_torch) != _major_minor(torch.__version__):
        return (f"fastprompt._C was built for torch {built_torch} but torch {torch.__version__} is running: "
                f"{_HOW_TO_BUILD}")
    running_cuda = torch.version.cuda or "none"
    if running_cuda == "none" or built_cuda.split(".")[0] != running_cuda.split(".")[0]:
        return (f"fastprompt._C was built for CUDA {built_cuda} but this torch uses CUDA {running_cuda}: "
                f"{_HOW_TO_BUILD}")
    return None


def _jit_build() -> Optional[str]:
    """Compile and load csrc/ of this source checkout; None on success, else why not."""
    from . import _build_env

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sources = _build_env.extension_sources(root)
    if not sources:
        return f"{JIT_ENV}=1 needs a source checkout (csrc/ beside the package), and there is none: {_HOW_TO_BUILD}"
    cuda_home = _build_env.cuda_home()
    if cuda_home is None:
        return f"{JIT_ENV}=1 but no CUDA toolkit (nvcc and its headers) was found: set CUDA_HOME"
    os.environ.setdefault("CUDA_HOME", cuda_home)
    if not torch.cuda.is_available():  # torch would otherwise build for every architecture it knows
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = cuda_home  # read at its import, possibly before the line above
    try:
        cpp_extension.load(name="fastprompt_C_jit", sources=sources, extra_include_paths=[os.path.join(root, "csrc")],
                           extra_cflags=["-O3"], extra_cuda_cflags=["-O3"], is_python_module=False,
                           verbose=os.environ.get("FASTPROMPT_JIT_VERBOSE", "0") == "1")
    except (RuntimeError, OSError, ImportError) as exc:
        return f"the JIT build of csrc/ failed ({str(exc)[-500:]}): {_HOW_TO_BUILD}"
    return None


def _load_emulator() -> Optional[str]:
    """Build (cached) and load the emulated op library of this source checkout; None on success, else why not."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "tests", "cuda_emulator", "build.py")
    if not os.path.exists(path):
        return (f"{EMULATE_ENV}=1 needs a source checkout: the CUDA emulator is a testing tool in tests/cuda_emulator/ "
                f"beside the package, and there is none in {root}")
    spec = importlib.util.spec_from_file_location("fastprompt_cuda_emulator_build", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        module.load(verbose=os.environ.get("FASTPROMPT_JIT_VERBOSE", "0") == "1")
    except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as exc:
        return f"{EMULATE_ENV}=1 but the emulated build of csrc/ failed ({str(exc)[-1000:]})"
    if build_info().get("cuda") != "emulator":
        return f"{EMULATE_ENV}=1 but the loaded op library is not the emulator's ({build_info()})"
    return None


BUILD_INFO_MARKER = b"fastprompt-build-info;"  # csrc/bindings.cpp: kBuildInfo


def parse_build_info(text: str) -> dict:
    """{"torch": "2.11.0", "cuda": "13.0"} from the extension's "torch=2.11.0;cudart=13000;" (CUDART_VERSION is
    major * 1000 + minor * 10) or the emulator's "torch=...;cuda=emulator;"."""
    info = dict(item.split("=", 1) for item in text.split(";") if "=" in item)
    cudart = info.pop("cudart", None)
    if cudart is not None and cudart.isdigit():
        info["cuda"] = f"{int(cudart) // 1000}.{int(cudart) % 1000 // 10}"
    return info


def build_info() -> dict:
    """What the loaded extension says it was built against ({} when it is not loaded)."""
    try:
        text = torch.ops.fastprompt.cuda_build_info()
    except (AttributeError, RuntimeError):
        return {}
    return parse_build_info(text)


def _file_build_info(path: Optional[str] = None) -> dict:
    """What a build that cannot be loaded was built against, read from the literal in its file ({} when the
    file or the literal is missing)."""
    if path is None:
        try:
            spec = importlib.util.find_spec("fastprompt._C")
        except (ImportError, ValueError):
            return {}
        path = spec.origin if spec is not None else None
    try:  # mapped, not read: only the pages up to the literal (early in .rodata) are touched
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            start = data.find(BUILD_INFO_MARKER)
            if start < 0:
                return {}
            text = data[start + len(BUILD_INFO_MARKER):start + 256].split(b"\0", 1)[0]
    except (OSError, TypeError, ValueError):  # no file, or an empty one (mmap refuses it)
        return {}
    return parse_build_info(text.decode("ascii", "replace"))
