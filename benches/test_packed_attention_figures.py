"""The packed attention's before/after figures' smoke run on the tiny CLIP (benches/packed_attention_figures.py):
both attentions in whole training steps with equal losses, the attention-only sweep, the JSON line, and the
attention kept as it was equal to fastprompt's in float64 (so that the figures compare one function)."""

import json

import torch

from fastprompt.clip import make_layout
from fastprompt.clip.packed import packed_attention

from . import packed_attention_figures as figures

TINY = ["--model", "fastprompt-tiny", "--threads", "1", "--rounds", "1", "--classes", "5"]


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_steps_with_both_attentions_give_one_loss(tmp_path, capsys):
    out = tmp_path / "figures.md"
    assert figures.main(TINY + ["--methods", "coop", "cocoop", "tmml", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = _last_json(printed)["rows"]
    assert {(r["method"], r["attention"]) for r in rows} == {(m, a) for m in ("coop", "cocoop", "tmml")
                                                             for a in figures.ATTENTIONS}
    by = {(r["method"], r["attention"]): r for r in rows}
    for name in ("coop", "cocoop", "tmml"):
        before, after = by[name, "before"], by[name, "after"]
        assert abs(before["loss"] - after["loss"]) <= 1e-5 * abs(before["loss"]), name
        assert before["step_s"] > 0 and after["peak_mb"] > 0
    assert out.read_text().strip().splitlines()[-1] == printed.strip().splitlines()[-1]


def test_the_attention_only_sweep(capsys):
    assert figures.main(TINY + ["--methods", "coop", "--attention-only"]) == 0
    rows = _last_json(capsys.readouterr().out)["rows"]
    assert [r["attention"] for r in rows][0] == "before"
    assert sum(r["default"] for r in rows) == 1 and all(r["ms"] > 0 for r in rows)


def test_the_attention_before_is_the_attention_after():
    suffix, group = torch.tensor([3, 1, 6, 2, 4]), torch.tensor([0, 1, 0, 1, 1])
    layout = make_layout(suffix + 1, 10, 2, group)
    torch.manual_seed(0)
    q, k, v = (torch.randn(int(suffix.sum()), 12, dtype=torch.float64) for _ in range(3))
    kv = tuple(torch.randn(2, 3, 2, 4, dtype=torch.float64) for _ in range(2))
    for prefix in (kv, None):
        want = packed_attention(q, k, v, 3, layout, prefix)
        torch.testing.assert_close(figures.padded_attention(q, k, v, 3, layout, prefix), want, rtol=1e-12, atol=1e-12)


def test_the_loss_check_fails_when_the_attentions_differ(monkeypatch, capsys):
    """The script compares the two attentions' losses: one that drops the prefix's keys makes it fail."""
    def wrong(block, x, layout, x_ln=None, prefix_kv=None):
        return figures.padded_packed_block(block, x, layout, x_ln, None)

    monkeypatch.setitem(figures.ATTENTIONS, "before", wrong)
    assert figures.main(TINY + ["--methods", "coop"]) == 1
    assert "loss check FAILED for [(5, 'coop')]" in capsys.readouterr().err
