"""Prompt insertion + LayerNorm: every backend against the naive float64 implementation, forward and
backward, both modes, shared and per-sample prompts, int and per-sequence starts; layouts, autocast,
opcheck, torch.compile, a property test and bad input."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastprompt
from fastprompt.testing import assert_close, poisoned_outputs

from .. import naive
from ..helpers import BACKENDS, DEVICES, LOW_PRECISION, NOT_EMULATED, grads_of, leaf, require_backend

MODES = ["replace", "insert"]


def make_case(n, length, m, d, mode, shared, per_sequence, seed=0, device="cpu", dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length, d, generator=gen)
    prompts = torch.randn(m, d, generator=gen) if shared else torch.randn(n, m, d, generator=gen)
    hi = length - m if mode == "replace" else length
    start = torch.randint(0, hi + 1, (n,), generator=gen) if per_sequence else min(1, hi)
    ln_w, ln_b = 1 + 0.2 * torch.randn(d, generator=gen), 0.2 * torch.randn(d, generator=gen)
    to = dict(device=device, dtype=dtype)
    return (x.to(**to), prompts.to(**to), start.to(device) if per_sequence else start, ln_w.to(**to),
            ln_b.to(**to))


def run(fn, x, prompts, start, ln_w, ln_b, mode, upstream, dtype=None):
    """Outputs (y, y_ln) and the gradients of (x, prompts, ln_w, ln_b) for upstream (dy, dy_ln)."""
    leaves = [leaf(t, dtype) if t is not None else None for t in (x, prompts, ln_w, ln_b)]
    y, y_ln = fn(leaves[0], leaves[1], start, leaves[2], leaves[3], 1e-5, mode)
    outs = [y] + ([y_ln] if y_ln is not None else [])
    ups = [u.to(y.dtype) for u in upstream[:len(outs)]]
    grads = grads_of(outs, [t for t in leaves if t is not None], ups)
    return (y, y_ln), grads


def assert_matches(outs, grads, ref_outs, ref_grads, eager=None):
    eager_outs, eager_grads = eager if eager is not None else ((None, None), [None] * len(ref_grads))
    assert_close("y", outs[0], ref_outs[0], eager_outs[0])
    if ref_outs[1] is None:
        assert outs[1] is None
    else:
        assert_close("y_ln", outs[1], ref_outs[1], eager_outs[1])
    for i, (got, ref) in enumerate(zip(grads, ref_grads)):
        assert_close(f"grad {['x', 'prompts', 'ln_weight', 'ln_bias'][i]}", got, ref, eager_grads[i])


def assert_leaf_grads_match(leaves, ref_leaves):
    """The .grad of (x, prompts, ln_weight, ln_bias) against the float64 run's; an input the used output does not
    reach may get no gradient or zeros."""
    for name, got, ref in zip(["x", "prompts", "ln_weight", "ln_bias"], leaves, ref_leaves):
        if ref.grad is None:
            assert got.grad is None or torch.count_nonzero(got.grad) == 0, name
        else:
            assert_close(f"grad {name}", got.grad, ref.grad)


def fastprompt_insert(backend):
    def fn(x, prompts, start, ln_w, ln_b, eps, mode):
        return fastprompt.insert_prompts(x, prompts, start, ln_w, ln_b, eps, mode, backend=backend)
    return fn


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-sample"])
@pytest.mark.parametrize("per_sequence", [False, True], ids=["int-start", "tensor-start"])
@pytest.mark.parametrize("n,length,m,d", [(1, 5, 1, 24), (5, 9, 3, 40), (3, 12, 7, 96), (2, 7, 2, 24),
                                          (20, 40, 3, 96)])  # the last: more row tiles than programs
@pytest.mark.parametrize("layer_norm", [True, False], ids=["ln", "no-ln"])
def test_matches_naive_fp32(device, backend, mode, shared, per_sequence, n, length, m, d, layer_norm):
    dev = require_backend("insert_prompts", backend, device)
    x, prompts, start, ln_w, ln_b = make_case(n, length, m, d, mode, shared, per_sequence, seed=n * d + m,
                                              device=dev)
    if not layer_norm:
        ln_w = ln_b = None
    l_out = length + m if mode == "insert" else length
    upstream = [torch.randn(n, l_out, d, device=dev), torch.randn(n, l_out, d, device=dev)]
    with poisoned_outputs():
        outs, grads = run(fastprompt_insert(backend), x, prompts, start, ln_w, ln_b, mode, upstream)
    ref = run(naive.insert, x, prompts, start, ln_w, ln_b, mode, upstream, torch.float64)
    assert_matches(outs, grads, *ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_only_one_output_used(backend, mode):
    """Vision block 0 continues from y_ln alone; a plain replacement from y alone; .sum() upstreams."""
    require_backend("insert_prompts", backend, "cpu")
    x, prompts, start, ln_w, ln_b = make_case(3, 8, 2, 24, mode, True, True, seed=5)
    for pick in (0, 1):
        leaves = [leaf(t) for t in (x, prompts, ln_w, ln_b)]
        outs = fastprompt.insert_prompts(leaves[0], leaves[1], start, leaves[2], leaves[3], mode=mode,
                                         backend=backend)
        outs[pick].sum().backward()
        ref_leaves = [leaf(t, torch.float64) for t in (x, prompts, ln_w, ln_b)]
        naive.insert(ref_leaves[0], ref_leaves[1], start, ref_leaves[2], ref_leaves[3], 1e-5, mode)[pick].sum() \
            .backward()
        assert_leaf_grads_match(leaves, ref_leaves)


def test_replaced_rows_get_zero_gradient_and_shared_prompts_the_sum():
    x = leaf(torch.randn(3, 6, 4))
    prompts = leaf(torch.randn(2, 4))
    y, _ = fastprompt.insert_prompts(x, prompts, 1)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad[:, 1:3], torch.zeros(3, 2, 4))
    assert torch.equal(x.grad[:, 0], torch.ones(3, 4)) and torch.equal(x.grad[:, 3:], torch.ones(3, 3, 4))
    assert torch.equal(prompts.grad, torch.full((2, 4), 3.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_low_precision_within_twice_eager_error(device, backend, dtype, mode):
    dev = require_backend("insert_prompts", backend, device, dtype)
    case = make_case(4, 11, 3, 40, mode, False, True, seed=7, device=dev)
    l_out = 14 if mode == "insert" else 11
    upstream = [torch.randn(4, l_out, 40, device=dev), torch.randn(4, l_out, 40, device=dev)]
    ref = run(naive.insert, *case, mode, upstream, torch.float64)
    eager = run(naive.insert, *case, mode, upstream, dtype)
    with poisoned_outputs():
        outs, grads = run(fastprompt_insert(backend), *case, mode, upstream, dtype)
    assert outs[0].dtype == dtype and outs[1].dtype == dtype
    assert_matches(outs, grads, *ref, eager)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_non_contiguous_inputs(backend, mode):
    require_backend("insert_prompts", backend, "cpu")
    x = torch.randn(9, 4, 24).transpose(0, 1)          # (N=4, L=9, D) with L-major storage
    prompts = torch.randn(4, 3, 48)[:, :, ::2]          # per-sample prompts, stride 2 in the last dim
    ln_w, ln_b = torch.randn(48)[::2], torch.randn(24)
    start = torch.tensor([6, 9, 5, 9, 2, 9, 0, 9])[::2]  # a strided start tensor: 6, 5, 2, 0
    l_out = 12 if mode == "insert" else 9
    upstream = [torch.randn(4, l_out, 24), torch.randn(4, l_out, 24).transpose(1, 2).contiguous().transpose(1, 2)]
    with poisoned_outputs():
        outs, grads = run(fastprompt_insert(backend), x, prompts, start, ln_w, ln_b, mode, upstream)
    assert_matches(outs, grads, *run(naive.insert, x, prompts, start, ln_w, ln_b, mode, upstream, torch.float64))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("per_sequence", [False, True])
def test_gradcheck_float64(mode, per_sequence):
    x, prompts, start, ln_w, ln_b = make_case(2, 5, 2, 4, mode, True, per_sequence, seed=9, dtype=torch.float64)
    leaves = [leaf(t) for t in (x, prompts, ln_w, ln_b)]

    def fn(x, prompts, ln_w, ln_b):
        return fastprompt.insert_prompts(x, prompts, start, ln_w, ln_b, mode=mode, backend="reference")

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_opcheck_raw_ops(backend, mode):
    require_backend("insert_prompts", backend, "cpu")
    fwd = getattr(torch.ops.fastprompt, f"insert_prompts_fwd_{backend}").default
    bwd = getattr(torch.ops.fastprompt, f"insert_prompts_bwd_{backend}").default
    x, prompts, _, ln_w, ln_b = make_case(3, 7, 2, 24, mode, True, False)
    starts = torch.tensor([0, 3, 5])
    for start, per_seq in [(2, None), (0, starts)]:
        for lw, lb in [(ln_w, ln_b), (None, None), (ln_w, None)]:
            args = (x, prompts, start, per_seq, lw, lb, 1e-5, mode)
            torch.library.opcheck(fwd, args)
            y, _, saved = fwd(*args)
            grad_ln = torch.randn_like(y) if lw is not None else None
            torch.library.opcheck(bwd, (torch.randn_like(y), grad_ln, x, prompts, start, per_seq, lw, lb, saved, 1e-5,
                                        mode))


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_sequence", [False, True])
def test_torch_compile_fullgraph_matches_eager(backend, per_sequence):
    require_backend("insert_prompts", backend, "cpu")
    x, prompts, start, ln_w, ln_b = make_case(3, 9, 2, 24, "insert", False, per_sequence, seed=11)
    upstream = [torch.randn(3, 11, 24), torch.randn(3, 11, 24)]

    def fn(x, prompts, start, ln_w, ln_b, eps, mode):
        return fastprompt.insert_prompts(x, prompts, start, ln_w, ln_b, eps, mode, backend=backend)

    eager = run(fn, x, prompts, start, ln_w, ln_b, "insert", upstream)
    compiled = run(torch.compile(fn, fullgraph=True), x, prompts, start, ln_w, ln_b, "insert", upstream)
    for a, b in zip(compiled[0] + tuple(compiled[1]), eager[0] + tuple(eager[1])):
        torch.testing.assert_close(a, b)


def test_autocast_follows_the_autocast_dtype():
    x, prompts, start, ln_w, ln_b = make_case(3, 9, 2, 24, "replace", True, False)
    leaves = [leaf(t) for t in (x, prompts, ln_w, ln_b)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ln = fastprompt.insert_prompts(leaves[0], leaves[1], start, leaves[2], leaves[3])
    assert y.dtype == torch.bfloat16 and y_ln.dtype == torch.bfloat16
    (y.float().sum() + y_ln.float().square().sum()).backward()
    assert all(t.grad.dtype == torch.float32 for t in leaves)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), n=st.integers(1, 5), length=st.integers(1, 12), d=st.integers(1, 33),
       mode=st.sampled_from(MODES), shared=st.booleans(), per_sequence=st.booleans(), layer_norm=st.booleans(),
       transposed=st.booleans(), seed=st.integers(0, 2**16))
def test_property_reference_matches_naive(data, n, length, d, mode, shared, per_sequence, layer_norm, transposed,
                                          seed):
    m = data.draw(st.integers(1, length if mode == "replace" else 6))
    hi = length - m if mode == "replace" else length
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(length, n, d, generator=gen, dtype=torch.float64).transpose(0, 1) if transposed else \
        torch.randn(n, length, d, generator=gen, dtype=torch.float64)
    prompts = torch.randn(*((m, d) if shared else (n, m, d)), generator=gen, dtype=torch.float64)
    start = torch.tensor(data.draw(st.lists(st.integers(0, hi), min_size=n, max_size=n))) if per_sequence \
        else data.draw(st.integers(0, hi))
    ln_w, ln_b = (torch.randn(d, generator=gen, dtype=torch.float64) for _ in range(2))
    if not layer_norm:
        ln_w = ln_b = None
    l_out = length + m if mode == "insert" else length
    upstream = [torch.randn(n, l_out, d, generator=gen, dtype=torch.float64) for _ in range(2)]
    outs, grads = run(fastprompt_insert("reference"), x, prompts, start, ln_w, ln_b, mode, upstream)
    ref_outs, ref_grads = run(naive.insert, x, prompts, start, ln_w, ln_b, mode, upstream)
    torch.testing.assert_close(outs[0], ref_outs[0], rtol=0, atol=0)
    if layer_norm:
        torch.testing.assert_close(outs[1], ref_outs[1], rtol=1e-9, atol=1e-10)
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10)


# ---- bad input ---------------------------------------------------------------------------------

X, P = torch.randn(3, 8, 24), torch.randn(2, 24)


@pytest.mark.parametrize("args,kw,error,match", [
    ((torch.randn(8, 24), P, 0), {}, ValueError, r"x must be 3-D \(N, L, D\)"),
    ((X, torch.randn(24), 0), {}, ValueError, "prompts must be 2-D or 3-D"),
    ((X, torch.randn(2, 16), 0), {}, ValueError, "prompts have width 16 but x has width 24"),
    ((X, torch.randn(4, 2, 24), 0), {}, ValueError, "per-sequence prompts have N=4 but x has N=3"),
    ((X, torch.randn(9, 24), 0), {}, ValueError, "cannot replace M=9 rows of a stream of length L=8"),
    ((torch.randn(3, 0, 24), P, 0), {"mode": "insert"}, ValueError, "x is empty"),
    ((X, torch.randn(0, 24), 0), {}, ValueError, "prompts is empty"),
    ((X, P, 7), {}, ValueError, r"start=7 is out of range: 0 <= start <= L - M = 6"),
    ((X, P, -1), {}, ValueError, "start=-1 is out of range"),
    ((X, P, 9), {"mode": "insert"}, ValueError, r"start=9 is out of range: 0 <= start <= L = 8"),
    ((X, P, torch.tensor([0, 7, 2])), {}, ValueError, "start holds offsets from 0 to 7, out of range"),
    ((X, P, torch.tensor([0, -2, 2])), {}, ValueError, "start holds offsets from -2 to 2, out of range"),
    ((X, P, torch.tensor([0, 1])), {}, ValueError, r"start must have shape \(3,\)"),
    ((X, P, torch.tensor([0.0, 1.0, 2.0])), {}, TypeError, "a start tensor must be int64"),
    ((X, P, 1.5), {}, TypeError, "start must be an int or an int64 tensor"),
    ((X, P, True), {}, TypeError, "got a bool"),
    ((X, P, 0), {"mode": "append"}, ValueError, "mode must be one of"),
    ((X, P, 0, torch.ones(16)), {}, ValueError, r"ln_weight must have shape \(24,\)"),
    ((X, P.double(), 0), {}, TypeError, "mixed dtypes: x is torch.float32 but prompts is torch.float64"),
    ((X, P, 0, torch.ones(24).half()), {}, TypeError, "mixed dtypes"),
    ((X.long(), P.long(), 0), {}, TypeError, "dtype torch.int64"),
    ((X, P.to("meta"), 0), {}, ValueError, "x is on cpu and prompts is on meta"),
    pytest.param((X, P, 0), {"backend": "cuda"}, fastprompt.BackendUnavailableError,
                 "backend 'cuda' cannot run insert_prompts", marks=NOT_EMULATED),
])
def test_bad_input_raises_a_clear_error(args, kw, error, match):
    with pytest.raises(error, match=match):
        fastprompt.insert_prompts(*args, **kw)


# ---- packed streams (cu_seqlens) ------------------------------------------------------------------------------

PACKED = "insert_prompts_packed"
# (lengths, M, D, cu_seqlens dtype); ragged lengths where M fits, and the last: more row tiles than programs
PACKED_CASES = [([1, 2, 5, 17, 40], 1, 24, torch.int64), ([5, 2, 17, 40, 3], 2, 40, torch.int32),
                ([40, 17, 7], 5, 96, torch.int64),
                ([3 + (7 * i) % 15 for i in range(60)], 3, 24, torch.int32)]


def make_packed_case(lengths, m, d, shared, per_sequence, seed=0, device="cpu", dtype=torch.float32,
                     cu_dtype=torch.int64):
    gen = torch.Generator().manual_seed(seed)
    n, total = len(lengths), sum(lengths)
    cu = torch.tensor([0] + lengths).cumsum(0).to(cu_dtype)
    x = torch.randn(total, d, generator=gen)
    prompts = torch.randn(m, d, generator=gen) if shared else torch.randn(n, m, d, generator=gen)
    if per_sequence:  # any offset that keeps the prompts inside each sequence
        start = torch.stack([torch.randint(0, length - m + 1, (), generator=gen) for length in lengths])
    else:
        start = min(1, min(lengths) - m)
    ln_w, ln_b = 1 + 0.2 * torch.randn(d, generator=gen), 0.2 * torch.randn(d, generator=gen)
    to = dict(device=device, dtype=dtype)
    return (x.to(**to), prompts.to(**to), cu.to(device), start.to(device) if per_sequence else start, ln_w.to(**to),
            ln_b.to(**to))


def run_packed(fn, x, prompts, cu, start, ln_w, ln_b, upstream, dtype=None):
    """Outputs (y, y_ln) and the gradients of (x, prompts, ln_w, ln_b) for upstream (dy, dy_ln)."""
    leaves = [leaf(t, dtype) if t is not None else None for t in (x, prompts, ln_w, ln_b)]
    y, y_ln = fn(leaves[0], leaves[1], cu, start, leaves[2], leaves[3], 1e-5)
    outs = [y] + ([y_ln] if y_ln is not None else [])
    ups = [u.to(y.dtype) for u in upstream[:len(outs)]]
    grads = grads_of(outs, [t for t in leaves if t is not None], ups)
    return (y, y_ln), grads


def fastprompt_packed(backend):
    def fn(x, prompts, cu, start, ln_w, ln_b, eps):
        return fastprompt.insert_prompts(x, prompts, start, ln_w, ln_b, eps, cu_seqlens=cu, backend=backend)
    return fn


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-sample"])
@pytest.mark.parametrize("per_sequence", [False, True], ids=["int-start", "tensor-start"])
@pytest.mark.parametrize("case", range(len(PACKED_CASES)))
@pytest.mark.parametrize("layer_norm", [True, False], ids=["ln", "no-ln"])
def test_packed_matches_naive_fp32(device, backend, shared, per_sequence, case, layer_norm):
    dev = require_backend(PACKED, backend, device)
    lengths, m, d, cu_dtype = PACKED_CASES[case]
    x, prompts, cu, start, ln_w, ln_b = make_packed_case(lengths, m, d, shared, per_sequence, seed=case,
                                                         device=dev, cu_dtype=cu_dtype)
    if not layer_norm:
        ln_w = ln_b = None
    upstream = [torch.randn(x.shape, device=dev), torch.randn(x.shape, device=dev)]
    with poisoned_outputs():
        outs, grads = run_packed(fastprompt_packed(backend), x, prompts, cu, start, ln_w, ln_b, upstream)
    ref = run_packed(naive.insert_packed, x, prompts, cu, start, ln_w, ln_b, upstream, torch.float64)
    assert_matches(outs, grads, *ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_one_output_used(backend):
    """The packed text path reads both outputs; a caller of y_ln alone or y alone gets the gradients of that one
    (the kernels' paths without dy, and without dy_ln)."""
    require_backend(PACKED, backend, "cpu")
    x, prompts, cu, start, ln_w, ln_b = make_packed_case([4, 9, 2], 2, 24, False, True, seed=3)
    upstream = torch.randn(x.shape)
    for pick in (0, 1):
        leaves = [leaf(t) for t in (x, prompts, ln_w, ln_b)]
        ref_leaves = [leaf(t, torch.float64) for t in (x, prompts, ln_w, ln_b)]
        with poisoned_outputs():
            out = fastprompt.insert_prompts(leaves[0], leaves[1], start, leaves[2], leaves[3], cu_seqlens=cu,
                                            backend=backend)[pick]
        out.backward(upstream)
        naive.insert_packed(ref_leaves[0], ref_leaves[1], cu, start, ref_leaves[2], ref_leaves[3], 1e-5)[pick] \
            .backward(upstream.double())
        assert_leaf_grads_match(leaves, ref_leaves)


def test_packed_replaced_rows_get_zero_gradient_and_shared_prompts_the_sum():
    x, prompts = leaf(torch.randn(9, 4)), leaf(torch.randn(2, 4))
    cu = torch.tensor([0, 2, 6, 9])  # lengths 2, 4, 3; prompts at rows 0-1, 3-4, 7-8
    y, _ = fastprompt.insert_prompts(x, prompts, torch.tensor([0, 1, 1]), cu_seqlens=cu)
    y.backward(torch.ones_like(y))
    replaced = torch.tensor([1, 1, 0, 1, 1, 0, 0, 1, 1], dtype=torch.bool)
    assert torch.equal(x.grad[replaced], torch.zeros(6, 4)) and torch.equal(x.grad[~replaced], torch.ones(3, 4))
    assert torch.equal(prompts.grad, torch.full((2, 4), 3.0))
    assert torch.equal(y.detach()[replaced], prompts.detach().repeat(3, 1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_packed_low_precision_within_twice_eager_error(device, backend, dtype):
    dev = require_backend(PACKED, backend, device, dtype)
    case = make_packed_case([6, 11, 3, 9], 3, 40, False, True, seed=7, device=dev)
    upstream = [torch.randn(case[0].shape, device=dev) for _ in range(2)]
    ref = run_packed(naive.insert_packed, *case, upstream, torch.float64)
    eager = run_packed(naive.insert_packed, *case, upstream, dtype)
    with poisoned_outputs():
        outs, grads = run_packed(fastprompt_packed(backend), *case, upstream, dtype)
    assert outs[0].dtype == dtype and outs[1].dtype == dtype
    assert_matches(outs, grads, *ref, eager)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_non_contiguous_inputs(backend):
    require_backend(PACKED, backend, "cpu")
    x = torch.randn(24, 14).t()                           # (T=14, D=24), column-major
    prompts = torch.randn(3, 2, 48)[:, :, ::2]           # per-sample prompts, stride 2 in the last dim
    ln_w, ln_b = torch.randn(48)[::2], torch.randn(24)
    cu = torch.tensor([0, 9, 3, 9, 8, 9, 14, 9])[::2]     # a strided cu_seqlens: 0, 3, 8, 14
    start = torch.tensor([0, 9, 3, 9, 1, 9])[::2]         # a strided start tensor: 0, 3, 1
    upstream = [torch.randn(14, 24), torch.randn(24, 14).t()]
    with poisoned_outputs():
        outs, grads = run_packed(fastprompt_packed(backend), x, prompts, cu, start, ln_w, ln_b, upstream)
    assert_matches(outs, grads, *run_packed(naive.insert_packed, x, prompts, cu, start, ln_w, ln_b, upstream,
                                            torch.float64))


@pytest.mark.parametrize("per_sequence", [False, True])
def test_packed_gradcheck_float64(per_sequence):
    x, prompts, cu, start, ln_w, ln_b = make_packed_case([3, 5, 2], 2, 4, True, per_sequence, seed=9,
                                                         dtype=torch.float64)

    def fn(x, prompts, ln_w, ln_b):
        return fastprompt.insert_prompts(x, prompts, start, ln_w, ln_b, cu_seqlens=cu, backend="reference")

    assert torch.autograd.gradcheck(fn, [leaf(t) for t in (x, prompts, ln_w, ln_b)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_opcheck_raw_ops(backend):
    require_backend(PACKED, backend, "cpu")
    fwd = getattr(torch.ops.fastprompt, f"{PACKED}_fwd_{backend}").default
    bwd = getattr(torch.ops.fastprompt, f"{PACKED}_bwd_{backend}").default
    x, prompts, cu, _, ln_w, ln_b = make_packed_case([3, 7, 4], 2, 24, True, False)
    for p, start, per_seq in [(prompts, 1, None), (prompts.expand(3, 2, 24).contiguous(), 0, torch.tensor([0, 5, 2]))]:
        for lw, lb in [(ln_w, ln_b), (None, None), (ln_w, None)]:
            args = (x, p, cu, start, per_seq, lw, lb, 1e-5)
            torch.library.opcheck(fwd, args)
            y, _, saved = fwd(*args)
            grad_ln = torch.randn_like(y) if lw is not None else None
            torch.library.opcheck(bwd, (torch.randn_like(y), grad_ln, x, p, cu, start, per_seq, lw, lb, saved, 1e-5))


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_torch_compile_fullgraph_matches_eager(backend):
    require_backend(PACKED, backend, "cpu")
    x, prompts, cu, start, ln_w, ln_b = make_packed_case([4, 9, 2], 2, 24, False, True, seed=11)
    upstream = [torch.randn(x.shape), torch.randn(x.shape)]
    fn = fastprompt_packed(backend)
    eager = run_packed(fn, x, prompts, cu, start, ln_w, ln_b, upstream)
    compiled = run_packed(torch.compile(fn, fullgraph=True), x, prompts, cu, start, ln_w, ln_b, upstream)
    for a, b in zip(compiled[0] + tuple(compiled[1]), eager[0] + tuple(eager[1])):
        torch.testing.assert_close(a, b)


@settings(max_examples=30, deadline=None)
@given(data=st.data(), lengths=st.lists(st.integers(1, 9), min_size=1, max_size=5), d=st.integers(1, 17),
       shared=st.booleans(), per_sequence=st.booleans(), layer_norm=st.booleans(), seed=st.integers(0, 2**16))
def test_packed_property_reference_matches_naive(data, lengths, d, shared, per_sequence, layer_norm, seed):
    m = data.draw(st.integers(1, min(lengths)))
    gen = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0] + lengths).cumsum(0)
    x = torch.randn(sum(lengths), d, generator=gen, dtype=torch.float64)
    prompts = torch.randn(*((m, d) if shared else (len(lengths), m, d)), generator=gen, dtype=torch.float64)
    start = torch.tensor([data.draw(st.integers(0, n - m)) for n in lengths]) if per_sequence \
        else data.draw(st.integers(0, min(lengths) - m))
    ln_w, ln_b = (torch.randn(d, generator=gen, dtype=torch.float64) for _ in range(2))
    if not layer_norm:
        ln_w = ln_b = None
    upstream = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for _ in range(2)]
    outs, grads = run_packed(fastprompt_packed("reference"), x, prompts, cu, start, ln_w, ln_b, upstream)
    ref_outs, ref_grads = run_packed(naive.insert_packed, x, prompts, cu, start, ln_w, ln_b, upstream)
    torch.testing.assert_close(outs[0], ref_outs[0], rtol=0, atol=0)
    if layer_norm:
        torch.testing.assert_close(outs[1], ref_outs[1], rtol=1e-9, atol=1e-10)
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10)


XP, CU = torch.randn(12, 24), torch.tensor([0, 3, 7, 12])  # lengths 3, 4, 5


@pytest.mark.parametrize("args,kw,error,match", [
    ((X, P, 0), {"cu_seqlens": CU}, ValueError, r"x must be 2-D \(T, D\): packed sequences"),
    ((XP, torch.randn(24), 0), {"cu_seqlens": CU}, ValueError, "prompts must be 2-D or 3-D"),
    ((XP, P, 0), {"cu_seqlens": CU, "mode": "insert"}, ValueError, "packed streams .* take mode 'replace' only"),
    ((XP, P, 0), {"cu_seqlens": [0, 3, 7, 12]}, TypeError, "cu_seqlens must be an int32 or int64 tensor"),
    ((XP, P, 0), {"cu_seqlens": CU.float()}, TypeError, "cu_seqlens must be int32 or int64, got torch.float32"),
    ((XP, P, 0), {"cu_seqlens": CU[None]}, ValueError, r"cu_seqlens must be 1-D \(N \+ 1,\)"),
    ((XP, P, 0), {"cu_seqlens": CU[:1]}, ValueError, "with N >= 1 sequences"),
    ((XP, P, 0), {"cu_seqlens": CU.to("meta")}, ValueError, "cu_seqlens is on meta but x is on cpu"),
    ((XP, torch.randn(2, 16), 0), {"cu_seqlens": CU}, ValueError, "prompts have width 16 but x has width 24"),
    ((XP, torch.randn(4, 2, 24), 0), {"cu_seqlens": CU}, ValueError,
     "per-sequence prompts have N=4 but cu_seqlens holds N=3"),
    ((torch.randn(0, 24), P, 0), {"cu_seqlens": torch.tensor([0, 0])}, ValueError, "x is empty"),
    ((XP, torch.randn(0, 24), 0), {"cu_seqlens": CU}, ValueError, "prompts is empty"),
    ((XP, P, 0, torch.ones(16)), {"cu_seqlens": CU}, ValueError, r"ln_weight must have shape \(24,\)"),
    ((XP, P.double(), 0), {"cu_seqlens": CU}, TypeError, "mixed dtypes"),
    ((XP, P.to("meta"), 0), {"cu_seqlens": CU}, ValueError, "x is on cpu and prompts is on meta"),
    ((XP, P, -1), {"cu_seqlens": CU}, ValueError, "start=-1 is out of range"),
    ((XP, P, True), {"cu_seqlens": CU}, TypeError, "got a bool"),
    ((XP, P, torch.tensor([0, 1])), {"cu_seqlens": CU}, ValueError, r"start must have shape \(3,\)"),
    ((XP, P, torch.tensor([0, 1, 2]).to("meta")), {"cu_seqlens": CU}, ValueError, "start is on meta"),
    ((XP, P, 0), {"cu_seqlens": torch.tensor([1, 3, 7, 12])}, ValueError, "cu_seqlens must start at 0, got 1"),
    ((XP, P, 0), {"cu_seqlens": torch.tensor([0, 3, 7, 11])}, ValueError, "cu_seqlens ends at 11 but x has T=12"),
    ((XP, P, 0), {"cu_seqlens": torch.tensor([0, 8, 7, 12])}, ValueError, "cu_seqlens must not decrease"),
    ((XP, P, 2), {"cu_seqlens": CU}, ValueError, "sequence 0 has length 3, too short for M=2 prompt rows from start=2"),
    ((XP, P, torch.tensor([0, 1, 4])), {"cu_seqlens": CU}, ValueError,
     "sequence 2 has length 5, too short for M=2 prompt rows from start=4"),
    ((XP, P, torch.tensor([0, -1, 1])), {"cu_seqlens": CU}, ValueError, "start holds an offset of -1"),
    ((XP, torch.randn(6, 24), 0), {"cu_seqlens": CU}, ValueError, "sequence 0 has length 3, too short for M=6"),
    pytest.param((XP, P, 0), {"cu_seqlens": CU, "backend": "cuda"}, fastprompt.BackendUnavailableError,
                 "backend 'cuda' cannot run insert_prompts_packed", marks=NOT_EMULATED),
])
def test_packed_bad_input_raises_a_clear_error(args, kw, error, match):
    with pytest.raises(error, match=match):
        fastprompt.insert_prompts(*args, **kw)
