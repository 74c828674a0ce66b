"""Functional forms of every fastprompt op. Each takes `backend=` ("auto" by default)."""

from ..reference.cmpa import CMPASideParams
from .cmpa import CrossModalPromptAttentionFunction, cross_modal_prompt_attention
from .dafe import DeepAdaptiveFeatureEnhancementFunction, dafe_fusion
from .insert import InsertPromptsFunction, InsertPromptsPackedFunction, insert_prompts

__all__ = [
    "CMPASideParams",
    "cross_modal_prompt_attention",
    "dafe_fusion",
    "insert_prompts",
    "CrossModalPromptAttentionFunction",
    "DeepAdaptiveFeatureEnhancementFunction",
    "InsertPromptsFunction",
    "InsertPromptsPackedFunction",
]
