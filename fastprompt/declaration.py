"""What an op is, once: `Op`, the declaration every backend of an op implements.

An op is a pair of raw `torch.library` ops per backend, `fastprompt::<name>_fwd_<backend>` and
`fastprompt::<name>_bwd_<backend>`, that all take and return the same things. The declaration
(`fastprompt/ops/<name>.py`) says it once: the name, the schema of the forward and of the backward (what
torch.library shows: arguments and returns), the fakes (output shapes for torch.compile and opcheck), and
the keys of the problem description that the backends' `supports(problem)` read. A backend module
implements it with one call:

    CMPA.implement("triton", forward, backward, supports)

which defines the two raw ops from the Python functions with the declared schemas, gives them the declared
fakes, and records the implementation. The cuda backend's raw ops are defined in C++ (csrc/bindings.cpp),
so `implement("cuda", supports=...)` finds them, checks their schemas against the declaration and gives
them the fakes (fastprompt/ops/cuda.py).

Backends are found by module name (fastprompt/backends.py), so nothing here imports a backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

BACKENDS = ("reference", "triton", "cuda")
STAGES = ("fwd", "bwd")


def supports_everything(problem: dict) -> Optional[str]:
    return None


@dataclass(frozen=True)
class OpImpl:
    """One backend's implementation of one op: its raw forward and backward ops (`torch.ops` overloads).

    `supports(problem)` returns None when the backend can serve the problem (a dict with the declared keys)
    or a sentence saying why not. `functions` are the Python functions the raw ops run (None where C++
    defines them).
    """

    op: str
    backend: str
    forward: Callable
    backward: Callable
    supports: Callable[[dict], Optional[str]]
    functions: Optional[tuple[Callable, Callable]] = None


class ImplementationMissing(RuntimeError):
    """A backend module that should implement an op does not (or not with the declared schemas); the message
    says what is wrong."""


_declared: dict[str, "Op"] = {}


class Op:
    """The declaration of one op (see the module docstring).

    Args:
        name: the op's one name (its raw ops, its backends' modules `fastprompt.<backend package>.<name>`,
            error messages, `fastprompt info`).
        forward, backward: the schemas of the raw ops without their names, "(Tensor x, ...) -> (Tensor, ...)".
        forward_fake: the fake of the forward of the kernel backends (triton and cuda save the same tensors); a
            backend that saves other ones gives its own to `implement`.
        backward_fake: the fake of every backend's backward (gradients shaped like the inputs).
        problem: the keys of the problem description the functional builds (`problem_of`) and every
            backend's `supports` reads.
    """

    def __init__(self, name: str, *, forward: str, backward: str, forward_fake: Callable, backward_fake: Callable,
                 problem: tuple[str, ...]):
        if name in _declared:
            raise ValueError(f"an op named {name!r} is declared twice")
        self.name = name
        self.schemas = {"fwd": forward, "bwd": backward}
        self.fakes = {"fwd": forward_fake, "bwd": backward_fake}
        self.problem_keys = tuple(problem)
        self._implementations: dict[str, OpImpl] = {}
        _declared[name] = self

    def __repr__(self) -> str:
        return f"Op({self.name!r})"

    def raw_name(self, stage: str, backend: str) -> str:
        """The raw op's name in the fastprompt namespace, "cmpa_fwd_triton"."""
        return f"{self.name}_{stage}_{backend}"

    def schema(self, stage: str, backend: str) -> str:
        """The full schema of a raw op as torch.library prints it, "fastprompt::cmpa_fwd_triton(Tensor visual, ...) -> ..."."""
        return f"fastprompt::{self.raw_name(stage, backend)}{self.schemas[stage]}"

    def problem_of(self, **values) -> dict:
        """The problem description, checked to hold exactly the declared keys."""
        if set(values) != set(self.problem_keys):
            missing, extra = set(self.problem_keys) - set(values), set(values) - set(self.problem_keys)
            raise ValueError(f"{self.name}: the problem description takes {self.problem_keys}; "
                             f"missing {sorted(missing)}, unexpected {sorted(extra)}")
        return dict(values)

    def implement(self, backend: str, forward: Optional[Callable] = None, backward: Optional[Callable] = None,
                  supports: Callable[[dict], Optional[str]] = supports_everything, *,
                  forward_fake: Optional[Callable] = None) -> OpImpl:
        """Implement the op on `backend`: the raw ops fastprompt::<name>_{fwd,bwd}_<backend> with the declared
        schemas and fakes, recorded so that the dispatch finds them.

        forward, backward: the Python functions the raw ops run. Both None: the raw ops are already defined (in
            C++, with TORCH_LIBRARY_FRAGMENT); their schemas must be the declared ones.
        supports: None for a problem the backend serves, else why not.
        forward_fake: a fake for this backend's forward when it saves other tensors than the declaration's.
        """
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; backends are {BACKENDS}")
        if backend in self._implementations:
            raise ValueError(f"{self.name} is already implemented on the {backend} backend")
        if (forward is None) != (backward is None):
            raise ValueError("give both the forward and the backward function, or neither (ops defined in C++)")
        fakes = dict(self.fakes, fwd=forward_fake or self.fakes["fwd"])
        raw = {}
        for stage, fn in (("fwd", forward), ("bwd", backward)):
            qualname = f"fastprompt::{self.raw_name(stage, backend)}"
            if fn is not None:
                torch.library.custom_op(qualname, fn, mutates_args=(), schema=self.schemas[stage])
            else:
                self._check_defined(stage, backend)
            torch.library.register_fake(qualname)(fakes[stage])
            raw[stage] = getattr(torch.ops.fastprompt, self.raw_name(stage, backend)).default
        impl = OpImpl(self.name, backend, raw["fwd"], raw["bwd"], supports,
                      None if forward is None else (forward, backward))
        self._implementations[backend] = impl
        return impl

    def _check_defined(self, stage: str, backend: str) -> None:
        name = self.raw_name(stage, backend)
        try:
            defined = str(getattr(torch.ops.fastprompt, name).default._schema)
        except (AttributeError, RuntimeError):
            raise ImplementationMissing(f"the loaded library defines no fastprompt::{name}") from None
        declared = str(torch._C.parse_schema(self.schema(stage, backend)))
        if defined != declared:
            raise ImplementationMissing(f"the loaded library defines {defined}, but the declaration says {declared} "
                                        "(a build of other sources: rebuild it)")

    def implementation(self, backend: str) -> Optional[OpImpl]:
        """This op's implementation on `backend`, if its module has been loaded (fastprompt.backends loads it)."""
        return self._implementations.get(backend)


def declared() -> tuple[Op, ...]:
    """Every declared op, by name (the declarations are imported with fastprompt)."""
    return tuple(_declared[name] for name in sorted(_declared))


def find(op: Op | str) -> Op:
    """The declaration of `op` (a declaration or its name)."""
    if isinstance(op, Op):
        return op
    try:
        return _declared[op]
    except KeyError:
        raise ValueError(f"unknown op {op!r}; ops are {tuple(sorted(_declared))}") from None
