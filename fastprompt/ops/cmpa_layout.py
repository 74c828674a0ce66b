"""The fp32 workspace of one CMPA side, shared by the Triton and CUDA kernels, which find its slots from the side's
sizes (kernels/cmpa.py `_xbar` ... `_h`, checked against this file by tests/ops/test_cmpa.py; csrc/cmpa.cu
`make_view`): what the forward keeps for the backward, and what the forward's fake describes. Row-major blocks,
in this order:
  xbar (M, D) pooled rows · p (M, D) the cross-modal projection · stats (6, M) mean and 1/std of LN1(p),
  LN1(x̄), LN2(x1) · qkv (M, 3D) · probs (H, M, M) attention probabilities · o (M, D) attention output ·
  x1 (M, D) after the attention residual · h (M, F) c_fc output before QuickGELU."""


def offsets(sizes):
    out, at = {}, 0
    for name, size in sizes:
        out[name] = (at, size)
        at += size
    out["_total"] = (at, 0)
    return out


def forward_layout(m: int, d: int, h: int, f: int) -> dict[str, tuple[int, int]]:
    """name -> (offset, size) in the forward workspace of one side."""
    return offsets([("xbar", m * d), ("p", m * d), ("stats", 6 * m), ("qkv", 3 * m * d), ("probs", h * m * m),
                    ("o", m * d), ("x1", m * d), ("h", m * f)])


def forward_size(m: int, d: int, h: int, f: int, compute: bool = True) -> int:
    """Floats of a side's saved workspace: all of it, or only its pooled rows when the side is not computed."""
    layout = forward_layout(m, d, h, f)
    return layout["_total"][0] if compute else layout["p"][0]
