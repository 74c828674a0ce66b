"""What the method tests share: a tiny open_clip CLIP with random weights, class names, a batch, the small
configuration of each method that fits the tiny model (4 blocks per tower), and eager building blocks for
the golden implementations written in the tests (open_clip's own block forward and torch.cat, nothing of
fastprompt)."""

import open_clip
import torch
import torch.nn.functional as F

from fastprompt import methods
from fastprompt.clip import create_clip

CLASSNAMES = ["dog", "cat", "golden retriever", "sea_lion", "airplane"]

# per method: a configuration for the 4-block tiny CLIP (the defaults assume 12 blocks)
TINY_CONFIGS = methods.SMALL_MODEL_CONFIGS


def tiny_clip(seed: int = 0):
    return create_clip("fastprompt-tiny", seed=seed)


def build(name: str, seed: int = 0, clip_seed: int = 0, **overrides):
    """The method on a fresh tiny CLIP; `seed` draws its own initial parameters."""
    torch.manual_seed(seed)
    return methods.build(name, tiny_clip(clip_seed), CLASSNAMES, **{**TINY_CONFIGS[name], **overrides})


def batch(seed: int = 1, b: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 32, 32, generator=g), torch.randint(0, len(CLASSNAMES), (b,), generator=g)


# ---- eager building blocks for golden implementations ----------------------------------------------

def tokenize(texts, clip):
    return open_clip.tokenize(texts, context_length=clip.positional_embedding.shape[0])


def text_tower(clip, embeddings, tokens, per_block=None):
    """open_clip's text tower on given token embeddings; per_block(layer, x) may rewrite x before a block."""
    x = embeddings + clip.positional_embedding
    for layer, block in enumerate(clip.transformer.resblocks):
        if per_block is not None:
            x = per_block(layer, x)
        x = block(x, attn_mask=clip.attn_mask)
    x = clip.ln_final(x)
    return x[torch.arange(x.shape[0]), tokens.argmax(-1)] @ clip.text_projection


def image_tokens(clip, images):
    v = clip.visual
    x = v.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], 1)
    return x + v.positional_embedding


def image_tower(clip, x, per_block=None, after_block=None):
    """open_clip's image blocks from the stream after ln_pre, then ln_post of the class token and proj."""
    v = clip.visual
    for layer, block in enumerate(v.transformer.resblocks):
        if per_block is not None:
            x = per_block(layer, x)
        x = block(x)
        if after_block is not None:
            x = after_block(layer, x)
    return v.ln_post(x[:, 0]) @ v.proj


def clip_logits(clip, image_features, text_features):
    img, txt = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
    if txt.dim() == 3:
        return clip.logit_scale.exp() * torch.einsum("be,bce->bc", img, txt)
    return clip.logit_scale.exp() * img @ txt.t()


def assert_same(got, want, what, rtol=1e-5):
    """fp32 against fp32, the same math in two orders: relative error of the norm under rtol."""
    err = (got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-12)
    assert err <= rtol, f"{what}: relative error {err:.2e}"
