"""Build script: the pure-Python package always, the CUDA extension `fastprompt._C` on request.

FASTPROMPT_BUILD_CUDA selects the extension build:
  0     never (a pure wheel / editable install; the `cuda` backend is then unavailable)
  1     always (needs nvcc and torch in the build environment: use `pip install --no-build-isolation`)
  auto  (default) only when nvcc, an NVIDIA GPU and torch are all present, so a plain
        `pip install -e .` on a machine without a GPU never spends minutes in nvcc.

TORCH_CUDA_ARCH_LIST is honoured (default "8.0;9.0+PTX"); MAX_JOBS defaults to what memory allows.
Kernels live in torch-free `.cu` files; only `csrc/bindings.cpp` includes the torch headers, which is
what keeps the build short on small machines.

Version and torch requirement. A build with the extension is tied to the torch it was compiled against (the
binding uses torch's C++ API, not its stable ABI, see README "Wheels"), so its version carries a local label
naming CUDA and torch, 0.1.0+cu130torch2.14, and its metadata pins torch to that major.minor. A build
without the extension is plain 0.1.0 and takes any torch>=2.4.
"""

import os
import re
import runpy
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg: str) -> None:
    print(f"fastprompt setup: {msg}", file=sys.stderr)


# shared with the JIT build of fastprompt/_extension.py; loaded by path (neither torch nor fastprompt may be
# importable yet)
_BUILD_ENV = runpy.run_path(os.path.join(ROOT, "fastprompt", "_build_env.py"))
_cuda_home = _BUILD_ENV["cuda_home"]


def _gpu_present() -> bool:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def _torch_importable() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _want_cuda_extension() -> bool:
    mode = os.environ.get("FASTPROMPT_BUILD_CUDA", "auto").strip().lower()
    if mode in ("0", "false", "no", "off"):
        return False
    if mode in ("1", "true", "yes", "on"):
        if not _torch_importable():
            raise SystemExit(
                "FASTPROMPT_BUILD_CUDA=1 needs torch in the build environment: install torch first and "
                "run `pip install --no-build-isolation ...`"
            )
        return True
    if mode != "auto":
        raise SystemExit(f"FASTPROMPT_BUILD_CUDA must be auto, 0 or 1, not {mode!r}")
    if _cuda_home() is None:
        _log("auto: no CUDA toolkit (nvcc and its headers) found, building without the CUDA extension")
        return False
    if not _gpu_present():
        _log("auto: no NVIDIA GPU found, building without the CUDA extension")
        return False
    if not _torch_importable():
        _log("auto: torch is not importable in the build environment (build isolation?), "
             "building without the CUDA extension; use --no-build-isolation to build it")
        return False
    return True


def _default_max_jobs() -> str:
    # nvcc on a file that includes the torch headers peaks around 3 GiB; leave headroom.
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 8.0
    return str(max(1, min(os.cpu_count() or 1, int(mem_gib // 4))))


def _extensions():
    if not _want_cuda_extension():
        return [], {}
    cuda_home = _cuda_home()
    if cuda_home is None:
        raise SystemExit("FASTPROMPT_BUILD_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME")
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    os.environ.setdefault("MAX_JOBS", _default_max_jobs())
    _log(f"building fastprompt._C for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} "
         f"with MAX_JOBS={os.environ['MAX_JOBS']}")
    sources = [os.path.relpath(p, ROOT) for p in _BUILD_ENV["extension_sources"](ROOT)]
    ext = CUDAExtension(
        name="fastprompt._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},  # torch picks the C++ standard it needs
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


BASE_DEPENDENCIES = [
    "triton>=3.0; platform_system == 'Linux'",
    # as far as the tests reach: CI runs open_clip 3.3 (the newest release), and tests/open_clip_main.py writes
    # open_clip 4.x's blocks (its own Attention module) to test fastprompt's block adapter against them
    "open_clip_torch>=3.3,<5",
    "numpy",
    "matplotlib",
    "tqdm",
]


def _base_version() -> str:
    with open(os.path.join(ROOT, "fastprompt", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _version_and_torch_requirement(with_extension: bool) -> tuple[str, str]:
    if not with_extension:
        return _base_version(), "torch>=2.4"
    import torch

    torch_mm = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    cuda = (torch.version.cuda or "0.0").replace(".", "")
    return f"{_base_version()}+cu{cuda}torch{torch_mm}", f"torch=={torch_mm}.*"


ext_modules, cmdclass = _extensions()
version, torch_requirement = _version_and_torch_requirement(bool(ext_modules))
_log(f"version {version}, requires {torch_requirement}")

setup(
    version=version,
    install_requires=[torch_requirement] + BASE_DEPENDENCIES,
    packages=find_packages(include=["fastprompt", "fastprompt.*"])
    + ["fastprompt.kernels"]
    + [f"fastprompt.kernels.{p}" for p in find_packages("kernels")],
    package_dir={"fastprompt.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
