"""Backend loading and selection.

Every op (declared once in fastprompt/ops/<op>.py, see fastprompt/declaration.py) has one implementation per
backend, found by module name: the reference ones when fastprompt.ops is imported (`load_all`), the others the
first time they are needed:

  reference  pure PyTorch, any device, the specification: fastprompt/reference/<op>.py
  triton     Triton kernels, kernels/<op>.py (fastprompt.kernels.<op>): CUDA tensors, or CPU tensors under
             TRITON_INTERPRET=1
  cuda       the compiled extension fastprompt._C (csrc/): CUDA tensors; CPU tensors under
             FASTPROMPT_CUDA_EMULATE=1 (the kernels on a CPU emulator of the GPU, tests only)

Nothing a backend module imports leads back here (the declarations sit below both), so the loading by name
makes no import cycle.

A call picks its backend from, most specific first: the call's `backend=` argument, the module's
`backend` attribute, the innermost `with fastprompt.backend(...)` block, `fastprompt.set_backend(...)`,
the FASTPROMPT_BACKEND environment variable (read at import). "auto" at any of these levels means "no
preference here" and defers to the next one; when nothing is pinned, `auto` takes the first backend of
`AUTO_ORDER` that can serve the inputs. On CPU tensors that is always `reference`: the Triton
interpreter and the CUDA emulator are debugging and testing tools, never a fast path, so `auto` does not
pick them.

A backend that is asked for and cannot serve the inputs raises `BackendUnavailableError` saying why.
There is no silent fallback.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import threading
from typing import Iterator, Optional

import torch

from .declaration import BACKENDS, ImplementationMissing, Op, OpImpl, declared, find

AUTO = "auto"
ENV_VAR = "FASTPROMPT_BACKEND"

# Order in which `auto` tries the backends on CUDA tensors, meant to be fastest first. The CUDA C++
# kernels (one cooperative launch each way for CMPA) have so far only been compiled, never run on a GPU,
# while the Triton kernels' algorithms pass every test under the interpreter: until the GPU check
# (benches/gpu_check.sh) has passed the cuda tests and timed both, auto prefers triton and `cuda` is
# opt-in (backend="cuda"). Revise from benches/results/.
AUTO_ORDER = ("triton", "cuda", "reference")


class BackendUnavailableError(RuntimeError):
    """A backend that was asked for cannot serve the inputs at hand; the message says why."""


def __getattr__(name: str):
    if name == "OPS":  # the names of the declared ops (every one is declared once `import fastprompt` has run)
        return tuple(op.name for op in declared())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------
# Loading. A backend loads at most once (triton: the triton package and fastprompt.kernels; cuda: the
# extension), and each op's implementation on it is found by module name (`implementation`):
#   reference  fastprompt/reference/<op>.py    triton  kernels/<op>.py (fastprompt.kernels.<op>)
#   cuda       the raw ops fastprompt._C defines (csrc/bindings.cpp), given their fakes by fastprompt/ops/cuda.py
# The reasons of failures are kept for the error messages and for `fastprompt info`.

_load_errors: dict[str, Optional[str]] = {"reference": None}
_missing: dict[tuple[str, str], str] = {}  # (op, backend) -> why the backend has no implementation of the op


def _load_triton() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    try:
        _import_kernels()
    except ImportError as exc:
        return f"fastprompt.kernels failed to import: {exc}"
    return None


def _import_kernels() -> None:
    """Import fastprompt.kernels: installed, it is the top-level kernels/ folder mapped into the package; in a
    source checkout used without installing (PYTHONPATH=., as on a GPU machine), that folder is loaded from
    beside the package."""
    try:
        importlib.import_module("fastprompt.kernels")
        return
    except ModuleNotFoundError as exc:
        if exc.name != "fastprompt.kernels":
            raise
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    init = os.path.join(folder, "__init__.py")
    if not os.path.exists(init):
        raise ImportError("fastprompt.kernels is not installed and no kernels/ folder lies beside the package")
    spec = importlib.util.spec_from_file_location("fastprompt.kernels", init, submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastprompt.kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["fastprompt.kernels"]
        raise


def _load_cuda() -> Optional[str]:
    from . import _extension

    return _extension.load()


def load_error(backend: str) -> Optional[str]:
    """Why `backend` cannot be loaded on this machine at all, or None when it loaded. A backend that loads
    implements every declared op at once (load_all): torch.compile traces the dispatch and cannot import a
    module while it traces, so an op first called inside a compiled function must already be there."""
    if backend not in _load_errors:
        _load_errors[backend] = {"triton": _load_triton, "cuda": _load_cuda}[backend]()
        if _load_errors[backend] is None:
            load_all(backend)
    return _load_errors[backend]


def _import_implementation(op: Op, backend: str) -> None:
    """Import the module that implements `op` on `backend` (a loaded backend); it implements the op on import."""
    if backend == "cuda":
        from .ops import cuda

        cuda.implement(op)
        return
    try:
        if backend == "reference":
            importlib.import_module(f"fastprompt.reference.{op.name}")
        else:
            importlib.import_module(f"fastprompt.kernels.{op.name}")
    except ModuleNotFoundError as exc:
        if exc.name != _module_of(op, backend):
            raise
        raise ImplementationMissing(f"this version of fastprompt has no {backend} implementation of {op.name} "
                                    f"(no module {exc.name})") from None
    if op.implementation(backend) is None:
        raise ImplementationMissing(f"{_module_of(op, backend)} does not implement {op.name}: it must call "
                                    f"implement() on the declaration (fastprompt/ops/{op.name}.py)")


def _module_of(op: Op, backend: str) -> str:
    return f"fastprompt.{'reference' if backend == 'reference' else 'kernels'}.{op.name}"


def implementation(op: Op | str, backend: str) -> Optional[OpImpl]:
    """`op`'s implementation on `backend`, loading it on first use; None when the backend cannot be loaded
    here or has none (`unavailable_reason` says why)."""
    op = find(op)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; backends are {BACKENDS}")
    if load_error(backend) is not None or (op.name, backend) in _missing:
        return None
    if op.implementation(backend) is None:
        try:
            _import_implementation(op, backend)
        except ImplementationMissing as exc:
            _missing[(op.name, backend)] = str(exc)
            return None
    return op.implementation(backend)


def load_all(backend: str) -> None:
    """Load `backend`'s implementation of every declared op now: load_error does it when a backend loads, and
    fastprompt.ops for the reference (every op's fallback, there before any call)."""
    for op in declared():
        implementation(op, backend)


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why `backend` cannot run on `device` here, whatever the op, or None."""
    if backend == "reference":
        return None
    reason = load_error(backend)
    if reason is not None:
        return reason
    if backend == "triton":
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpret():
            return None
        if device.type == "cpu":
            return "the tensors are on the CPU: Triton needs CUDA tensors, or TRITON_INTERPRET=1 set before import"
        return f"Triton does not run on {device.type} tensors"
    if backend == "cuda":
        from . import _extension

        if _extension.emulated():
            if device.type == "cpu":
                return None
            return (f"the tensors are on {device.type}: under {_extension.EMULATE_ENV}=1 the cuda backend is the "
                    "CPU emulator, which takes CPU tensors")
        if device.type != "cuda":
            return f"the tensors are on {device.type}: the cuda backend needs CUDA tensors"
        return None
    raise ValueError(f"unknown backend {backend!r}")


def unavailable_reason(op: Op | str, backend: str, device: torch.device, problem: Optional[dict] = None
                       ) -> Optional[str]:
    """Why `backend` cannot run `op` on `device` for `problem` (None: it can)."""
    op = find(op)
    reason = device_unavailable_reason(backend, device)
    if reason is not None:
        return reason
    impl = implementation(op, backend)
    if impl is None:
        return _missing[(op.name, backend)]
    if problem is not None:
        return impl.supports(problem)
    return None


# ----------------------------------------------------------------------------------------------
# Selection state

def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS + (AUTO,):
        raise ValueError(f"{what} must be one of {BACKENDS + (AUTO,)}, got {name!r}")
    return name


_env_choice = os.environ.get(ENV_VAR, AUTO).strip().lower() or AUTO
if _env_choice not in BACKENDS + (AUTO,):
    raise ValueError(f"{ENV_VAR}={_env_choice!r} is not one of {BACKENDS + (AUTO,)}")
_global_choice: Optional[str] = None
_local = threading.local()


def _stack() -> list:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def set_backend(name: Optional[str]) -> None:
    """Set the process-wide backend (None: back to FASTPROMPT_BACKEND, else auto)."""
    global _global_choice
    _global_choice = None if name is None else _check_name(name, "set_backend(name)")


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Use `name` for every op called inside the block (unless a call or module pins another)."""
    stack = _stack()
    stack.append(_check_name(name, "fastprompt.backend(name)"))
    try:
        yield
    finally:
        stack.pop()


def current_backend() -> str:
    """The backend in force here when neither the call nor the module pins one."""
    stack = _stack()
    if stack:
        return stack[-1]
    if _global_choice is not None:
        return _global_choice
    return _env_choice


def select(op: Op | str, requested: str, device: torch.device, problem: dict) -> OpImpl:
    """The implementation that runs `op` (its declaration or its name) for a call that asked for `requested`."""
    op = find(op)
    name = _check_name(requested, "backend")
    if name == AUTO:
        name = current_backend()
    if name != AUTO:
        reason = unavailable_reason(op, name, device, problem)
        if reason is not None:
            raise BackendUnavailableError(f"fastprompt: backend {name!r} cannot run {op.name} here: {reason}")
        return op.implementation(name)
    if device.type == "cuda":
        for candidate in AUTO_ORDER:
            if unavailable_reason(op, candidate, device, problem) is None:
                return op.implementation(candidate)
    return implementation(op, "reference")


def available_backends(op: Optional[Op | str] = None, device: Optional[torch.device | str] = None) -> list[str]:
    """Backends that can run `op` (every op when None) on `device` (default: cuda if present, else cpu)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    ops = declared() if op is None else (find(op),)
    return [b for b in BACKENDS if all(unavailable_reason(o, b, device) is None for o in ops)]
