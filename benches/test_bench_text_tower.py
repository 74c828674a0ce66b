"""The text tower over C ImageNet class names with CoOp's context, forward and forward + backward:
open_clip's own encode_text on the full 77-token sequences (benches/open_clip_text.py: CoOp's prompted
embeddings through open_clip's transformer, ln_final, EOT pooling and projection), against fastprompt's EOT
packing and packing + shared-prefix reuse.

On a GPU: ViT-B/16 under bf16 autocast, C = 100 and 1000, 2 and 16 context tokens. On a CPU the tiny CLIP
(fastprompt-tiny, random weights) at C = 100 only, 2 and 16 context tokens: its full-length path takes about
5 s per forward + backward at C = 1000 on a 2-core machine, too slow for a suite that must stay quick (and
runs once, as a smoke test, in CI). The ViT-B/16 figures on a CPU come from benches/text_tower_figures.py.
"""

import pytest
import torch
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

from fastprompt import methods
from fastprompt.clip import create_clip

from .conftest import DEVICE, ON_GPU, run_benchmark
from .open_clip_text import open_clip_coop_text_features, open_clip_text_features

MODEL = "ViT-B-16" if ON_GPU else "fastprompt-tiny"
SHAPES = [(c, n) for c in ((100, 1000) if ON_GPU else (100,)) for n in (2, 16)]
PATHS = {"open_clip-encode_text": None,
         "packed": dict(pack_text=True, prefix_reuse=False),
         "packed+prefix": dict(pack_text=True, prefix_reuse=True)}
_model = {}


def _clip():
    if "m" not in _model:
        _model["m"] = create_clip(MODEL, device=DEVICE)
    return _model["m"]


def _coop(classes, n_ctx, path):
    """CoOp over the first `classes` ImageNet names; the open_clip path reads its prompts and context."""
    options = PATHS[path] or dict(pack_text=False, prefix_reuse=False)
    return methods.build("coop", _clip(), list(IMAGENET_CLASSNAMES[:classes]), n_ctx=n_ctx, **options).to(DEVICE)


@pytest.mark.parametrize("direction", ["forward", "forward+backward"])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "C{}-ctx{}".format(*s))
def test_text_tower(benchmark, shape, path, direction):
    coop = _coop(*shape, path)
    features = (lambda: open_clip_coop_text_features(coop)) if PATHS[path] is None else coop.text_features

    def step():
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=ON_GPU):
            if direction == "forward":
                with torch.no_grad():
                    features()
            else:
                features().float().sum().backward()

    # with benchmarks disabled (CI's smoke run) one call is enough to show that every path runs
    run_benchmark(benchmark, step, rounds=10, warmup=0 if benchmark.disabled else (2 if ON_GPU else 1))


def test_the_baseline_is_open_clips_encode_text():
    """The baseline is open_clip's encode_text bit for bit on plain tokens, and on CoOp's prompts it gives
    the features of fastprompt's paths (so every provider above computes the same thing)."""
    model = create_clip("fastprompt-tiny")
    names = list(IMAGENET_CLASSNAMES[:20])
    coop = methods.build("coop", model, names, n_ctx=4, pack_text=False)
    ids = coop.prompts.ids
    with torch.no_grad():
        assert torch.equal(open_clip_text_features(model, model.token_embedding(ids), ids), model.encode_text(ids))
        baseline = open_clip_coop_text_features(coop)
        for options in [dict(pack_text=False)] + [o for o in PATHS.values() if o is not None]:
            fast = methods.build("coop", model, names, n_ctx=4, **options)
            fast.ctx.copy_(coop.ctx)
            error = (fast.text_features() - baseline).norm(dim=-1) / baseline.norm(dim=-1)
            assert error.max() < 1e-5, (options, error.max())
