"""The method options that fit fastprompt's small built-in CLIPs (fastprompt-tiny / -small)."""

# Configurations that fit the small built-in CLIPs (4 to 6 blocks per tower; the defaults assume 12): the
# built-in run and the tests use them.
SMALL_MODEL_CONFIGS: dict[str, dict] = {
    "coop": dict(n_ctx=4),
    "cocoop": dict(),
    "vpt_deep": dict(n_ctx=3, depth=3),
    "ivlp": dict(depth_text=3, depth_vision=3),
    "maple": dict(depth=3),
    "dcp": dict(n_ctx=4, depth=3),
    "dpt": dict(bottom_limit=4, top_k=3, n_visual_tokens=3, n_cavpt_tokens=2),
    "map_dafe": dict(depth=3),
    "tmml": dict(),
}
