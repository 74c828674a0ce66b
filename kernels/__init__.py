"""Triton kernels of fastprompt (installed as `fastprompt.kernels`).

Importing this package registers the `triton` backend's implementation of each op with
fastprompt.backends: one module per op holds its kernels, launchers and raw custom ops
(`fastprompt::<op>_{fwd,bwd}_triton`). Set TRITON_INTERPRET=1 before the import to run them on CPU
tensors (slow, for tests).
"""

from . import insert  # noqa: F401
from . import insert_packed  # noqa: F401
from . import dafe  # noqa: F401
from . import cmpa  # noqa: F401
