"""The training-step figures' smoke run on the tiny CLIP (benches/train_step_figures.py): every row on both
paths, the two paths' losses equal within fp32 rounding, the JSON line, and the public codes' way checked
to train the very parameters fastprompt's path trains (same gradients)."""

import json

import pytest
import torch

from fastprompt import methods
from fastprompt.clip import create_clip

from . import train_step_figures as figures

PublicWay = figures.PublicWay  # the class the script runs (it imports benches/ modules by their own names)

TINY = ["--model", "fastprompt-tiny", "--threads", "1", "--rounds", "1"]


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_every_row_on_both_paths_with_equal_losses(tmp_path, capsys):
    out = tmp_path / "figures.md"
    assert figures.main(TINY + ["--classes", "5", "--batch", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = _last_json(printed)["rows"]
    assert {(r["method"], r["path"]) for r in rows} == {(m, p) for m in figures.ROWS for p in figures.PATHS}
    by = {(r["method"], r["path"]): r for r in rows}
    for name in figures.ROWS:
        public, fast = by[name, "public"], by[name, "fastprompt"]
        assert abs(public["loss"] - fast["loss"]) <= 1e-5 * abs(public["loss"]), (name, public["loss"], fast["loss"])
        for r in (public, fast):
            assert r["step_s"] > 0 and r["peak_mb"] > 0 and r["gflop"] > 0, r
        # the packed path computes fewer text tokens and FLOPs, and holds less memory, even at C = 5
        assert fast["text_tokens"] < public["text_tokens"] and fast["gflop"] < public["gflop"], name
        assert fast["peak_mb"] < public["peak_mb"], name
    assert by["cocoop", "public"]["text_tokens"] == 1 * 5 * 77  # --bc-batch 1: B·C·77
    assert by["coop", "public"]["text_tokens"] == 5 * 77 and by["coop", "public"]["batch"] == 3
    assert out.read_text().strip().splitlines()[-1] == printed.strip().splitlines()[-1]
    assert all(f"| {name} | fastprompt |" in printed for name in figures.ROWS)


def test_growth_and_a_failing_loss_check(monkeypatch, capsys):
    """Two class counts give the public way's growth; a public way that computes another loss fails the run."""
    assert figures.main(TINY + ["--methods", "coop", "--classes", "4", "6"]) == 0
    printed = capsys.readouterr().out
    assert "extrapolated to C = 1000" in printed
    assert {r["classes"] for r in _last_json(printed)["rows"]} == {4, 6}
    original = PublicWay.loss
    monkeypatch.setattr(PublicWay, "loss", lambda self, images, labels: original(self, images, labels) * (1 + 1e-3))
    assert figures.main(TINY + ["--methods", "coop", "--classes", "4"]) == 1


@pytest.mark.parametrize("row", list(figures.ROWS))
def test_public_way_gives_the_methods_gradients(row):
    """Both paths' gradients of every trained tensor agree: the public way trains what fastprompt trains."""
    name, options = figures.ROWS[row]
    torch.manual_seed(0)
    method = methods.build(name, create_clip("fastprompt-tiny"), ["dog", "sea lion", "golden retriever", "cat"],
                           **{**methods.SMALL_MODEL_CONFIGS[name], **options}).train()
    g = torch.Generator().manual_seed(1)
    images, labels = torch.randn(3, 3, 32, 32, generator=g), torch.tensor([0, 2, 3])
    params = [p for p in method.parameters() if p.requires_grad]
    got = torch.autograd.grad(method.loss(images, labels), params, allow_unused=True)
    want = torch.autograd.grad(PublicWay(method).loss(images, labels), params, allow_unused=True)
    for (pname, _), g1, g2 in zip([(n, p) for n, p in method.named_parameters() if p.requires_grad], got, want):
        assert (g1 is None) == (g2 is None), pname
        if g1 is not None:
            err = (g1.double() - g2.double()).norm() / g2.double().norm().clamp_min(1e-12)
            assert err <= 1e-5 or (g1 - g2).abs().max() <= 1e-7, (pname, float(err))
