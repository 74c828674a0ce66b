"""The drop-in reproduces the original DCP PromptAttention module: every case of the golden file
(outputs, input gradients and parameter gradients computed by the original code in float32)."""

from pathlib import Path

import pytest
import torch

import fastprompt
from fastprompt.testing import assert_close

GOLDEN = torch.load(Path(__file__).parents[1] / "data" / "cmpa_peer.pt", weights_only=True)
CASES = GOLDEN["cases"]


def _id(case):
    return f"{case['fusing']}-M{case['visual_context'].shape[0]}-Dv{case['d_model_visual']}"


def test_golden_file_has_the_nine_cases():
    assert GOLDEN["format"] == 1 and len(CASES) == 9
    assert {c["fusing"] for c in CASES} == {"mean", "first", "max"}


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("backend", fastprompt.backends.BACKENDS)
def test_reproduces_the_original_module(case, backend):
    if fastprompt.backends.unavailable_reason("cmpa", backend, torch.device("cpu")) is not None:
        pytest.skip(f"{backend} does not serve CPU tensors here")
    module = fastprompt.CrossModalPromptAttention(
        case["d_model_visual"], case["n_head_visual"], case["d_model_text"], case["n_head_text"],
        design_details={"fusing": case["fusing"]}, backend=backend)
    module.load_state_dict(case["state_dict"], strict=True)
    assert list(module.state_dict()) == list(case["state_dict"])  # same keys, same order
    visual = case["visual_context"].clone().requires_grad_()
    text = case["textual_context"].clone().requires_grad_()
    new_visual, new_text = module(visual, text)
    assert new_visual.stride()[1] == 0 and new_text.stride()[1] == 0
    torch.autograd.backward([new_visual, new_text], [case["grad_new_visual"], case["grad_new_textual"]])
    # fp32 against fp32: both sides carry rounding, so the comparison is the golden README's "fp32
    # rounding": DESIGN.md's fp32 bound with the original's float32 result standing as the reference.
    assert_close("new_visual", new_visual, case["new_visual"])
    assert_close("new_textual", new_text, case["new_textual"])
    assert_close("grad visual_context", visual.grad, case["grad_visual_context"])
    assert_close("grad textual_context", text.grad, case["grad_textual_context"])
    params = dict(module.named_parameters())
    for name, grad in case["grad_params"].items():
        assert_close(f"grad {name}", params[name].grad, grad)
    for name in set(params) - set(case["grad_params"]):  # parameters the original never reaches
        assert params[name].grad is None or torch.count_nonzero(params[name].grad) == 0, name
