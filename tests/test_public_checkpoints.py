"""Checkpoints in the layouts the public codes write (built here: Dassl files with those key names, the
frozen CLIP and the token buffers included) load into the matching methods."""

import pytest
import torch

from fastprompt.methods.checkpoints import load_public_checkpoint

from .method_helpers import batch, build


def _dassl(tmp_path, state, name="model.pth.tar-5"):
    path = tmp_path / name
    torch.save({"state_dict": state, "epoch": 5, "optimizer": {}, "scheduler": {}}, path)
    return path


def _random_like(tensors: dict) -> dict:
    return {k: torch.randn_like(v) for k, v in tensors.items()}


def _clip_junk(method):
    """What the whole-model files also hold: the frozen CLIP (a few of its tensors) and the token buffers."""
    return {"image_encoder.conv1.weight": torch.randn(4, 3, 2, 2), "logit_scale": torch.tensor(4.6),
            "prompt_learner.token_prefix": torch.randn(5, 1, 40), "prompt_learner.token_suffix": torch.randn(5, 70, 40)}


@pytest.mark.parametrize("name", ["coop", "cocoop"])
def test_coop_and_cocoop_prompt_learner_files(tmp_path, name):
    method = build(name)
    trained = _random_like(method.state_dict())
    state = {**trained, "token_prefix": torch.randn(5, 1, 40), "token_suffix": torch.randn(5, 60, 40)}
    loaded = load_public_checkpoint(method, _dassl(tmp_path, state, "model-best.pth.tar"))
    assert loaded == sorted(trained)
    for k, v in trained.items():
        assert torch.equal(method.state_dict()[k], v)


def test_maple_whole_model_file(tmp_path):
    method = build("maple")
    trained = _random_like(method.state_dict())
    state = {f"prompt_learner.{k}": v for k, v in trained.items()} | _clip_junk(method)
    load_public_checkpoint(method, _dassl(tmp_path, state))
    for k, v in trained.items():
        assert torch.equal(method.state_dict()[k], v)
    images, _ = batch()
    assert torch.isfinite(method(images)).all()


@pytest.mark.parametrize("sharing", [True, False], ids=["shared-cmpa", "cmpa-per-layer"])
def test_dcp_whole_model_file(tmp_path, sharing):
    method = build("dcp", parameter_sharing=sharing)
    trained = _random_like(method.state_dict())
    state = {"prompt_learner.prompts_text": trained["prompts_text"],
             "prompt_learner.prompts_visual": trained["prompts_visual"]} | _clip_junk(method)
    for block in range(4):  # the public model holds a prompt_attn in every block
        for k, v in trained.items():
            if not k.startswith("cmpa."):
                continue
            if sharing:
                state[f"module.encoder.resblocks.{block}.prompt_attn.{k[5:]}"] = v
            elif 1 <= block <= method.depth:
                layer, rest = k[5:].split(".", 1)
                if int(layer) == block - 1:
                    state[f"module.encoder.resblocks.{block}.prompt_attn.{rest}"] = v
            else:
                state[f"module.encoder.resblocks.{block}.prompt_attn.{k[5:].split('.', 1)[1]}"] = torch.zeros(1)
    load_public_checkpoint(method, _dassl(tmp_path, state))
    for k, v in trained.items():
        assert torch.equal(method.state_dict()[k], v), k


def test_a_checkpoint_that_does_not_fit_says_why(tmp_path):
    method = build("coop")
    with pytest.raises(KeyError, match="lacks \\['ctx'\\]"):
        load_public_checkpoint(method, {"state_dict": {"token_prefix": torch.zeros(1)}})
    with pytest.raises(ValueError, match="ctx has shape \\(16, 40\\) in the checkpoint but \\(4, 40\\)"):
        load_public_checkpoint(method, {"ctx": torch.zeros(16, 40)})
    with pytest.raises(ValueError, match="no public checkpoint layout is known for vpt_deep"):
        load_public_checkpoint(build("vpt_deep"), {})
