"""The `fastprompt` command: info (CLI and python -m) and the demo."""

import json
import subprocess
import sys

from fastprompt import backends, cli

from ..helpers import CUDA_EMULATED


def test_python_m_fastprompt_info_reports_every_op_and_backend():
    out = subprocess.run([sys.executable, "-m", "fastprompt", "info"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for word in ["fastprompt 0.1.0", "torch", "triton", "extension fastprompt._C", *backends.OPS]:
        assert word in text
    assert "reference  cpu   yes" in text


def test_info_says_why_the_extension_is_missing_once(capsys):
    data = json.loads(cli.main(["info", "--json"]) == 0 and capsys.readouterr().out)
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    if data["extension"].startswith("loaded"):
        return  # nothing missing to say
    assert text.count(data["extension"]) == 1, text
    cuda_rows = [line for line in text.splitlines() if line.strip().startswith("cuda ")]
    assert cuda_rows and all(r.endswith("yes") or "fastprompt._C is not loaded (why: above)" in r or "emulat" in r
                             for r in cuda_rows), cuda_rows


def test_info_json_is_machine_readable(capsys):
    assert cli.main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["ops"]) == set(backends.OPS)
    for rows in data["ops"].values():
        assert rows["reference"]["cpu"] is None
        if CUDA_EMULATED:  # FASTPROMPT_CUDA_EMULATE=1: the emulator serves CPU tensors
            assert rows["cuda"]["cpu"] is None
        else:
            assert isinstance(rows["cuda"]["cpu"], str)  # the reason it cannot run


def test_demo_checks_every_available_backend_and_passes(capsys):
    assert cli.main(["demo", "--rounds", "1"]) == 0
    text = capsys.readouterr().out
    assert text.count("reference  PASS") == 4
    assert "all checks passed" in text and "op / backend" in text


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "info" in capsys.readouterr().out
