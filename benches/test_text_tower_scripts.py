"""gpu_check.py's text-tower parts run on the CPU at tiny sizes (the GPU check itself runs only on a lent GPU),
and what they measure is what they say: every path of the text-tower figures gives open_clip's features."""

from . import gpu_check, text_tower_figures

BLOCKS, PADDED, LOOP = "packed blocks (packed.py)", "padded SDPA", "per-sequence loop"


def test_gpu_check_text_tower_parts_run_on_the_cpu():
    tables = []
    (r,) = gpu_check.text_tower_tables("fastprompt-tiny", classes=6, contexts=(2,), rounds=1, write=tables.append)
    assert set(r["agreement"]) == set(text_tower_figures.PATHS)
    assert max(r["agreement"].values()) < 1e-5, r["agreement"]  # every path computes open_clip's features
    assert {d for _, d in r["text"]} == {"forward", "forward+backward"}
    assert set(r["end_to_end"]) == set(text_tower_figures.END_TO_END)
    (a,) = gpu_check.attention_tables("cpu", classes=6, contexts=(16,), rounds=1, variants=[BLOCKS, PADDED, LOOP],
                                      write=tables.append)
    assert all(a["rows"][v]["backward_error"] < 1e-5 for v in (BLOCKS, PADDED, LOOP))
    assert len(tables) == 2 and not any("failed" in t for t in tables)
    assert "open_clip encode_text" in tables[0] and "vs both off" in tables[0]
    assert "16 context tokens" in tables[1]
