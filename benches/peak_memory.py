"""The peak memory of one step: how many bytes of tensor memory it holds at once, on top of what it found.

CUDA: torch's caching allocator counts every tensor it hands out, so the figure is
`torch.cuda.max_memory_allocated()` over the step (peak statistics reset at its start) less
`torch.cuda.memory_allocated()` at its start: the weights, optimizer state and anything else alive before
the step are left out, the step's activations, gradients and temporaries are in.

CPU: the default allocator keeps no statistics, but it reports each allocation and free to torch's
profiler when the profiler runs with `profile_memory=True` (c10's ProfiledCPUMemoryReporter). The
allocation events of the step, in time order, form a running sum of the bytes the step allocated and has
not freed yet; its maximum is the step's peak. What this sees: every tensor torch allocates on the CPU
(forward, backward, the optimizer). What it does not see: memory outside torch's allocator (oneDNN's and
MKL's scratch buffers, Python objects), and a free of a block allocated before the step began (the
reporter does not know its size, so it reports nothing: such a free cannot lower the figure). So the CPU
figure is the high-water mark of the step's own tensor allocations; with nothing from earlier steps freed
inside it (the optimizer zeroes gradients with set_to_none=True at the end of the step), that is what the
CUDA figure measures too. `benches/test_peak_memory.py` checks it on steps whose allocations are known.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

# Kineto, the profiler's C++ side, logs its start and stop (and, without a GPU, a failed device count) to stderr
# at its default level, between the progress lines; its level is read when it first starts (as fastprompt bench)
os.environ.setdefault("KINETO_LOG_LEVEL", "6")


@dataclass
class Measured:
    """What `measured` found: the peak bytes, and the profile when one was taken (else None)."""

    peak_bytes: int = 0
    profile: Optional[torch.profiler.profile] = None


def allocation_events(prof: torch.profiler.profile, device_type: str = "cpu") -> list[tuple[int, int]]:
    """(time ns, signed bytes) of every allocation (+) and free (−) the profile recorded on `device_type`,
    in time order."""
    from torch._C._profiler import _EventType

    found = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == device_type:
            found.append((event.start_time_ns, int(event.extra_fields.alloc_size)))
        stack.extend(event.children)
    return sorted(found, key=lambda e: e[0])  # stable: events of one timestamp keep their order


def peak_of(events: list[tuple[int, int]]) -> int:
    """The maximum of the running sum of signed allocation sizes (0 when nothing was allocated)."""
    held = peak = 0
    for _, size in events:
        held += size
        peak = max(peak, held)
    return peak


@contextlib.contextmanager
def measured(device: torch.device, profile: bool = False) -> Iterator[Measured]:
    """Measures the peak memory of the code inside the block (see the module's docstring); with `profile`
    (always on the CPU, where the memory comes from the profile) the block also runs under torch's profiler
    (CPU, and CUDA activity on a GPU), whose result is kept in `.profile`."""
    device = torch.device(device)
    result = Measured()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    prof = (torch.profiler.profile(activities=activities, profile_memory=not cuda) if profile or not cuda
            else contextlib.nullcontext())
    with prof:
        yield result
        if cuda:
            torch.cuda.synchronize(device)
    if cuda:
        result.peak_bytes = torch.cuda.max_memory_allocated(device) - start
    else:
        result.peak_bytes = peak_of(allocation_events(prof, "cpu"))
    result.profile = prof if isinstance(prof, torch.profiler.profile) else None
