"""The package's shape, read from its sources (nothing is imported):

1. no import cycle among the modules of fastprompt and fastprompt.kernels, counting `import` and `from`
   statements at any depth (a function-level import is an edge too) and modules loaded by importlib: a string
   literal is an edge to that module, an f-string with a literal head (`f"fastprompt.kernels.{op.name}"`) an
   edge to every module under that head; an importlib load the graph cannot resolve fails the test. What is
   not an edge: a package's __init__ running before its submodules (every submodule would otherwise be in a
   cycle with a package that re-exports it, fastprompt itself first).
2. a folder reaches no private name (leading underscore) of another folder of the package: no private module
   (`fastprompt._alloc`), no private name imported from one, no private attribute of a module or object
   imported from one (`backends._impls`). Parametrized over the folders that must hold to it.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# the package's source folders and the module names they hold (kernels/ is installed as fastprompt.kernels)
SOURCES = {"fastprompt": ROOT / "fastprompt", "fastprompt.kernels": ROOT / "kernels"}


def module_files() -> dict[str, Path]:
    """module name -> source file, for every module of fastprompt and fastprompt.kernels."""
    found = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _is_package(name: str, files: dict[str, Path]) -> bool:
    return files[name].name == "__init__.py"


def _absolute(module: str, node: ast.ImportFrom, files: dict[str, Path]) -> str:
    """The absolute module a `from` statement names."""
    if not node.level:
        return node.module or ""
    base = module if _is_package(module, files) else module.rsplit(".", 1)[0]
    for _ in range(node.level - 1):
        base = base.rsplit(".", 1)[0]
    return f"{base}.{node.module}" if node.module else base


def _known_prefix(name: str, files: dict[str, Path]) -> str | None:
    """The longest module of the package that `name` is or lies in (None: not the package's)."""
    while name:
        if name in files:
            return name
        name = name.rpartition(".")[0]
    return None


class UnresolvedImport(Exception):
    pass


def _literal_head(module: str, arg: ast.JoinedStr) -> str:
    """The literal start of an f-string, `__name__` read as the module's name."""
    head = ""
    for value in arg.values:
        if isinstance(value, ast.Constant):
            head += value.value
        elif isinstance(value.value, ast.Name) and value.value.id == "__name__":
            head += module
        else:
            break
    return head


def _importlib_targets(module: str, call: ast.Call, files: dict[str, Path]) -> list[str] | None:
    """The modules an importlib.import_module / spec_from_file_location call loads; None when it is no such call."""
    func = ast.unparse(call.func)
    if func not in ("importlib.import_module", "import_module", "importlib.util.spec_from_file_location",
                    "spec_from_file_location"):
        return None
    arg = call.args[0] if call.args else None
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return [arg.value]
    if isinstance(arg, ast.JoinedStr) and _literal_head(module, arg):
        head = _literal_head(module, arg)
        return [name for name in files if name.startswith(head)]
    raise UnresolvedImport(f"{module}: {ast.unparse(call)} is a load the import graph cannot resolve")


def imports_of(module: str, files: dict[str, Path]) -> set[str]:
    """The modules of the package that `module` imports (see the module docstring)."""
    tree = ast.parse(files[module].read_text(), str(files[module]))
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node, files)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in files else base)
        elif isinstance(node, ast.Call):
            loaded = _importlib_targets(module, node, files)
            if loaded is not None:
                targets.update(loaded)
    # a name that is no source module of the package (a compiled extension: fastprompt._C) is no edge
    return {name for name in targets if name in files and name != module}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(name, files) for name in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a path (its first node repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_holds_the_loads_by_module_name():
    """The edges the dispatch makes with importlib are in the graph (so the next test sees them)."""
    graph = import_graph()
    assert {"fastprompt.kernels.cmpa", "fastprompt.kernels.insert_prompts_packed", "fastprompt.reference.dafe",
            "fastprompt.kernels"} <= graph["fastprompt.backends"]
    assert "fastprompt.ops.cmpa" in graph["fastprompt.kernels.cmpa"]
    assert "fastprompt.ops.cmpa" in graph["fastprompt.ops.functional"]  # `from .cmpa import ...`


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# ---- private names -------------------------------------------------------------------------------------------

def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_reaches(module: str, source: str, folder: str, files: dict[str, Path]) -> list[str]:
    """Where `source` (module `module`, in the package folder `folder`, a module name prefix) reaches a private
    name of a module of the package outside that folder: as lines "line N: what"."""
    def outside(name: str) -> bool:
        known = _known_prefix(name, files)
        return known is not None and not (known == folder or known.startswith(folder + "."))

    def private_path(name: str) -> bool:
        return any(_private(part) for part in name.split("."))

    found, bound = [], {}  # bound: a local name -> the outside module or object it was imported as
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if outside(alias.name) and private_path(alias.name):
                    found.append(f"line {node.lineno}: import {alias.name}")
                if outside(alias.name):
                    bound[(alias.asname or alias.name).split(".")[0]] = alias.name
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node, files)
            if not outside(base):
                continue
            for alias in node.names:
                what = f"{base}.{alias.name}"
                if private_path(what):
                    found.append(f"line {node.lineno}: from {base} import {alias.name}")
                bound[alias.asname or alias.name] = what
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in bound:
                found.append(f"line {node.lineno}: {ast.unparse(node)} ({root.id} is {bound[root.id]})")
    return found


def test_the_private_name_check_finds_them():
    files = module_files()
    source = ("from fastprompt import backends\nfrom fastprompt._alloc import empty\nimport fastprompt._extension\n"
              "from fastprompt.ops.cmpa import CMPA, _forward_fake\nfrom . import _common\n"
              "x = backends._load_errors\ny = CMPA._implementations\nz = backends.select\n")
    found = private_reaches("fastprompt.kernels.cmpa", source, "fastprompt.kernels", files)
    assert [line.split(":")[0] for line in found] == ["line 2", "line 3", "line 4", "line 6", "line 7"], found


# The folders that reach no private name of another folder.
@pytest.mark.parametrize("folder", ["kernels", "fastprompt/methods", "fastprompt/clip", "fastprompt/train"])
def test_folder_reaches_no_private_name_of_another_folder(folder):
    files = module_files()
    package = "fastprompt.kernels" if folder == "kernels" else folder.replace("/", ".")
    modules = [name for name in files if name == package or name.startswith(package + ".")]
    assert modules, f"no modules in {folder}"
    found = {name: private_reaches(name, files[name].read_text(), package, files) for name in modules}
    found = {name: lines for name, lines in found.items() if lines}
    assert not found, found
