"""What the Triton launchers share: block sizes, the fp32 dot precision and the device's size."""

import functools

import torch
import triton

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 dot products are IEEE fp32 unless torch itself allows TF32 for matmuls (DESIGN.md)."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the device (a nominal 8 for CPU tensors under the interpreter, which
    runs programs one after another anyway)."""
    if device.type != "cuda":
        return 8
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def dtype_reason(problem: dict) -> str | None:
    if problem["dtype"] not in SUPPORTED_DTYPES:
        return f"the triton kernels take float32, float16 and bfloat16, not {problem['dtype']}"
    return None
