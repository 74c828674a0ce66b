"""The Triton kernels compile for a real GPU target (sm_90), not only run under the interpreter.

The interpreter executes a kernel's Python; it does not run Triton's compiler, which refuses programs the
interpreter accepts (a variable given different shapes in the two branches of an `if` was one, found this
way) and decides the shared memory a launch needs. tools/triton_compile_check.py compiles every kernel the
ops launch at the ViT-B/16 shapes in fp32, fp16 and bf16 for an absent H100, with the ptxas Triton ships.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "triton_compile_check.py"

pytestmark = pytest.mark.skipif(not TOOL.exists(), reason="a source checkout's tools/ folder is needed")


@pytest.mark.parametrize("arch", [90, 80])
def test_every_triton_kernel_compiles_for_the_gpu_within_its_shared_memory(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, str(TOOL), "--arch", str(arch)], capture_output=True, text=True,
                         env=env, timeout=600)
    report = run.stdout + run.stderr
    assert run.returncode == 0, report
    assert "FAILED" not in report and "more shared memory" not in report, report
    compiled = int(report.split(" kernels compiled")[0].rsplit(" ", 1)[1])
    # every kernel module contributes: CMPA's stages, DAFE's three gates, insertion N×L and packed
    for name in ("_pool_kernel", "_attn_bwd_kernel", "_dafe_fwd_channel_kernel", "_dafe_bwd_channel_gemm_kernel",
                 "_dafe_bwd_rowwise_kernel", "_insert_fwd_kernel", "_insert_bwd_kernel", "_packed_"):
        assert name in report, f"{name} was never compiled:\n{report}"
    assert compiled >= 40, report
