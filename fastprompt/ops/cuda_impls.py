"""The `cuda` backend: the raw ops of the compiled extension, plugged into the dispatch.

`fastprompt._C` registers fastprompt::<op>_{fwd,bwd}_cuda (csrc/bindings.cpp) with the same schemas as the
Triton backend's raw ops, so the one autograd Function of each op drives either. This module gives those ops
their fake (meta) implementations, shared with the Triton ops because both save the same tensors, so that
torch.compile can trace through them; it is imported by `backends` once the extension has loaded.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import backends
from . import fakes

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_FAKES = {
    "insert_prompts_fwd_cuda": fakes.insert_prompts_fwd,
    "insert_prompts_bwd_cuda": fakes.insert_prompts_bwd,
    "insert_prompts_packed_fwd_cuda": fakes.insert_prompts_packed_fwd,
    "insert_prompts_packed_bwd_cuda": fakes.insert_prompts_packed_bwd,
    "dafe_fwd_cuda": fakes.dafe_fwd,
    "dafe_bwd_cuda": fakes.dafe_bwd,
    "cmpa_fwd_cuda": fakes.cmpa_fwd,
    "cmpa_bwd_cuda": fakes.cmpa_bwd,
}

# op name in the dispatch -> the prefix of its raw ops
_RAW = {"insert_prompts": "insert_prompts", "insert_prompts_packed": "insert_prompts_packed", "dafe": "dafe",
        "cmpa": "cmpa"}


def supports(problem: dict) -> Optional[str]:
    """The kernels take any shape the ops accept (no width or prompt-count limit); only the dtype is checked."""
    if problem.get("dtype") not in SUPPORTED_DTYPES:
        return f"the cuda kernels take float32, float16 and bfloat16, not {problem.get('dtype')}"
    return None


def launches() -> int:
    """Kernel launches made by the CMPA cuda ops since the extension loaded (the GPU tests' launch counts)."""
    return int(torch.ops.fastprompt.cuda_cmpa_launches())


_registered = False


def register() -> None:
    """Give the extension's raw ops their fakes and register them with the dispatch (once)."""
    global _registered
    if _registered:
        return
    for name, fake in _FAKES.items():
        torch.library.register_fake(f"fastprompt::{name}")(fake)
    for op, prefix in _RAW.items():
        backends.register_impl(op, "cuda", getattr(torch.ops.fastprompt, f"{prefix}_fwd_cuda"),
                               getattr(torch.ops.fastprompt, f"{prefix}_bwd_cuda"), supports)
    _registered = True
