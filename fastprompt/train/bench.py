"""`fastprompt bench`: images per second of one full training step (forward, backward, optimizer) per
method and backend, and a profile of one step split into text tower, image tower, prompt ops, loss and
optimizer — so that a kernel's speed-up is always seen against the whole step.

The profile attributes every operator to a part: the fastprompt ops (fastprompt::*, forward and backward)
are "prompt ops"; other forward operators belong to the scope they ran in (the towers' blocks run inside
record_function scopes "fastprompt.text_tower" / "fastprompt.image_tower"); a backward operator is
attributed to the forward operator it differentiates (autograd's sequence numbers); the optimizer step and
the loss have scopes of their own. What no scope claims is "other" (the method's small layers).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Optional

import torch

from .. import backends, methods
from ..clip import SMALL_CONFIGS, create_clip
from ..data import SyntheticShapes
from .config import ConfigError

PARTS = ("text tower", "image tower", "prompt ops", "loss", "optimizer", "other")
SCOPES = {"fastprompt.text_tower": "text tower", "fastprompt.image_tower": "image tower", "fastprompt.loss": "loss",
          "fastprompt.optimizer": "optimizer"}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step(method, optimizer, images, labels):
    with torch.profiler.record_function("fastprompt.loss_and_forward"):
        loss, _ = method.loss_and_logits(images, labels)
    loss.backward()
    with torch.profiler.record_function("fastprompt.optimizer"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def check_bench_arguments(method_names, backend_names, batch_size, classes, steps) -> None:
    """ConfigError for what `fastprompt bench` cannot run, before any model is built."""
    from .validate import at_least, check_arguments, check_backend_names, check_method_names, optional

    check_method_names(method_names, "bench --methods")
    check_backend_names(backend_names, "bench --backends")
    check_arguments("bench", [("--batch-size", batch_size, optional(at_least(1)), "a batch size, at least 1"),
                              ("--classes", classes, optional(at_least(2)), "a number of classes, at least 2"),
                              ("--steps", steps, at_least(1), "a number of timed steps, at least 1")])


def _quiet_profiler() -> None:
    """Kineto, the profiler's C++ side, logs its stages (and, without a GPU, a failed device count) to stderr
    at its default level; fastprompt reads the events and prints a table, so those lines are noise. Its level
    is read from the environment when it first starts: set here unless the user chose one."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")


def profile_step(method, optimizer, images, labels) -> dict:
    """Milliseconds of one training step per part (CUDA time on a GPU, CPU time otherwise)."""
    _quiet_profiler()
    device = images.device
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        _step(method, optimizer, images, labels)
        _sync(device)
    return parts_of(prof.events(), gpu=device.type == "cuda")


def parts_of(events, gpu: bool) -> dict:
    """Milliseconds per part of a profiled step's events (device time on a GPU, CPU time otherwise): each
    operator goes to the scope it ran in, a backward operator to the part of the forward operator it
    differentiates. Code outside the methods is split alike when it runs its blocks in the same scopes
    (the public codes' way of benches/train_step_figures.py does)."""
    def cost(e):
        return (e.self_device_time_total if gpu else e.self_cpu_time_total) / 1e3

    def scope_of(e):
        node = e
        while node is not None:
            if node.name.startswith("fastprompt::"):
                return "prompt ops"
            if node.name in SCOPES:
                return SCOPES[node.name]
            node = node.cpu_parent
        return None

    forward_part = {}
    for e in events:  # forward operators: their sequence numbers identify their backward
        part = scope_of(e)
        if e.sequence_nr >= 0 and part is not None and not e.is_legacy and "Backward" not in e.name:
            forward_part.setdefault(e.sequence_nr, part)
    parts = dict.fromkeys(PARTS, 0.0)
    for e in events:
        part = scope_of(e)
        if part is None:
            node = e
            while node is not None and part is None:  # a backward op: the part of its forward op
                if "Backward" in node.name and node.sequence_nr >= 0:
                    part = forward_part.get(node.sequence_nr)
                node = node.cpu_parent
        parts[part or "other"] += cost(e)
    return parts


def bench_steps(method_names: Optional[list] = None, backend_names: Optional[list] = None,
                model: Optional[str] = None, batch_size: Optional[int] = None, classes: Optional[int] = None,
                steps: int = 5) -> list:
    """One record per (method, backend): images/s (median of `steps` timed steps after two warm-ups) and the
    profile of one step. Defaults: ViT-B-16 at batch 32 on a GPU; fastprompt-tiny at batch 8 on a CPU."""
    check_bench_arguments(method_names, backend_names, batch_size, classes, steps)
    names = method_names or list(methods.METHODS)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    model = model or ("ViT-B-16" if on_gpu else "fastprompt-tiny")
    batch_size = batch_size or (32 if on_gpu else 8)
    chosen = backend_names or [b for b in backends.BACKENDS if backends.unavailable_reason("cmpa", b, device) is None
                           and not (b == "triton" and device.type == "cpu")]
    for backend in chosen:  # before any work: a backend asked for that cannot run here
        reason = backends.unavailable_reason("cmpa", backend, device)
        if reason is not None:
            raise backends.BackendUnavailableError(f"bench --backends {backend}: {reason}")
    try:
        clip_model = create_clip(model, device=device)
    except (ValueError, RuntimeError) as exc:  # an unknown model name
        raise ConfigError(f"bench --model {model!r}: {exc}") from exc
    size = clip_model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    n_classes = classes or (100 if on_gpu else 8)
    classnames = [f"{SyntheticShapes(10).classnames[i % 10]} {i}" for i in range(n_classes)]
    images = torch.randn(batch_size, 3, size, size, device=device)
    labels = torch.randint(0, n_classes, (batch_size,), device=device)
    config = methods.SMALL_MODEL_CONFIGS if model in SMALL_CONFIGS else {}
    results = []
    for name in names:
        for backend in chosen:
            method = methods.build(name, clip_model, classnames, **config.get(name, {}),
                                   backend=backend).to(device)
            optimizer = torch.optim.SGD(method.trainable_parameters(), lr=1e-3, momentum=0.9)
            autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else torch.autocast("cpu",
                                                                                              enabled=False)
            times = []
            with autocast:
                for i in range(steps + 2):
                    _sync(device)
                    t0 = time.perf_counter()
                    _step(method, optimizer, images, labels)
                    _sync(device)
                    if i >= 2:
                        times.append(time.perf_counter() - t0)
                profile = profile_step(method, optimizer, images, labels)
            median = statistics.median(times)
            results.append(dict(method=name, backend=backend, model=model, device=str(device), batch_size=batch_size,
                                classes=n_classes, step_ms=median * 1e3, images_per_s=batch_size / median,
                                profile_ms=profile))
    return results


def format_bench(results: list) -> str:
    """A table: step time and images/s (timed without the profiler), and each part's share of the profiled step
    (the profiler's own overhead inflates absolute times, so the profile is given in %)."""
    lines = ["| method | backend | step (ms) | images/s | " + " | ".join(f"{p} %" for p in PARTS) + " |",
             "|---" * (4 + len(PARTS)) + "|"]
    for r in results:
        total = sum(r["profile_ms"].values()) or 1.0
        lines.append(f"| {r['method']} | {r['backend']} | {r['step_ms']:.1f} | {r['images_per_s']:.1f} | "
                     + " | ".join(f"{100 * r['profile_ms'][p] / total:.0f}" for p in PARTS) + " |")
    if results:
        r = results[0]
        lines.append(f"\n{r['model']} on {r['device']}, batch {r['batch_size']}, {r['classes']} classes")
    return "\n".join(lines)
