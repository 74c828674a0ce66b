"""Compile every Triton kernel of fastprompt for a GPU that is not here, and report what ptxas says of it.

On the CPU machines the kernels run under TRITON_INTERPRET=1, which checks their arithmetic but not that
Triton's compiler accepts them for a real target, nor what they cost in registers, spills and shared memory.
This tool runs the ops' launchers on CPU tensors with Triton's JIT pointed at an absent sm_90 device (a stub
driver): each launch compiles its kernel to PTX and a cubin with the ptxas Triton ships, and is then skipped
(nothing runs, outputs stay garbage). The ops run forward and backward in fp32, fp16 and bf16 at the real
CLIP ViT-B/16 shapes, so every specialisation the methods meet is compiled.

    python tools/triton_compile_check.py [--arch 90] [--out report.md]

Prints one line per compiled kernel: registers, stack bytes (spills), shared memory, warps, stages. Exits 1
when a kernel fails to compile or needs more shared memory than the target lets a block have (227 KB on
sm_90, 163 KB on sm_80): both would fail on the GPU. Spills are listed as costs to measure there. Works with the Triton of the GPU machines (3.6) and of the CPU
machines (3.8). A second pass compiles the ops at the tests' odd shapes (sizes of 1, widths 24 and 40), which
Triton compiles as other programs (an integer argument equal to 1 becomes a constant).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # bytes a block may opt in to


class AbsentGPU:
    """The driver calls JITFunction.run makes before a launch, answered for a device that is not here."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


compiled: dict[str, object] = {}  # kernel name + specialisation -> CompiledKernel


def compile_only(self, *args, grid, warmup, **kwargs):
    """JITFunction.run without the launch: compile (or fetch from the cache), record, return."""
    kernel = _original_run(self, *args, grid=grid, warmup=True, **kwargs)
    if kernel is not None:
        compiled[f"{kernel.name} {kernel.hash[:8]}"] = kernel
    return kernel


_original_run = JITFunction.run


def ptxas_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, spilled bytes) of a cubin, from the cuobjdump that Triton ships."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    if os.environ.get("FASTPROMPT_DUMP_USAGE"):
        print(text)
    # one line per function of the cubin (the kernel, and any function ptxas did not inline): the largest
    regs = max(int(v) for v in re.findall(r"REG:(\d+)", text))
    stack = max(int(v) for v in re.findall(r"STACK:(\d+)", text))
    return regs, stack


def run_odd_shapes() -> None:
    """Every op at the tests' odd shapes (one prompt, one image, one class, one sequence; widths that are not
    powers of two), bf16: Triton compiles an integer argument equal to 1 as a constant (and specialises on
    16-byte divisibility), so these are other programs than the ViT-B/16 ones, which the compiler must also
    accept."""
    import fastprompt

    torch.manual_seed(0)
    dtype = torch.bfloat16

    def t(*shape):
        return torch.randn(*shape, dtype=dtype).requires_grad_()

    for fusing in ("mean", "first", "max"):
        cmpa = fastprompt.CrossModalPromptAttention(40, 5, 24, 3, fusing=fusing, backend="triton").to(dtype)
        v, w = cmpa(t(1, 1, 40), t(1, 1, 24))
        (v.float().sum() + w.float().sum()).backward()
    for gate in ("channel", "token", "scalar"):
        dafe = fastprompt.DeepAdaptiveFeatureEnhancement(40, gate=gate, backend="triton").to(dtype)
        dafe(t(1, 1, 40), t(1, 40)).float().sum().backward()
    for mode, length in (("replace", 5), ("insert", 4)):
        for prompts, start in ((t(1, 40), 1), (t(1, 1, 40), torch.ones(1, dtype=torch.int64))):
            y, y_ln = fastprompt.insert_prompts(t(1, length, 40), prompts, start, t(40), t(40), mode=mode,
                                                backend="triton")
            (y.float().sum() + y_ln.float().sum()).backward()
    cu = torch.tensor([0, 3])
    y, y_ln = fastprompt.insert_prompts(t(3, 40), t(1, 40), 1, t(40), t(40), cu_seqlens=cu, backend="triton")
    (y.float().sum() + y_ln.float().sum()).backward()


