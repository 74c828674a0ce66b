"""The `cuda` backend: the raw ops of the compiled extension fastprompt._C (or of its CPU emulation), plugged into
the dispatch.

The extension defines fastprompt::<op>_{fwd,bwd}_cuda of every op in C++ (csrc/bindings.cpp, TORCH_LIBRARY_FRAGMENT)
with the schemas of the op's declaration (a test compares the two, and `implement` refuses a library whose schemas
differ, such as a stale build), so the op's one autograd Function drives them as it drives the Triton ones. The
kernels save what the Triton ones save, so the declaration's fakes serve them. fastprompt.backends calls
`implement(op)` once the extension has loaded, the first time an op is asked of the cuda backend.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..declaration import Op, OpImpl

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def supports(problem: dict) -> Optional[str]:
    """The kernels take any shape the ops accept (no width or prompt-count limit); only the dtype is checked."""
    if problem.get("dtype") not in SUPPORTED_DTYPES:
        return f"the cuda kernels take float32, float16 and bfloat16, not {problem.get('dtype')}"
    return None


def implement(op: Op) -> OpImpl:
    """Give the library's raw ops of `op` their fakes and register them with the dispatch (once)."""
    return op.implementation("cuda") or op.implement("cuda", supports=supports)


def launches() -> int:
    """Kernel launches made by the CMPA cuda ops since the extension loaded (the GPU tests' launch counts)."""
    return int(torch.ops.fastprompt.cuda_cmpa_launches())
