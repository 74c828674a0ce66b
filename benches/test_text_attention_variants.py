"""benches/text_attention_variants.py measures what it says: every variant that runs is checked against a
float64 per-sequence loop, and a wrong mask shows in that check. Tiny sizes on the CPU."""

import torch

from . import text_attention_variants

BLOCKS, PADDED, LOOP = "packed blocks (packed.py)", "padded SDPA", "per-sequence loop"


def test_attention_variants_match_float64():
    r = text_attention_variants.measure(12, 2, "cpu", torch.float32, rounds=1, log=lambda _: None,
                                        variants=[BLOCKS, PADDED, LOOP, "flex eager", "varlen_attn"])
    assert r["n"] == 12 and r["total"] == int(text_attention_variants.coop_lengths(12, 2).sum())
    for name in (BLOCKS, PADDED, LOOP):
        row = r["rows"][name]
        assert row["forward_error"] < 1e-5 and row["backward_error"] < 1e-5, (name, row)
        assert row["forward_ms"] > 0 and row["backward_ms"] > 0
    assert r["rows"]["flex eager"]["forward_error"] < 1e-5
    varlen = r["rows"]["varlen_attn"]  # flash-only: on a CPU the failure is the result
    assert varlen.get("forward_error", 0) < 1e-5 and ("forward_failed" in varlen or "forward_ms" in varlen)
    text = text_attention_variants.table(r)
    assert BLOCKS in text and PADDED in text and "varlen_attn" in text


def test_a_wrong_mask_shows_in_the_error(monkeypatch):
    """The error check can fail: padded attention without the causal mask is far from the reference."""
    def no_mask(layout):
        def pad(x):
            return torch.cat([x, x.new_zeros(1, *x.shape[1:])])[layout.pad_index].transpose(1, 2)

        def attend(q, k, v):
            o = torch.nn.functional.scaled_dot_product_attention(pad(q), pad(k), pad(v))
            return o.transpose(1, 2)[layout.valid]
        return attend

    monkeypatch.setitem(text_attention_variants.VARIANTS, "no mask", no_mask)
    r = text_attention_variants.measure(6, 2, "cpu", torch.float32, rounds=1, variants=["no mask"],
                                        log=lambda _: None)
    assert r["rows"]["no mask"]["forward_error"] > 1e-2
