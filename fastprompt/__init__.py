"""fastprompt: fused Triton and CUDA C++ kernels for multi-modal prompt learning on CLIP.

    import fastprompt
    cmpa = fastprompt.CrossModalPromptAttention(768, 12, 512, 8, fusing="mean")
    with fastprompt.backend("reference"):
        new_visual, new_text = cmpa(visual_context, textual_context)

See README.md for the backends and the ops.
"""

__version__ = "0.1.0"

from . import reference as _reference  # noqa: F401  registers the reference backend
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
