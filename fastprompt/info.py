"""`fastprompt info`: versions, and for every op which backends can run it here, and why not."""

import os
import platform
from importlib import metadata

import torch

from . import __version__, backends
from ._extension import build_info


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def devices() -> list[torch.device]:
    """The device kinds to report on: the CPU, and CUDA when a device is present."""
    found = [torch.device("cpu")]
    if torch.cuda.is_available():
        found.append(torch.device("cuda"))
    return found


def report() -> dict:
    cuda = torch.cuda.is_available()
    ext_error = backends.load_error("cuda")
    data = {
        "fastprompt": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "none (CPU build)",
        "triton": _version("triton"),
        "open_clip": _version("open_clip_torch"),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "unset"),
        "FASTPROMPT_BACKEND": os.environ.get(backends.ENV_VAR, "unset"),
        "backend_in_force": backends.current_backend(),
        "extension": "loaded, built for " + ", ".join(f"{k} {v}" for k, v in build_info().items())
        if ext_error is None else ext_error,
        "ops": {},
    }
    for op in backends.OPS:
        rows = {}
        for name in backends.BACKENDS:
            rows[name] = {str(dev): backends.unavailable_reason(op, name, dev) for dev in devices()}
        data["ops"][op] = rows
    return data


def format_report(data: dict) -> str:
    lines = [
        f"fastprompt {data['fastprompt']}",
        f"python {data['python']}, torch {data['torch']} (CUDA {data['torch_cuda']}), triton {data['triton']}, "
        f"open_clip {data['open_clip']}",
        "CUDA devices: " + (", ".join(data["cuda_devices"]) or "none"),
        f"TRITON_INTERPRET={data['TRITON_INTERPRET']}  FASTPROMPT_BACKEND={data['FASTPROMPT_BACKEND']}  "
        f"(backend in force: {data['backend_in_force']})",
        f"extension fastprompt._C: {data['extension']}",
        "",
        "op / backend: available on each device, or why not",
    ]
    extension_missing = data["extension"] if not data["extension"].startswith("loaded") else None
    for op, rows in data["ops"].items():
        lines.append(f"  {op}")
        for name, per_device in rows.items():
            for dev, reason in per_device.items():
                if reason is None:
                    verdict = "yes"
                elif reason == extension_missing:  # said once, on the extension's line above
                    verdict = "no: fastprompt._C is not loaded (why: above)"
                else:
                    verdict = f"no: {reason}"
                lines.append(f"    {name:<10} {dev:<5} {verdict}")
    if not data["cuda_devices"]:
        lines.append("  (no CUDA device here: the triton and cuda backends serve CUDA tensors)")
    return "\n".join(lines)
