"""Checkpoints in the layouts the public codes write (built here: Dassl files with those key names, the
frozen CLIP and the token buffers included) load into the matching methods, every value checked where it lands.

The key names are written out as the public codes produce them, so that renaming a parameter of a method
breaks these tests instead of silently following it: KaiyangZhou/CoOp saves the prompt learner alone
(prompt_learner/model.pth.tar-N: "ctx", CoCoOp's "meta_net.linear{1,2}.*", the token buffers);
muzairkhattak/multimodal-prompt-learning saves MaPLe's, IVLP's and VPT-deep's whole CustomCLIP
("prompt_learner.*", the CLIP's "image_encoder.*" / "text_encoder.*" with the VPT prompts inside, "logit_scale");
GingL/CMPA the whole DCP model (CMPA in "encoder.resblocks.<i>.prompt_attn"); fanrena/DPT three registered
models (prompt_learner, image_encoder.transformer.ctx_learner, image_encoder.transformer.extractor)."""

import pytest
import torch

from fastprompt.methods.checkpoints import load_public_checkpoint

from ..method_helpers import batch, build


def _dassl(tmp_path, state, name="model.pth.tar-5"):
    path = tmp_path / name
    torch.save({"state_dict": state, "epoch": 5, "optimizer": {}, "scheduler": {}}, path)
    return path


def _random_like(tensors: dict) -> dict:
    return {k: torch.randn_like(v) for k, v in tensors.items()}


DT, DV, E = 40, 48, 32  # the tiny CLIP's text width, vision width and embedding size
N_CLS = 5


def _drawn(shapes: dict, seed: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)
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


# GingL/CMPA's PromptAttention for the tiny widths (Dv 48, Dt 40): its own key names, the text half included
CMPA_SHAPES = {"promt_attention_visual.in_proj_weight": (144, 48), "promt_attention_visual.in_proj_bias": (144,),
               "promt_attention_visual.out_proj.weight": (48, 48), "promt_attention_visual.out_proj.bias": (48,),
               "ln_pa_1_visual.weight": (48,), "ln_pa_1_visual.bias": (48,),
               "mlp_pa_visual.c_fc.weight": (192, 48), "mlp_pa_visual.c_fc.bias": (192,),
               "mlp_pa_visual.c_proj.weight": (48, 192), "mlp_pa_visual.c_proj.bias": (48,),
               "ln_pa_2_visual.weight": (48,), "ln_pa_2_visual.bias": (48,),
               "proj_v2t.weight": (40, 48), "proj_v2t.bias": (40,), "proj_t2v.weight": (48, 40), "proj_t2v.bias": (48,),
               "promt_attention_text.in_proj_weight": (120, 40), "promt_attention_text.in_proj_bias": (120,),
               "promt_attention_text.out_proj.weight": (40, 40), "promt_attention_text.out_proj.bias": (40,),
               "ln_pa_1_text.weight": (40,), "ln_pa_1_text.bias": (40,),
               "mlp_pa_text.c_fc.weight": (160, 40), "mlp_pa_text.c_fc.bias": (160,),
               "mlp_pa_text.c_proj.weight": (40, 160), "mlp_pa_text.c_proj.bias": (40,),
               "ln_pa_2_text.weight": (40,), "ln_pa_2_text.bias": (40,)}
UNTRAINED_TEXT_HALF = ("_text.", "proj_v2t.")  # what the public code never computes: not loaded, left as it was


def _dcp_file(sharing: bool) -> dict:
    """GingL/CMPA's whole CustomCLIP for the tiny CLIP (4 blocks, depth 3, M = 4), under DataParallel's prefix:
    shared, every block holds the same PromptAttention; per layer, each block its own (blocks 1..3 used)."""
    state = _drawn({"module.prompt_learner.prompts_text": (4, DT), "module.prompt_learner.prompts_visual": (4, DV)}, 1)
    shared = _drawn(CMPA_SHAPES, 2)
    for block in range(4):
        own = shared if sharing else {k: torch.randn(shape) for k, shape in CMPA_SHAPES.items()}
        state |= {f"module.encoder.resblocks.{block}.prompt_attn.{k}": v for k, v in own.items()}
    return state | _clip_junk(None)


