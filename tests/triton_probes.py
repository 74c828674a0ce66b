"""Triton kernels that only the tests launch (importing this module needs triton)."""

import triton
import triton.language as tl

from fastprompt.kernels.cmpa import (_da, _db, _dc, _dh, _do, _dother, _dqkv, _dx1, _dxbar_ln, _dy, _h, _o, _p,
                                     _probs, _qkv, _stats, _x1, _xbar)


@triton.jit
def cmpa_workspace_slots(s, M):
    """Writes k at the first element of the k-th slot (from 1) of each workspace of the side view `s`, in the
    order of fastprompt/ops/cmpa_layout.py's forward layout and kernels/cmpa.py's backward_layout."""
    tl.store(_xbar(s, M), 1.0)
    tl.store(_p(s, M), 2.0)
    tl.store(_stats(s, M), 3.0)
    tl.store(_qkv(s, M), 4.0)
    tl.store(_probs(s, M), 5.0)
    tl.store(_o(s, M), 6.0)
    tl.store(_x1(s, M), 7.0)
    tl.store(_h(s, M), 8.0)
    tl.store(_dy(s, M), 1.0)
    tl.store(_dh(s, M), 2.0)
    tl.store(_dc(s, M), 3.0)
    tl.store(_dx1(s, M), 4.0)
    tl.store(_do(s, M), 5.0)
    tl.store(_dqkv(s, M), 6.0)
    tl.store(_da(s, M), 7.0)
    tl.store(_db(s, M), 8.0)
    tl.store(_dxbar_ln(s, M), 9.0)
    tl.store(_dother(s, M), 10.0)
