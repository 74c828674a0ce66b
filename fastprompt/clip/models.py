"""Creating the CLIP a method prompts: open_clip's named models, and small configurations for tests and for
the built-in default run (random weights, so that everything runs without downloads)."""

from __future__ import annotations

from typing import Optional

import torch

# Small CLIPs with OpenAI's layout (QuickGELU, class-token pooling, causal text tower pooled at EOT).
# Both towers have the same depth, so that DCP can couple them layer by layer.
SMALL_CONFIGS = {
    "fastprompt-tiny": dict(
        embed_dim=32,
        vision_cfg=dict(image_size=32, patch_size=8, width=48, head_width=16, layers=4),
        text_cfg=dict(context_length=77, vocab_size=49408, width=40, heads=5, layers=4),
    ),
    "fastprompt-small": dict(
        embed_dim=128,
        vision_cfg=dict(image_size=64, patch_size=8, width=192, head_width=32, layers=6),
        text_cfg=dict(context_length=77, vocab_size=49408, width=128, heads=4, layers=6),
    ),
}


def create_clip(name: str = "fastprompt-tiny", pretrained: Optional[str] = None, *, seed: Optional[int] = 0,
                device: Optional[torch.device | str] = None) -> torch.nn.Module:
    """An open_clip CLIP in eval mode.

    name: an open_clip model name ("ViT-B-16", "ViT-B-32", "ViT-L-14", ...) or one of SMALL_CONFIGS.
    pretrained: an open_clip pretrained tag ("openai", "laion2b_s34b_b88k", ...) or a local checkpoint path;
        None gives random weights (seeded).
    """
    import open_clip

    generator_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    try:
        if name in SMALL_CONFIGS:
            if pretrained not in (None, "") and not _is_file(pretrained):
                raise ValueError(f"{name} is a fastprompt test configuration: it has no pretrained tags, only "
                                 "random weights or a local checkpoint path")
            model = open_clip.model.CLIP(**SMALL_CONFIGS[name], quick_gelu=True)
            if pretrained:
                model.load_state_dict(torch.load(pretrained, map_location="cpu", weights_only=True))
        else:
            try:
                model = open_clip.create_model(name, pretrained=pretrained or None)
            except RuntimeError as exc:
                raise RuntimeError(f"could not load pretrained weights {pretrained!r} for {name} ({exc}). Without "
                                   "internet, download the checkpoint elsewhere and pass its local path as "
                                   "pretrained=/path/to/open_clip_pytorch_model.bin") from exc
    finally:
        if seed is not None:
            torch.random.set_rng_state(generator_state)
    model.eval()
    return model.to(device) if device is not None else model


def _is_file(path) -> bool:
    import os

    return isinstance(path, str) and os.path.isfile(path)
