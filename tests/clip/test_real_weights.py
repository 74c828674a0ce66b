"""The checkpoint files a researcher has on disk load offline into the right CLIP: an OpenAI TorchScript archive,
an OpenAI-layout state_dict and an open_clip checkpoint, the model read from the weights where no name is given,
and never paired with the wrong activation.

The files are made here from a random QuickGELU CLIP with OpenAI's head width (64), its weights rounded to fp16
(OpenAI's storage), so that the loaded model must reproduce that model's features in fp32."""

import json
import warnings

import open_clip
import pytest
import torch
from torch import nn

from fastprompt import cli
from fastprompt.clip import create_clip
from fastprompt.clip.models import CheckpointError


def _openai_like_clip(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(32, dict(image_size=32, patch_size=16, width=64, layers=2),
                                 dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=2),
                                 quick_gelu=True).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())  # values fp16 can hold: the fp16 files then carry them exactly
    return model


def _save_openai_archive(model: nn.Module, path) -> None:
    """A TorchScript archive holding the model's state_dict in fp16 beside OpenAI's three non-weight entries,
    as ~/.cache/clip/ViT-B-16.pt does."""
    root = nn.Module()
    for key, value in model.state_dict().items():
        module, *rest = root, *key.split(".")
        for part in rest[:-1]:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_buffer(rest[-1], value.half())
    for key, value in (("input_resolution", 32), ("context_length", 77), ("vocab_size", 49408)):
        root.register_buffer(key, torch.tensor(value))
    with warnings.catch_warnings():  # TorchScript is deprecated; OpenAI's weights still come in it
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(root).save(str(path))


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def _same_features(loaded, model) -> None:
    assert all(p.dtype == torch.float32 for p in loaded.parameters())  # the fp16 storage cast to the run's dtype
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = open_clip.tokenize(["a photo of a dog.", "a sea lion"])
    with torch.no_grad():
        assert _rel(loaded.encode_image(images), model.encode_image(images)) < 1e-6
        assert _rel(loaded.encode_text(tokens), model.encode_text(tokens)) < 1e-6


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    model = _openai_like_clip()
    _save_openai_archive(model, folder / "ViT-X.pt")
    state = {k: v.half() for k, v in model.state_dict().items()}
    torch.save(state, folder / "openai_state_dict.pt")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, folder / "epoch_3.pt")
    from safetensors.torch import save_file  # open_clip's hub format (open_clip_model.safetensors)

    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "open_clip_model.safetensors"))
    return model, folder


def test_an_openai_archive_loads_as_quickgelu_with_the_same_features(files):
    model, folder = files
    loaded = create_clip(None, str(folder / "ViT-X.pt"))  # the architecture read from the weights
    _same_features(loaded, model)
    assert loaded.fastprompt_weights["format"] == "openai-archive" and loaded.fastprompt_weights["quick_gelu"]
    gelu = open_clip.model.CLIP(32, dict(image_size=32, patch_size=16, width=64, layers=2),
                                dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=2))
    gelu.load_state_dict(model.state_dict())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # what the wrong activation would have given: the test can tell them apart
        assert _rel(gelu.encode_image(images), model.encode_image(images)) > 1e-3


@pytest.mark.parametrize("filename", ["openai_state_dict.pt", "epoch_3.pt", "open_clip_model.safetensors"],
                         ids=["bare", "training-checkpoint", "safetensors"])
def test_a_state_dict_with_its_activation_stated_gives_the_same_features(files, filename):
    model, folder = files
    _same_features(create_clip(None, str(folder / filename), quick_gelu=True), model)


def test_a_state_dict_without_a_stated_activation_is_refused_with_the_way_to_state_it(files):
    _, folder = files
    path = str(folder / "openai_state_dict.pt")
    for name in (None, "ViT-B-16"):  # no name, or a GELU name: the weights do not say which activation
        with pytest.raises(CheckpointError, match="does not say which activation.*quick_gelu=True .*--quick-gelu.*"
                                                  "--no-quick-gelu.*-quickgelu model"):
            create_clip(name, path)


def test_an_activation_contradicting_the_weights_or_the_name_is_refused(files):
    _, folder = files
    with pytest.raises(CheckpointError, match="TorchScript archive\\) means QuickGELU; quick_gelu=False means GELU"):
        create_clip(None, str(folder / "ViT-X.pt"), quick_gelu=False)
    with pytest.raises(CheckpointError, match="model name ViT-B-16-quickgelu means QuickGELU; quick_gelu=False"):
        create_clip("ViT-B-16-quickgelu", str(folder / "openai_state_dict.pt"), quick_gelu=False)


def test_weights_that_do_not_fit_the_named_model_say_what_they_are(files):
    _, folder = files
    with pytest.raises(CheckpointError, match="does not fit fastprompt-tiny: it holds a ViT of width 64, 2 blocks, "
                                              "patch 16 at 32 px.*leave out the model name"):
        create_clip("fastprompt-tiny", str(folder / "ViT-X.pt"))


def test_the_openai_tag_is_built_with_quickgelu(monkeypatch):
    """open_clip builds ViT-B-16 with GELU and only warns when given the openai tag: the tag's activation is
    applied (open_clip's create_model is replaced here: no download)."""
    calls = []
    monkeypatch.setattr(open_clip, "create_model", lambda name, **kw: calls.append((name, kw)) or nn.Linear(1, 1))
    create_clip("ViT-B-16", "openai")
    assert calls[-1] == ("ViT-B-16", dict(pretrained="openai", force_quick_gelu=True))
    with pytest.raises(CheckpointError, match="tag 'openai' means QuickGELU; quick_gelu=False means GELU"):
        create_clip("ViT-B-16", "openai", quick_gelu=False)
    create_clip("ViT-B-16", None, quick_gelu=True)  # random weights: as asked
    assert calls[-1] == ("ViT-B-16", dict(pretrained=None, force_quick_gelu=True))


def test_cli_trains_from_an_archive_and_refuses_an_unstated_state_dict(files, tmp_path, capsys):
    model, folder = files
    """`--pretrained FILE` without --model: the CLIP is read from the file (here a custom one, 32 px)."""
    _, folder = files

    def train(weights, output):
        return cli.main(["train", "--method", "coop", "--opt", "n_ctx=2", "--epochs", "1", "--shots", "1",
                         "--batch-size", "8", "--no-progress", "--output", str(tmp_path / output),
                         "--pretrained", str(folder / weights)])

    assert train("ViT-X.pt", "archive") == 0
    with open(tmp_path / "archive" / "metrics.jsonl") as f:
        run = json.loads(f.readline())
    assert run["config"]["model"] is None and run["config"]["pretrained"].endswith("ViT-X.pt")
    assert run["weights"]["format"] == "openai-archive" and run["weights"]["quick_gelu"] is True
    capsys.readouterr()
    assert train("openai_state_dict.pt", "state_dict") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot create the CLIP from ") and "--quick-gelu" in err
