"""`make test` runs the suite as parts side by side (.ci/test_parts.py): every test file must be in exactly one
part run under the interpreter, so that cutting the suite never drops a file, a new one included."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DRIVER = ROOT / ".ci" / "test_parts.py"

pytestmark = pytest.mark.skipif(not DRIVER.exists(), reason="a source checkout's .ci/ folder is needed")


def _driver():
    spec = importlib.util.spec_from_file_location("test_parts", DRIVER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_test_file_is_in_exactly_one_main_part():
    driver = _driver()
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py"))
    listed = [f for _, kind, args in driver.PARTS if kind == "main"
              for f in (driver._rest() if args is None else driver.test_files(args))]
    assert sorted(listed) == files  # each once, none missing
    for _, kind, args in driver.PARTS:
        for arg in args or []:
            if arg.startswith("tests/") or arg.startswith("--ignore=tests/"):
                assert (ROOT / arg.split("=")[-1]).exists(), arg  # a part naming a path that is gone fails here


def test_the_op_tests_are_a_folder():
    """The emulator parts select the op tests by folder, which holds one test file per op, named after it (the
    packed insertion is insert_prompts with cu_seqlens=, tested beside it)."""
    from fastprompt import backends

    driver = _driver()
    assert driver.OPS == "tests/ops"
    for op in backends.OPS:
        name = "insert_prompts" if op == "insert_prompts_packed" else op
        assert (ROOT / driver.OPS / f"test_{name}.py").exists(), op
