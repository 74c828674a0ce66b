"""The text tower over C ImageNet class names with CoOp's context: open_clip's encode_text on the full 77-token
sequences against EOT packing and packing + shared-prefix reuse, forward and forward + backward. On a GPU,
ViT-B/16 with C = 100 and 1000 and 2 or 16 context tokens; on a CPU the tiny CLIP (the ViT-B/16 figures on
a CPU come from benches/text_tower_figures.py)."""

import pytest
import torch
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

from fastprompt import methods
from fastprompt.clip import create_clip

from .conftest import DEVICE, ON_GPU, run_benchmark

MODEL = "ViT-B-16" if ON_GPU else "fastprompt-tiny"
SHAPES = [(c, n) for c in (100, 1000) for n in (2, 16)] if ON_GPU else [(50, 2)]
PATHS = {"encode_text": dict(pack_text=False, prefix_reuse=False), "packed": dict(pack_text=True, prefix_reuse=False),
         "packed+prefix": dict(pack_text=True, prefix_reuse=True)}
_model = {}


@pytest.mark.parametrize("direction", ["forward", "forward+backward"])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "C{}-ctx{}".format(*s))
def test_text_tower(benchmark, shape, path, direction):
    if "m" not in _model:
        _model["m"] = create_clip(MODEL, device=DEVICE)
    classes, n_ctx = shape
    coop = methods.build("coop", _model["m"], list(IMAGENET_CLASSNAMES[:classes]), n_ctx=n_ctx,
                         **PATHS[path]).to(DEVICE)

    def step():
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=ON_GPU):
            if direction == "forward":
                with torch.no_grad():
                    coop.text_features()
            else:
                coop.text_features().float().sum().backward()

    run_benchmark(benchmark, step, rounds=10, warmup=2)
