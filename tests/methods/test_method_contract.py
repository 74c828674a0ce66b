"""The method contract the training harness relies on (PromptMethod): trainable_parameters() is Parameters for
every method and parameter_groups() covers the same ones, set_epoch(epoch, epochs) and describe() exist
everywhere, options are checked (names and types) before anything is built; and the constructor errors a
new user meets: a depth too large for the small CLIPs names SMALL_MODEL_CONFIGS, CMPA's heads must divide its
widths and its design_details keys are the original's."""

import pytest
import torch

import fastprompt
from fastprompt import methods
from fastprompt.methods.base import PromptMethod

from ..method_helpers import CLASSNAMES, build, tiny_clip

ALL = list(methods.METHODS)


@pytest.mark.parametrize("name", ALL)
def test_every_method_keeps_the_contract(name):
    method = build(name)
    params = method.trainable_parameters()
    assert params and all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in params)
    total = sum(p.numel() for p in params)  # what broke on DPT's parameter groups
    groups = method.parameter_groups()
    assert all(isinstance(g, dict) for g in groups)
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in params)
    described = method.describe()
    assert described["name"] == name and described["trained_parameters"] == total
    assert (described["text_path"] is None) == (name == "vpt_deep")
    method.set_epoch(3, 10)  # every method takes it; only DPT's loss depends on it
    # no method re-declares the harness's entry points under other signatures
    for entry in ("set_epoch", "describe", "trainable_parameters", "parameter_groups", "check_options"):
        assert callable(getattr(type(method), entry))


def test_dpt_takes_the_epoch_through_set_epoch():
    method = build("dpt")
    method.set_epoch(1, 2)
    assert (method.epoch, method.epochs) == (1, 2) and not method.in_first_phase()
    method.set_epoch(0, 2)
    assert method.in_first_phase()


@pytest.mark.parametrize("config, message", [
    ({"n_ctx": "abc"}, r"coop option n_ctx takes an int, got 'abc'"),
    ({"n_ctx": 2.5}, r"coop option n_ctx takes an int, got 2.5"),
    ({"n_ctx": True}, r"coop option n_ctx takes an int, got True"),
    ({"class_specific": 1}, r"coop option class_specific takes True or False, got 1"),
    ({"ctx_init": 3}, r"coop option ctx_init takes a string or None, got 3"),
    ({"class_chunk": "8"}, r"coop option class_chunk takes an int or None, got '8'"),
    ({"n_tokens": 4}, r"coop has no option n_tokens; its options are n_ctx=16"),
])
def test_options_are_checked_by_name_and_type_before_anything_is_built(config, message, monkeypatch):
    built = []
    monkeypatch.setattr(PromptMethod, "__init__", lambda *a, **k: built.append(a))
    with pytest.raises(ValueError, match=message):
        methods.check_options("coop", config)
    with pytest.raises(ValueError, match=message):
        methods.build("coop", None, CLASSNAMES, **config)
    assert not built
    methods.check_options("coop", {"n_ctx": 4, "ctx_init": None, "class_chunk": 8})  # right types pass
    methods.check_options("dpt", {"aux_weight": 1})  # an int where a float is expected


@pytest.mark.parametrize("name, config, what", [
    ("maple", {}, "text depth 9"), ("vpt_deep", {}, "vision depth 12"), ("dcp", {"n_ctx": 2}, "CMPA depth 9"),
    ("dpt", {}, "bottom_limit 12")])
def test_a_depth_too_large_for_the_small_clips_names_the_small_configs(name, config, what):
    small = methods.SMALL_MODEL_CONFIGS[name]
    with pytest.raises(ValueError, match=f"{what} is out of range.*fastprompt.methods.SMALL_MODEL_CONFIGS"
                                         f"\\['{name}'\\] = "):
        methods.build(name, tiny_clip(), CLASSNAMES, **config)
    methods.build(name, tiny_clip(), CLASSNAMES, **small)  # what the message says to use works


@pytest.mark.parametrize("args, kwargs, message", [
    ((768, 7, 512, 8), {}, r"n_head_visual=7 must be a whole number of at least 1 dividing d_model_visual=768"),
    ((768, 12, 512, 6), {}, r"n_head_text=6 must be a whole number of at least 1 dividing d_model_text=512"),
    ((768, 0, 512, 8), {}, r"n_head_visual=0 must be"),
    ((768, 12, 512, 8), {"design_details": {"fussing": "max"}}, r"design_details has no key 'fussing'; the "
                                                                r"original's keys are trainer, .*fusing"),
])
def test_cmpa_constructor_errors(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fastprompt.CrossModalPromptAttention(*args, **kwargs)


def test_cmpa_takes_the_public_codes_design_details_as_they_are():
    details = {"trainer": "CMPA", "vision_depth": 0, "language_depth": 0, "vision_ctx": 0, "language_ctx": 0,
               "cmpa_length": 16, "fusing": "max", "parameter_sharing": True}
    assert fastprompt.CrossModalPromptAttention(48, 3, 40, 5, design_details=details).fusing == "max"
