"""fastprompt: fused Triton and CUDA C++ kernels for multi-modal prompt learning on CLIP.

    import fastprompt
    cmpa = fastprompt.CrossModalPromptAttention(768, 12, 512, 8, fusing="mean")
    with fastprompt.backend("reference"):
        new_visual, new_text = cmpa(visual_context, textual_context)

See README.md for the backends and the ops.
"""

__version__ = "0.1.0"

import warnings as _warnings

from . import _extension
from .backends import BackendUnavailableError, available_backends, backend, set_backend
from .modules import CrossModalPromptAttention, DeepAdaptiveFeatureEnhancement
from .ops import insert_prompts

__all__ = [
    "CrossModalPromptAttention",
    "DeepAdaptiveFeatureEnhancement",
    "insert_prompts",
    "backend",
    "set_backend",
    "available_backends",
    "BackendUnavailableError",
    "__version__",
]

# A fastprompt._C built for another torch or CUDA (an old build in a checkout, a wheel for another torch) is
# said at import with both versions, read from the file without loading it; the cuda backend is then
# unavailable and every other one works.
_mismatch = _extension.installed_build_mismatch()
if _mismatch is not None:
    _warnings.warn(f"{_mismatch} (until then the cuda backend is unavailable; the other backends work)",
                   RuntimeWarning, stacklevel=2)
del _mismatch
