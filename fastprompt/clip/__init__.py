"""CLIP integration: open_clip models driven block by block for prompt methods."""

from .backbone import (NO_HOOKS, BlockHooks, ClipBackbone, UnsupportedModelError, apply_block, block_forward,
                       run_blocks)
from .models import SMALL_CONFIGS, create_clip
from .text import Slot, TokenizedPrompts, clean_classname, tokenize_templates, tokenize_words

__all__ = ["apply_block", "BlockHooks", "ClipBackbone", "NO_HOOKS", "Slot", "SMALL_CONFIGS", "TokenizedPrompts",
           "UnsupportedModelError", "block_forward", "clean_classname", "create_clip", "run_blocks",
           "tokenize_templates", "tokenize_words"]
