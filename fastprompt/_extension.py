"""Loading the compiled CUDA extension `fastprompt._C`, and saying why it is missing when it is.

The extension is optional: without it every op still runs on the reference and Triton backends.
An extension built against another torch or CUDA than the one running is refused at load time
with both versions in the message, instead of crashing later.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

_HOW_TO_BUILD = ("build it with `FASTPROMPT_BUILD_CUDA=1 pip install --no-build-isolation -e .` "
                 "(needs nvcc) or install a fastprompt wheel built for this torch and CUDA")


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def load() -> Optional[str]:
    """Import fastprompt._C; return None on success, else why the cuda backend is unavailable."""
    try:
        importlib.import_module("fastprompt._C")
    except ImportError as exc:
        text = str(exc)
        if "No module named" in text:
            return f"the extension fastprompt._C is not built: {_HOW_TO_BUILD}"
        return f"the extension fastprompt._C failed to load ({text}); it was probably built for another torch: {_HOW_TO_BUILD}"
    except OSError as exc:  # missing libcudart and the like
        return f"the extension fastprompt._C failed to load ({exc}): {_HOW_TO_BUILD}"
    info = build_info()
    built_torch, built_cuda = info.get("torch", "?"), info.get("cuda", "?")
    if _major_minor(built_torch) != _major_minor(torch.__version__):
        return (f"fastprompt._C was built for torch {built_torch} but torch {torch.__version__} is running: "
                f"{_HOW_TO_BUILD}")
    running_cuda = torch.version.cuda or "none"
    if running_cuda == "none" or built_cuda.split(".")[0] != running_cuda.split(".")[0]:
        return (f"fastprompt._C was built for CUDA {built_cuda} but this torch uses CUDA {running_cuda}: "
                f"{_HOW_TO_BUILD}")
    return None


def build_info() -> dict:
    """What the loaded extension says it was built against ({} when it is not loaded)."""
    try:
        text = torch.ops.fastprompt.cuda_build_info()
    except (AttributeError, RuntimeError):
        return {}
    return dict(item.split("=", 1) for item in text.split(";") if "=" in item)