def run_ops() -> None:
    """Every op, forward and backward, at the shapes the methods use (ViT-B/16), in each dtype."""
    import fastprompt
    from fastprompt import backends

    backends.triton_interpret = lambda: True  # let the triton backend take the CPU tensors given to the stub
    for op in backends.OPS:  # every op's kernels module (installed, or kernels/ of a source checkout: PYTHONPATH=.)
        if backends.implementation(op, "triton") is None:
            raise RuntimeError(backends.unavailable_reason(op, "triton", torch.device("cpu")))
    for name, module in list(sys.modules.items()):  # an H100's SMs: the grids the GPU would get
        if name.startswith("fastprompt.kernels.") and hasattr(module, "sm_count"):
            module.sm_count = lambda device: 132

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        def t(*shape, grad=True):
            return torch.randn(*shape, dtype=dtype).requires_grad_(grad)

        # CMPA at ViT-B/16 widths: 16 prompts, batch 4 against 100 classes; mean and max pooling
        for fusing in ("mean", "max"):
            cmpa = fastprompt.CrossModalPromptAttention(768, 12, 512, 8, fusing=fusing, backend="triton")
            cmpa = cmpa.to(dtype)
            v, w = cmpa(t(16, 4, 768), t(16, 100, 512))
            (v.float().sum() + w.float().sum()).backward()
        # DAFE, three gates, vision rows (32 images x 4 prompts x 768)
        for gate in ("channel", "token", "scalar"):
            dafe = fastprompt.DeepAdaptiveFeatureEnhancement(768, gate=gate, backend="triton").to(dtype)
            dafe(t(32, 4, 768), t(4, 768)).float().sum().backward()
        # insertion: deep vision layers (replace + ln_1), the vision stem (insert + ln_pre), text layer 0
        ln_w, ln_b = t(768), t(768)
        for mode, start, length in (("replace", 197, 201), ("insert", 197, 197)):
            y, y_ln = fastprompt.insert_prompts(t(32, length, 768), t(4, 768), start, ln_w, ln_b, mode=mode,
                                                backend="triton")
            (y.float().sum() + y_ln.float().sum()).backward()
        y, _ = fastprompt.insert_prompts(t(100, 77, 512), t(100, 4, 512), torch.full((100,), 5), mode="replace",
                                         backend="triton")
        y.float().sum().backward()
        # the packed text path: 100 sequences cut at EOT
        lengths = torch.randint(8, 20, (100,))
        cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        y, y_ln = fastprompt.insert_prompts(t(int(cu[-1]), 512), t(4, 512), 1, t(512), t(512), cu_seqlens=cu,
                                            backend="triton")
        (y.float().sum() + y_ln.float().sum()).backward()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100, 80: A100)")
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args()

    driver.set_active(AbsentGPU(args.arch))
    JITFunction.run = compile_only
    failure = None
    try:
        run_ops()
        run_odd_shapes()
    except Exception as e:  # a kernel that does not compile stops the run: report it with what compiled before
        failure = f"{type(e).__name__}: {e}"

    limit = SHARED_LIMIT.get(args.arch, SHARED_LIMIT[80])
    rows, too_big, spills = [], [], []
    for key in sorted(compiled):
        kernel = compiled[key]
        md = kernel.metadata
        regs, stack = ptxas_usage(kernel.asm["cubin"])
        shared = md.shared
        row = (f"| {key} | {regs} | {stack} | {shared} | {md.num_warps} | {md.num_stages} |")
        rows.append(row)
        if shared > limit:
            too_big.append(row)  # the launch would fail: out of resources
        elif stack:
            spills.append(row)  # runs, slower: to be measured on the GPU
    header = [f"Triton {triton.__version__}, torch {torch.__version__}, sm_{args.arch}: {len(compiled)} kernels "
              f"compiled", "", "| kernel | registers | stack bytes (spills) | shared bytes | warps | stages |",
              "|---|---|---|---|---|---|"]
    text = "\n".join(header + rows)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if failure:
        print(f"\nFAILED to compile: {failure}", file=sys.stderr)
    for row in too_big:
        print(f"more shared memory than sm_{args.arch} has: {row}", file=sys.stderr)
    for row in spills:
        print(f"spills registers to local memory (a cost, not an error): {row}", file=sys.stderr)
    return 1 if failure or too_big else 0


if __name__ == "__main__":
    sys.exit(main())