@pytest.mark.parametrize("sharing", [True, False], ids=["shared-cmpa", "cmpa-per-layer"])
def test_dcp_whole_model_file_loads_into_the_uncoupled_model(tmp_path, sharing):
    """The public code's model is couple_text=False: its visual half of CMPA and both prompts load where they
    belong; its text half (never computed there) is not loaded."""
    method = build("dcp", parameter_sharing=sharing, couple_text=False)
    untouched = {n: p.detach().clone() for n, p in method.named_parameters() if n.startswith("cmpa")
                 and any(t in n for t in UNTRAINED_TEXT_HALF)}
    state = _dcp_file(sharing)
    load_public_checkpoint(method, _dassl(tmp_path, state))
    assert torch.equal(method.prompts_text, state["module.prompt_learner.prompts_text"])
    assert torch.equal(method.prompts_visual, state["module.prompt_learner.prompts_visual"])
    for block in range(1, method.depth + 1):
        cmpa = method.cmpa if sharing else method.cmpa[block - 1]
        for key in CMPA_SHAPES:
            got = cmpa.get_parameter(key)
            if any(t in key for t in UNTRAINED_TEXT_HALF):
                assert torch.equal(got, untouched[("cmpa." if sharing else f"cmpa.{block - 1}.") + key]), key
            else:
                assert torch.equal(got, state[f"module.encoder.resblocks.{block}.prompt_attn.{key}"]), (block, key)
    images, _ = batch()
    assert torch.isfinite(method(images)).all()


def test_dcp_public_file_is_refused_by_the_coupled_model(tmp_path):
    """Loaded into couple_text=True, the public file's untrained text half of CMPA would rewrite the text prompts:
    refused, with the way to load it."""
    method = build("dcp")
    with pytest.raises(ValueError, match="couple_text=False to load it"):
        load_public_checkpoint(method, _dassl(tmp_path, _dcp_file(True)))


# ---- IVLP and VPT-deep (multimodal-prompt-learning: the whole CustomCLIP, VPT prompts inside the encoders) ----

def _ivlp_file() -> dict:
    """IVLP for the tiny CLIP, 2 + 2 tokens, depth 3 on both sides: the text context, then the text encoder's
    blocks 1 and 2 and the image encoder's input (VPT) and blocks 1 and 2 (VPT_shallow)."""
    return _drawn({"prompt_learner.ctx": (2, DT), "prompt_learner.token_prefix": (N_CLS, 1, DT),
                   "prompt_learner.token_suffix": (N_CLS, 74, DT),
                   "text_encoder.transformer.resblocks.1.VPT_shallow": (2, DT),
                   "text_encoder.transformer.resblocks.2.VPT_shallow": (2, DT),
                   "image_encoder.VPT": (2, DV),
                   "image_encoder.transformer.resblocks.1.VPT_shallow": (2, DV),
                   "image_encoder.transformer.resblocks.2.VPT_shallow": (2, DV),
                   "image_encoder.conv1.weight": (DV, 3, 8, 8), "text_encoder.positional_embedding": (77, DT),
                   "logit_scale": ()})


def test_ivlp_whole_model_file(tmp_path):
    method = build("ivlp")  # depth_text = depth_vision = 3, 2 + 2 tokens
    state = _ivlp_file()
    load_public_checkpoint(method, _dassl(tmp_path, state, "model.pth.tar-5"))
    assert torch.equal(method.ctx, state["prompt_learner.ctx"])
    assert torch.equal(method.text_prompts[0], state["text_encoder.transformer.resblocks.1.VPT_shallow"])
    assert torch.equal(method.text_prompts[1], state["text_encoder.transformer.resblocks.2.VPT_shallow"])
    assert torch.equal(method.visual_prompts[0], state["image_encoder.VPT"])
    assert torch.equal(method.visual_prompts[1], state["image_encoder.transformer.resblocks.1.VPT_shallow"])
    assert torch.equal(method.visual_prompts[2], state["image_encoder.transformer.resblocks.2.VPT_shallow"])
    images, _ = batch()
    assert torch.isfinite(method(images)).all()


