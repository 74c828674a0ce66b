"""CLIP integration: open_clip models driven block by block for prompt methods.

blocks.py   one open_clip block read through an adapter (the only reader of a block's structure)
backbone.py the frozen CLIP: the model's checks, embeddings, features, the towers' blocks
packed.py   the packed text path's layout and its blocks (sequences cut at EOT, a shared prefix once)
streams.py  the towers stepped block by block: image and text streams, the joint driver, profiler scopes
models.py   creating CLIPs; text.py: token sequences with slots for prompt rows
"""

from .backbone import ClipBackbone
from .blocks import ClipBlock, UnsupportedModelError, apply_block, block_forward
from .models import SMALL_CONFIGS, create_clip, unwrap_state_dict
from .packed import PackedLayout, make_layout
from .streams import (IMAGE_SCOPE, NO_HOOKS, TEXT_SCOPE, BlockHooks, Coupling, FullTextStream, ImageStream,
                      PackedTextStream, TextStream, encode_packed, replace_with_ln, run_blocks, run_towers)
from .text import Slot, TokenizedPrompts, clean_classname, decode_words, tokenize_templates, tokenize_words

__all__ = ["apply_block", "BlockHooks", "ClipBackbone", "ClipBlock", "Coupling", "FullTextStream", "IMAGE_SCOPE",
           "ImageStream", "NO_HOOKS", "PackedLayout", "PackedTextStream", "Slot", "SMALL_CONFIGS", "TEXT_SCOPE",
           "TextStream", "TokenizedPrompts", "UnsupportedModelError", "block_forward", "clean_classname",
           "create_clip", "decode_words", "encode_packed", "make_layout", "replace_with_ln", "run_blocks",
           "run_towers", "tokenize_templates", "tokenize_words", "unwrap_state_dict"]
