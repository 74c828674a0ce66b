"""What both builds of the CUDA extension need to find: setup.py (ahead of time) and the JIT path of
fastprompt/_extension.py. Standard library only: setup.py loads this file by path, before torch or
fastprompt can be imported."""

from __future__ import annotations

import glob
import os
import shutil


def cuda_home() -> str | None:
    """The CUDA toolkit root: $CUDA_HOME, else the toolkit that owns the include/ beside nvcc (following
    wrapper scripts and links such as /usr/local/bin/nvcc), else /usr/local/cuda. torch's own guess takes
    the folder above nvcc, which is wrong for such wrappers."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if os.path.exists(os.path.join(root, "include", "cuda_runtime_api.h")):
            return root
    return None


def extension_sources(root: str) -> list[str]:
    """The binding file and the torch-free kernel files of csrc/ under `root` (the repository)."""
    csrc = os.path.join(root, "csrc")
    return sorted(glob.glob(os.path.join(csrc, "*.cpp"))) + sorted(glob.glob(os.path.join(csrc, "*.cu")))