def test_vpt_deep_whole_model_file(tmp_path):
    method = build("vpt_deep")  # 3 tokens, depth 3
    state = _drawn({"image_encoder.VPT": (3, DV), "image_encoder.transformer.resblocks.1.VPT_shallow": (3, DV),
                    "image_encoder.transformer.resblocks.2.VPT_shallow": (3, DV),
                    "image_encoder.conv1.weight": (DV, 3, 8, 8), "logit_scale": ()})
    load_public_checkpoint(method, _dassl(tmp_path, {f"module.{k}": v for k, v in state.items()}))
    assert torch.equal(method.visual_prompts[0], state["image_encoder.VPT"])
    assert torch.equal(method.visual_prompts[1], state["image_encoder.transformer.resblocks.1.VPT_shallow"])
    assert torch.equal(method.visual_prompts[2], state["image_encoder.transformer.resblocks.2.VPT_shallow"])


def test_deep_prompts_of_other_depths_are_refused():
    """Prompts for a block the method does not prompt, or a missing block, would load another model."""
    with pytest.raises(ValueError, match="resblocks.2.VPT_shallow .*blocks \\[2\\].* build it with the checkpoint's"):
        load_public_checkpoint(build("ivlp", depth_text=2, depth_vision=2), _ivlp_file())
    state = _ivlp_file()
    del state["image_encoder.transformer.resblocks.1.VPT_shallow"]
    with pytest.raises(KeyError, match="lacks image_encoder.transformer.resblocks.1.VPT_shallow"):
        load_public_checkpoint(build("ivlp"), state)


# ---- DPT (fanrena/DPT: three registered models, each in its own folder) ----

def _dpt_parts() -> dict:
    """DPT for the tiny CLIP with bottom_limit 3 (VPT-deep before blocks 0-1, CAVPT in blocks 2 and 3), 3 VPT tokens,
    2 CAVPT tokens, 16 CoOp context tokens: {registered model: its state_dict}, as the public trainer saves them."""
    extractor = {}
    for i in range(2):  # CAVPT i is block 2 + i
        extractor |= {f"meta_nets.{i}.weight": (DV, E), f"meta_nets.{i}.bias": (DV,),
                      f"attns.{i}.qmlp.weight": (32, DV), f"attns.{i}.kmlp.weight": (32, DV),
                      f"attns.{i}.vmlp.weight": (DV, DV), f"lns.{i}.weight": (DV,), f"lns.{i}.bias": (DV,),
                      f"lns2.{i}.weight": (DV,), f"lns2.{i}.bias": (DV,), f"classfiers.{i}.weight": (N_CLS, DV)}
    return {"prompt_learner": _drawn({"ctx": (16, DT), "token_prefix": (N_CLS, 1, DT), "token_suffix": (N_CLS, 59, DT)}, 1),
            "image_encoder.transformer.ctx_learner": _drawn({"ctx": (2, 3, DV)}, 2),
            "image_encoder.transformer.extractor": _drawn(extractor | {"ctx": (2, 2, DV)}, 3)}


def _check_dpt_values(method, parts: dict) -> None:
    ex = parts["image_encoder.transformer.extractor"]
    assert torch.equal(method.ctx, parts["prompt_learner"]["ctx"])
    assert torch.equal(method.visual_prompts, parts["image_encoder.transformer.ctx_learner"]["ctx"])
    for i, cavpt in enumerate(method.cavpt):
        assert torch.equal(cavpt.query.weight, ex[f"meta_nets.{i}.weight"])
        assert torch.equal(cavpt.query.bias, ex[f"meta_nets.{i}.bias"])
        assert torch.equal(cavpt.q_proj.weight, ex[f"attns.{i}.qmlp.weight"])
        assert torch.equal(cavpt.k_proj.weight, ex[f"attns.{i}.kmlp.weight"])
        assert torch.equal(cavpt.out_proj.weight, ex[f"attns.{i}.vmlp.weight"])
        assert torch.equal(cavpt.ln_aux.weight, ex[f"lns.{i}.weight"])  # lns: before the aux classifier
        assert torch.equal(cavpt.ln_aux.bias, ex[f"lns.{i}.bias"])
        assert torch.equal(cavpt.ln_out.weight, ex[f"lns2.{i}.weight"])  # lns2: LN(out + query), the prompts
        assert torch.equal(cavpt.ln_out.bias, ex[f"lns2.{i}.bias"])
        assert torch.equal(cavpt.classifier.weight, ex[f"classfiers.{i}.weight"])
        assert torch.equal(cavpt.tokens, ex["ctx"][i])


