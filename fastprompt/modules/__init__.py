"""nn.Modules over the fused ops."""

from .cmpa import CrossModalPromptAttention
from .dafe import DeepAdaptiveFeatureEnhancement

__all__ = ["CrossModalPromptAttention", "DeepAdaptiveFeatureEnhancement"]
