"""The ops. Each is declared once in fastprompt/ops/<op>.py (the schemas of its raw ops, their fakes, the
problem its backends read, the checks of its inputs); its functional form, exported here, is in
fastprompt/ops/functional.py. Every functional form takes `backend=` ("auto" by default)."""

from .cmpa import CMPASideParams
from .functional import (CrossModalPromptAttentionFunction, DeepAdaptiveFeatureEnhancementFunction,
                         InsertPromptsFunction, InsertPromptsPackedFunction, cross_modal_prompt_attention, dafe_fusion,
                         insert_prompts)

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
