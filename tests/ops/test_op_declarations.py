"""Every op is declared once (fastprompt/ops/<op>.py) and every backend implements that declaration:

- the CUDA binding's schemas (csrc/bindings.cpp, TORCH_LIBRARY_FRAGMENT) are the declared ones, read from the
  source, so this runs without a build; a loaded library is compared too (tests/kernels/test_cuda_extension.py), and the
  cuda backend refuses one whose schemas differ;
- the raw ops the reference and Triton backends define have the declared schemas;
- the list of ops (`backends.OPS`, `fastprompt info`, the tests' parameters) is the declarations', and holds
  every declaration in fastprompt/ops/;
- each op's backends are found by module name: fastprompt/reference/<op>.py and kernels/<op>.py.
"""

import ast
import re
from pathlib import Path

import pytest
import torch

from fastprompt import backends, declaration, info
from fastprompt.declaration import STAGES, ImplementationMissing, Op, declared, find

ROOT = Path(__file__).resolve().parents[2]


def cpp_schemas() -> dict[str, str]:
    """name -> schema of every `m.def("...")` in csrc/bindings.cpp (adjacent string literals joined)."""
    source = (ROOT / "csrc" / "bindings.cpp").read_text()
    schemas = {}
    for call in re.findall(r'm\.def\(((?:\s*"(?:[^"\\]|\\.)*")+)', source):
        text = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', call))
        schemas[text.split("(", 1)[0]] = f"fastprompt::{text}"
    return schemas


def cpp_impls(dispatch_key: str) -> set[str]:
    """The ops registered with m.impl in csrc/bindings.cpp's TORCH_LIBRARY_IMPL(fastprompt, <key>, m) block."""
    source = (ROOT / "csrc" / "bindings.cpp").read_text()
    block = re.search(rf"TORCH_LIBRARY_IMPL\(fastprompt, {dispatch_key}, m\) \{{(.*?)\n\}}", source, re.S).group(1)
    return set(re.findall(r'm\.impl\("(\w+)"', block))


def _parsed(schema: str) -> str:
    return str(torch._C.parse_schema(schema))


def test_the_binding_defines_every_declared_op_with_its_schema():
    schemas = cpp_schemas()
    assert "cmpa_fwd_cuda" in schemas and "cuda_build_info" in schemas  # the source was read
    raw = {op.raw_name(stage, "cuda"): op.schema(stage, "cuda") for op in declared() for stage in STAGES}
    for name, declared_schema in raw.items():
        assert name in schemas, f"csrc/bindings.cpp defines no {name}"
        assert _parsed(schemas[name]) == _parsed(declared_schema), (
            f"csrc/bindings.cpp defines\n  {_parsed(schemas[name])}\nbut the declaration says\n  {_parsed(declared_schema)}")
    strays = {name for name in schemas if re.fullmatch(r"\w+_(fwd|bwd)_cuda", name)} - set(raw)
    assert not strays, f"raw ops in csrc/bindings.cpp that no op declares: {sorted(strays)}"
    for key in ("CUDA", "CPU"):  # the kernels on CUDA tensors; the checks (and the emulator) on CPU tensors
        assert cpp_impls(key) == set(raw), key


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("op", backends.OPS)
def test_python_raw_ops_have_the_declared_schemas(op, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    impl = backends.implementation(op, backend)
    assert impl is not None, backends.unavailable_reason(op, backend, torch.device("cpu"))
    for stage, raw in (("fwd", impl.forward), ("bwd", impl.backward)):
        assert str(raw._schema) == _parsed(find(op).schema(stage, backend))


@pytest.mark.parametrize("op", backends.OPS)
def test_a_loaded_cuda_library_has_the_declared_schemas(op):
    """Where the extension or the emulator loads, its ops are the declared ones (`implement` checked it)."""
    reason = backends.load_error("cuda")
    if reason is not None:
        pytest.skip(reason)
    impl = backends.implementation(op, "cuda")
    assert impl is not None, backends.unavailable_reason(op, "cuda", torch.device("cpu"))
    assert str(impl.forward._schema) == _parsed(find(op).schema("fwd", "cuda"))
    assert str(impl.backward._schema) == _parsed(find(op).schema("bwd", "cuda"))


def test_the_list_of_ops_is_the_declarations():
    declarations = set()
    for path in sorted((ROOT / "fastprompt" / "ops").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "Op":
                declarations.add(node.args[0].value)
    assert {"cmpa", "dafe", "insert_prompts", "insert_prompts_packed"} <= declarations  # the scan reads them
    assert set(backends.OPS) == declarations  # `import fastprompt` imports every declaration
    assert set(info.report()["ops"]) == declarations


@pytest.mark.parametrize("op", backends.OPS)
def test_backends_are_found_by_module_name(op):
    assert (ROOT / "fastprompt" / "reference" / f"{op}.py").exists()
    assert (ROOT / "kernels" / f"{op}.py").exists()
    assert backends.implementation(op, "reference").functions[0].__module__ == f"fastprompt.reference.{op}"


@pytest.fixture
def undeclared_op():
    """An op declared for the test only (taken out of the list of ops afterwards), implemented nowhere."""
    name = "test_only_nowhere"
    op = Op(name, forward="(Tensor x) -> Tensor", backward="(Tensor g) -> Tensor", forward_fake=lambda x: x,
            backward_fake=lambda g: g, problem=("dtype",))
    try:
        yield op
    finally:
        declaration._declared.pop(name)


def test_a_backend_without_a_module_for_an_op_says_so(undeclared_op):
    reason = backends.unavailable_reason(undeclared_op, "reference", torch.device("cpu"))
    assert reason == ("this version of fastprompt has no reference implementation of test_only_nowhere "
                      "(no module fastprompt.reference.test_only_nowhere)")
    with pytest.raises(backends.BackendUnavailableError, match="cannot run test_only_nowhere here"):
        backends.select(undeclared_op, "reference", torch.device("cpu"), {})


def test_ops_defined_in_cpp_must_have_the_declared_schemas(undeclared_op):
    with pytest.raises(ImplementationMissing, match="defines no fastprompt::test_only_nowhere_fwd_cuda"):
        undeclared_op.implement("cuda")
    torch.library.define("fastprompt::test_only_nowhere_fwd_cuda", "(Tensor y) -> Tensor")
    with pytest.raises(ImplementationMissing, match=r"defines fastprompt::test_only_nowhere_fwd_cuda\(Tensor y\) "
                       r"-> Tensor, but the declaration says .*\(Tensor x\)"):
        undeclared_op.implement("cuda")
    assert undeclared_op.implementation("cuda") is None


def test_problem_descriptions_hold_the_declared_keys():
    dafe = find("dafe")
    assert dafe.problem_of(dtype=torch.float32, n=1, m=2, d=3, gate="token", shared_task=True)["m"] == 2
    with pytest.raises(ValueError, match=r"missing \['shared_task'\], unexpected \['width'\]"):
        dafe.problem_of(dtype=torch.float32, n=1, m=2, d=3, gate="token", width=3)


def test_an_op_is_implemented_once_per_backend():
    cmpa = find("cmpa")
    assert backends.implementation(cmpa, "reference") is not None
    with pytest.raises(ValueError, match="already implemented on the reference backend"):
        cmpa.implement("reference", lambda *a: None, lambda *a: None)
    with pytest.raises(ValueError, match="unknown backend"):
        cmpa.implement("tpu", lambda *a: None, lambda *a: None)
