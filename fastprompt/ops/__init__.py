"""The ops. Each is declared once in fastprompt/ops/<op>.py (the schemas of its raw ops, their fakes, the
problem its backends read, the checks of its inputs); its functional form, exported here, is in
fastprompt/ops/functional.py. Every functional form takes `backend=` ("auto" by default)."""

from .. import backends
from . import functional
from .cmpa import CMPASideParams
from .functional import *  # noqa: F401,F403  (functional.__all__)

__all__ = ["CMPASideParams", *functional.__all__]

backends.load_all("reference")  # every op is declared by now (functional imports the declarations)
