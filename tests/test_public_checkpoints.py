"""Checkpoints in the layouts the public codes write (built here: Dassl files with those key names, the
frozen CLIP and the token buffers included) load into the matching methods.

The key names are written out as the public codes produce them, so that renaming a parameter of a method
breaks these tests instead of silently following it: KaiyangZhou/CoOp saves the prompt learner alone
(prompt_learner/model.pth.tar-N: "ctx", CoCoOp's "meta_net.linear{1,2}.*", the token buffers);
muzairkhattak/multimodal-prompt-learning saves MaPLe's whole CustomCLIP ("prompt_learner.*", the CLIP's
"image_encoder.*" / "text_encoder.*", "logit_scale")."""

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


DT, DV, E = 40, 48, 32  # the tiny CLIP's text width, vision width and embedding size
N_CLS = 5


def _drawn(shapes: dict) -> dict:
    g = torch.Generator().manual_seed(7)
    return {k: torch.randn(shape, generator=g) for k, shape in shapes.items()}


def _clip_junk(method):
    """What the whole-model files also hold: the frozen CLIP (a few of its tensors) and the token buffers."""
    return {"image_encoder.conv1.weight": torch.randn(4, 3, 2, 2), "logit_scale": torch.tensor(4.6),
            "prompt_learner.token_prefix": torch.randn(5, 1, 40), "prompt_learner.token_suffix": torch.randn(5, 70, 40)}


def _coop_files(name: str) -> dict:
    """What CoOp (n_ctx 4 here) and CoCoOp ("a photo of a": 4 tokens) save for the tiny CLIP: the prompt learner's
    own state_dict, buffers included."""
    state = _drawn({"ctx": (4, DT), "token_prefix": (N_CLS, 1, DT), "token_suffix": (N_CLS, 72, DT)})
    if name == "cocoop":  # meta-net Linear(E, E/16) → ReLU → Linear(E/16, Dt)
        state |= _drawn({"meta_net.linear1.weight": (E // 16, E), "meta_net.linear1.bias": (E // 16,),
                         "meta_net.linear2.weight": (DT, E // 16), "meta_net.linear2.bias": (DT,)})
    return state


def _check_coop_values(method, state: dict, prefix: str = "") -> None:
    assert torch.equal(method.ctx, state[prefix + "ctx"])
    if method.name == "cocoop":
        for i in (1, 2):
            layer = getattr(method.meta_net, f"linear{i}")
            assert torch.equal(layer.weight, state[f"{prefix}meta_net.linear{i}.weight"])
            assert torch.equal(layer.bias, state[f"{prefix}meta_net.linear{i}.bias"])


@pytest.mark.parametrize("name", ["coop", "cocoop"])
def test_coop_and_cocoop_prompt_learner_files(tmp_path, name):
    method = build(name)
    state = _coop_files(name)
    loaded = load_public_checkpoint(method, _dassl(tmp_path, state, "model-best.pth.tar"))
    assert loaded == sorted(k for k in state if not k.startswith("token_"))
    _check_coop_values(method, state)


@pytest.mark.parametrize("name", ["coop", "cocoop"])
def test_coop_and_cocoop_whole_model_state_dicts(tmp_path, name):
    """The same tensors under the whole CustomCLIP's names ("prompt_learner.ctx", ...), e.g. a model.state_dict()
    saved by hand, with the frozen CLIP beside them."""
    method = build(name)
    state = {f"prompt_learner.{k}": v for k, v in _coop_files(name).items()} | _clip_junk(method)
    load_public_checkpoint(method, _dassl(tmp_path, state))
    _check_coop_values(method, state, "prompt_learner.")


def test_maple_whole_model_file(tmp_path):
    method = build("maple")  # n_ctx 2, depth 3: two deeper compound prompts and projections
    shapes = {"prompt_learner.ctx": (2, DT), "prompt_learner.proj.weight": (DV, DT), "prompt_learner.proj.bias": (DV,),
              "prompt_learner.token_prefix": (N_CLS, 1, DT), "prompt_learner.token_suffix": (N_CLS, 74, DT)}
    for i in range(2):
        shapes |= {f"prompt_learner.compound_prompts_text.{i}": (2, DT),
                   f"prompt_learner.compound_prompt_projections.{i}.weight": (DV, DT),
                   f"prompt_learner.compound_prompt_projections.{i}.bias": (DV,)}
    state = _drawn(shapes) | _clip_junk(method)
    load_public_checkpoint(method, _dassl(tmp_path, state))
    assert torch.equal(method.ctx, state["prompt_learner.ctx"])
    assert torch.equal(method.proj.weight, state["prompt_learner.proj.weight"])
    assert torch.equal(method.proj.bias, state["prompt_learner.proj.bias"])
    for i in range(2):
        assert torch.equal(method.compound_prompts_text[i], state[f"prompt_learner.compound_prompts_text.{i}"])
        layer = method.compound_prompt_projections[i]
        assert torch.equal(layer.weight, state[f"prompt_learner.compound_prompt_projections.{i}.weight"])
        assert torch.equal(layer.bias, state[f"prompt_learner.compound_prompt_projections.{i}.bias"])
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