def test_dpt_output_folder(tmp_path):
    """The run's output folder with its three registered models (model.pth.tar-N: the last epoch is taken)."""
    parts = _dpt_parts()
    for name, state in parts.items():
        (tmp_path / name).mkdir()
        for epoch in (30, 60):
            _dassl(tmp_path / name, state if epoch == 60 else _random_like(state), f"model.pth.tar-{epoch}")
    method = build("dpt", bottom_limit=3)
    load_public_checkpoint(method, tmp_path)
    _check_dpt_values(method, parts)
    other = build("dpt", bottom_limit=3, seed=3)
    load_public_checkpoint(other, tmp_path, epoch=30)
    assert not torch.equal(other.ctx, parts["prompt_learner"]["ctx"])
    images, _ = batch()
    assert torch.isfinite(method(images)).all()


def test_dpt_whole_model_state_dict(tmp_path):
    """The same tensors under the whole model's names, the CAVPT tokens saved one block per key."""
    parts = _dpt_parts()
    state = {f"{name}.{k}": v for name, part in parts.items() for k, v in part.items()}
    tokens = state.pop("image_encoder.transformer.extractor.ctx")
    state |= {"image_encoder.transformer.extractor.ctx.0": tokens[0], "image_encoder.transformer.extractor.ctx.1": tokens[1]}
    method = build("dpt", bottom_limit=3)
    load_public_checkpoint(method, _dassl(tmp_path, state))
    _check_dpt_values(method, parts)
    with pytest.raises(ValueError, match="CAVPT blocks .* build it with the checkpoint's bottom_limit"):
        load_public_checkpoint(build("dpt", bottom_limit=4), state)


# ---- CoOp's word-counted ctx_init -------------------------------------------------------------

@pytest.mark.parametrize("name", ["coop", "cocoop"])
def test_a_context_initialised_from_a_multi_token_word_loads(tmp_path, name):
    """"a pixelated photo of a" is 5 words and 6 tokens: the public codes hold 5 context vectors (a public
    checkpoint's ctx is (5, Dt)), and so does the method."""
    method = build(name, ctx_init="a pixelated photo of a")
    state = _coop_files(name)
    state["ctx"] = torch.randn(5, DT)
    load_public_checkpoint(method, _dassl(tmp_path, state))
    _check_coop_values(method, state)


# ---- the evaluation text cache ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["coop", "maple"])
def test_loading_or_changing_prompts_in_place_gives_new_logits(tmp_path, name):
    """Evaluation caches the text features; new values, copied in place or loaded, must give new logits (those
    of a method built with them)."""
    method, fresh = build(name, seed=0), build(name, seed=5)
    method.eval(), fresh.eval()
    images, _ = batch()
    with torch.no_grad():
        before = method(images)
        assert torch.equal(method(images), before)  # cached
        for p, q in zip(method.parameters(), fresh.parameters()):
            if p.requires_grad:
                p.copy_(q)
        torch.testing.assert_close(method(images), fresh(images), rtol=0, atol=0)
        assert not torch.allclose(method(images), before)

        method.load_state_dict(build(name, seed=0).state_dict())
        torch.testing.assert_close(method(images), before, rtol=0, atol=0)
        load_public_checkpoint(method, {f"prompt_learner.{k}": v for k, v in fresh.state_dict().items()})
        torch.testing.assert_close(method(images), fresh(images), rtol=0, atol=0)


def test_a_checkpoint_that_does_not_fit_says_why(tmp_path):
    method = build("coop")
    with pytest.raises(KeyError, match="lacks \\['ctx'\\]"):
        load_public_checkpoint(method, {"state_dict": {"token_prefix": torch.zeros(1)}})
    with pytest.raises(ValueError, match="ctx has shape \\(16, 40\\) in the checkpoint but \\(4, 40\\)"):
        load_public_checkpoint(method, {"ctx": torch.zeros(16, 40)})
    with pytest.raises(ValueError, match="no public checkpoint layout is known for map_dafe"):
        load_public_checkpoint(build("map_dafe"), {})
