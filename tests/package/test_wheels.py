"""The two wheels of tools/build_wheels.sh, built from a copy of the checkout: the pure one is plain 0.1.0 for
any torch>=2.4 without the extension; the CUDA one carries fastprompt._C, names the CUDA and torch it was built
with in its local version and pins that torch major.minor. (Slow: about a minute of nvcc for sm_90.)"""

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import fastprompt

REPO = Path(__file__).resolve().parents[2]


def _metadata(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return z.read(name).decode()


def _names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        return z.namelist()


@pytest.mark.slow
def test_build_wheels(tmp_path):
    if shutil.which("nvcc") is None:
        if os.environ.get("FASTPROMPT_EXPECT_CUDA_EXTENSION") == "1":
            pytest.fail("FASTPROMPT_EXPECT_CUDA_EXTENSION=1 but nvcc is not on PATH")
        pytest.skip("no nvcc on PATH")
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO, checkout, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.so", "__pycache__", "*.egg-info", ".pytest_cache", ".benchmarks",
        ".hypothesis", ".whl", "results"))
    env = dict(os.environ, PYTHON=sys.executable, TORCH_CUDA_ARCH_LIST="9.0")
    out = subprocess.run(["bash", "tools/build_wheels.sh", str(tmp_path / "dist")], cwd=checkout, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    wheels = sorted((tmp_path / "dist").glob("fastprompt-*.whl"))
    assert len(wheels) == 2, wheels
    pure = next(w for w in wheels if w.name.endswith("-py3-none-any.whl"))
    binary = next(w for w in wheels if w is not pure)

    version = fastprompt.__version__
    assert pure.name == f"fastprompt-{version}-py3-none-any.whl"
    assert re.search(rf"^Version: {re.escape(version)}$", _metadata(pure), re.M)
    assert re.search(r"^Requires-Dist: torch>=2\.4$", _metadata(pure), re.M)
    assert not any("_C." in n for n in _names(pure))
    assert "fastprompt/kernels/cmpa.py" in _names(pure)  # the Triton kernels travel in both

    torch_mm = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    local = f"cu{torch.version.cuda.replace('.', '')}torch{torch_mm}"
    assert binary.name.startswith(f"fastprompt-{version}+{local}-cp{sys.version_info.major}{sys.version_info.minor}-")
    assert re.search(rf"^Version: {re.escape(version)}\+{local}$", _metadata(binary), re.M)
    assert re.search(rf"^Requires-Dist: torch=={re.escape(torch_mm)}\.\*$", _metadata(binary), re.M)
    assert any(re.fullmatch(r"fastprompt/_C\..*\.so", n) for n in _names(binary))
