"""One full training step (forward, backward, optimizer) per method and backend: the tiny CLIP at batch 8
on a CPU, ViT-B/16 at batch 32 with 100 classes under bf16 autocast on a GPU. `fastprompt bench` prints the
same numbers with a profile of the step."""

import pytest
import torch

from fastprompt import methods
from fastprompt.clip import SMALL_CONFIGS, create_clip

from .conftest import DEVICE, ON_GPU, providers, run_benchmark

MODEL = "ViT-B-16" if ON_GPU else "fastprompt-tiny"
BATCH, CLASSES = (32, 100) if ON_GPU else (8, 8)
_clip = {}


def _clip_model():
    if "model" not in _clip:
        _clip["model"] = create_clip(MODEL, device=DEVICE)
    return _clip["model"]


@pytest.mark.parametrize("backend", [p for p in providers("cmpa") if not isinstance(p, str)])
@pytest.mark.parametrize("name", list(methods.METHODS))
def test_train_step(benchmark, name, backend):
    model = _clip_model()
    config = methods.SMALL_MODEL_CONFIGS.get(name, {}) if MODEL in SMALL_CONFIGS else {}
    method = methods.build(name, model, [f"class {i}" for i in range(CLASSES)], **config, backend=backend)
    method = method.to(DEVICE)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(BATCH, 3, size, size, device=DEVICE)
    labels = torch.randint(0, CLASSES, (BATCH,), device=DEVICE)
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=1e-3, momentum=0.9)

    def step():
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=ON_GPU):
            loss = method.loss(images, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    run_benchmark(benchmark, step, rounds=10, warmup=2)
