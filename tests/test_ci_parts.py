"""`make test` runs the suite as parts side by side (.ci/test_parts.py): every test file must be in exactly one
part run under the interpreter, so that cutting the suite never drops a file, a new one included."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / ".ci" / "test_parts.py"

pytestmark = pytest.mark.skipif(not DRIVER.exists(), reason="a source checkout's .ci/ folder is needed")


def _driver():
    spec = importlib.util.spec_from_file_location("test_parts", DRIVER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_test_file_is_in_exactly_one_main_part():
    driver = _driver()
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py"))
    listed = [f for _, kind, args in driver.PARTS if kind == "main"
              for f in (driver._rest() if args is None else args)]
    assert sorted(listed) == files  # each once, none missing
    for _, kind, args in driver.PARTS:
        for arg in args or []:
            if arg.startswith("tests/"):
                assert (ROOT / arg).exists(), arg  # a part naming a file that is gone fails here, not silently


def test_the_parts_keep_what_the_suite_checked(monkeypatch):
    driver = _driver()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("FASTPROMPT_EXPECT_CUDA_EXTENSION", "1")  # as in the part that runs this file
    kinds = {name: kind for name, kind, _ in driver.PARTS}
    assert kinds["emulator"] == "emulated" and kinds["emulator-reversed"] == "emulated-reverse"
    env = driver._env("emulated-reverse", expect_extension=True, jobs=2)
    assert env["FASTPROMPT_CUDA_EMULATE"] == "1" and env["FASTPROMPT_CUDA_EMULATE_ORDER"] == "reverse"
    assert "FASTPROMPT_EXPECT_CUDA_EXTENSION" not in env  # the emulator replaces the extension in its processes
    main = driver._env("main", expect_extension=True, jobs=2)
    assert main["TRITON_INTERPRET"] == "1" and main["FASTPROMPT_EXPECT_CUDA_EXTENSION"] == "1"
    assert main["OMP_NUM_THREADS"] == "1"  # two parts side by side never oversubscribe the cores
    assert "TRITON_INTERPRET" not in driver._env("bench", expect_extension=False, jobs=1)
