"""The packed text path's attention (fastprompt/clip/packed.py, packed_attention): causal attention within each
packed sequence, plus its group's shared prefix, on whole sequences packed into blocks. Checked in float64
against a naive attention written here (each sequence cut out, its group's prefix keys and values cat'd before
its own, an explicit masked softmax), forward and every gradient, on odd layouts: one group and several, groups
of unequal sizes given in any order, suffixes of one row, no prefix, every block size; and the tower on it
against the full 77-token forward with per-group prefixes and activation checkpointing."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastprompt.clip import ClipBackbone, create_clip, encode_packed, make_layout
from fastprompt.clip.packed import block_row_choices, packed_attention

from ..helpers import DEVICES

HEADS, DH = 3, 5  # an odd head width: nothing assumes a round one


def naive_attention(q, k, v, layout, suffix, group, prefix_kv=None):
    """Per sequence n of group g: softmax(q kᵀ/√dh) v over [its group's P prefix rows, its own rows ≤ t]."""
    out, start = [], 0
    for n, s in enumerate(suffix.tolist()):
        rows = slice(start, start + s)
        start += s
        qn, kn, vn = (t[rows].view(s, HEADS, DH).transpose(0, 1) for t in (q, k, v))  # (H, s, dh)
        allowed = torch.ones(s, s, dtype=torch.bool).tril()
        if prefix_kv is not None:
            pk, pv = (t[int(group[n])] for t in prefix_kv)  # (H, P, dh)
            kn, vn = torch.cat([pk, kn], 1), torch.cat([pv, vn], 1)
            allowed = torch.cat([torch.ones(s, pk.shape[1], dtype=torch.bool), allowed], 1)
        scores = (qn @ kn.transpose(-1, -2)) / DH ** 0.5
        weights = scores.masked_fill(~allowed, float("-inf")).exp()
        weights = weights / weights.sum(-1, keepdim=True)
        out.append((weights @ vn).transpose(0, 1).reshape(s, HEADS * DH))
    return torch.cat(out)


def _inputs(suffix, group, prefix_len, seed):
    g = torch.Generator().manual_seed(seed)
    total, groups = int(suffix.sum()), int(group.max()) + 1
    qkv = [torch.randn(total, HEADS * DH, generator=g, dtype=torch.float64) for _ in range(3)]
    kv = [torch.randn(groups, HEADS, prefix_len, DH, generator=g, dtype=torch.float64) for _ in range(2)]
    upstream = torch.randn(total, HEADS * DH, generator=g, dtype=torch.float64)
    return qkv, kv if prefix_len else [], upstream


def _check(suffix, group, prefix_len, seed=0, block_rows=None):
    """packed_attention against naive_attention: the output and the gradients of q, k, v and the prefix's keys
    and values, float64, within 1e-12."""
    suffix, group = torch.tensor(suffix), torch.tensor(group)
    layout = make_layout(suffix + prefix_len - 1, 80, prefix_len, group, block_rows=block_rows)
    qkv, kv, upstream = _inputs(suffix, group, prefix_len, seed)
    results = []
    for attention in (packed_attention, None):
        leaves = [t.clone().requires_grad_() for t in qkv + kv]
        prefix = tuple(leaves[3:]) or None
        if attention is None:
            out = naive_attention(*leaves[:3], layout, suffix, group, prefix)
        else:
            out = attention(*leaves[:3], HEADS, layout, prefix)
        results.append((out, torch.autograd.grad(out, leaves, upstream)))
    (got, got_grads), (want, want_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    one_key = prefix_len == 0 and int(suffix.max()) == 1  # every softmax over one key: q, k get exact zeros
    for name, a, b in zip(["q", "k", "v", "prefix k", "prefix v"], got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")
        if not (one_key and name in ("q", "k")):
            assert b.abs().sum() > 0, name  # the input reaches the output: a zero gradient would prove nothing
    return layout, got


@pytest.mark.parametrize("prefix_len", [0, 1, 4])
def test_one_group(prefix_len):
    """One group (CoOp's classes sharing SOS and the context; TMML's sequences sharing SOS), suffixes of 1 to 9
    rows, among them several of one row."""
    _check([3, 1, 9, 4, 1, 1, 7, 2, 5], [0] * 9, prefix_len)


@pytest.mark.parametrize("prefix_len", [0, 2])
def test_groups_of_unequal_sizes_in_any_order(prefix_len):
    """Three groups of 1, 2 and 4 sequences given interleaved: each sequence sees its own group's prefix only."""
    _check([2, 5, 1, 3, 6, 1, 4], [2, 0, 1, 0, 0, 2, 0], prefix_len)


def test_a_group_per_image_as_cocoop():
    """G = B groups of the same C classes (CoCoOp's per-image prefixes), laid out image by image."""
    classes = [3, 1, 6, 2, 4]
    _check(classes * 3, [b for b in range(3) for _ in classes], 5)


@pytest.mark.parametrize("block_rows", [9, 16, 40])
def test_every_block_size_gives_the_same_attention(block_rows):
    """The blocks are a schedule, not the math: the tightest (Bq = the longest suffix), the default's and a wide one
    (mostly padding) agree with the naive attention and with each other."""
    suffix, group = [9, 1, 4, 4, 2, 8, 3], [0, 1, 0, 1, 1, 0, 0]
    layout, got = _check(suffix, group, 3, block_rows=block_rows)
    assert layout.block_rows == block_rows
    _, default = _check(suffix, group, 3)
    torch.testing.assert_close(got, default, rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 12), st.integers(0, 3)), min_size=1, max_size=12),
       st.integers(0, 4), st.integers(0, 2 ** 31 - 1))
def test_random_layouts(sequences, prefix_len, seed):
    """Any suffix lengths, any groups (renumbered 0..G-1 in order of appearance), any prefix, fresh inputs."""
    suffix = [s for s, _ in sequences]
    numbers = {}
    group = [numbers.setdefault(g, len(numbers)) for _, g in sequences]
    _check(suffix, group, prefix_len, seed)


def _error(got, want) -> float:
    return float((got.detach().double() - want.detach()).abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_within_twice_the_eager_error(device, dtype):
    """In fp32, bf16 and fp16 (on a GPU: what bf16 autocast runs) the packed attention's output and every gradient
    stay within twice the error of the naive attention run eagerly in the same dtype, both measured against it
    in float64; two groups with a prefix, suffixes of 1 to 13 rows."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    suffix, group = torch.tensor([13, 1, 6, 9, 2, 13, 4, 7]), torch.tensor([0, 1, 0, 1, 1, 0, 0, 1])
    layout = make_layout(suffix + 3 - 1, 80, 3, group).to(device)
    qkv, kv, upstream = _inputs(suffix, group, 3, seed=7)
    qkv, kv, upstream = ([t.to(device) for t in ts] for ts in (qkv, kv, [upstream]))

    def run(attention, cast):
        leaves = [t.to(cast).requires_grad_() for t in qkv + kv]
        out = attention(*leaves[:3], leaves[3:])
        return [out, *torch.autograd.grad(out, leaves, upstream[0].to(cast))]

    def fused(q, k, v, prefix):
        return packed_attention(q, k, v, HEADS, layout, tuple(prefix))

    def naive(q, k, v, prefix):
        return naive_attention(q, k, v, layout, suffix, group.to(device), tuple(prefix))

    exact, eager, got = run(naive, torch.float64), run(naive, dtype), run(fused, dtype)
    for name, e, a, g in zip(["out", "q", "k", "v", "prefix k", "prefix v"], exact, eager, got):
        assert g.dtype == dtype, name
        bound = 2 * _error(a, e) + 1e-6 * float(e.detach().abs().max())  # + fp32 rounding where eager happens to be exact
        assert _error(g, e) <= bound, (name, _error(g, e), _error(a, e))


def test_the_blocks_hold_whole_sequences():
    """Each block of Bq slots holds whole sequences of one group, in order, and every packed row has one slot."""
    suffix, group = torch.tensor([5, 1, 3, 7, 2, 2, 6]), torch.tensor([0, 1, 1, 0, 0, 1, 1])
    layout = make_layout(suffix + 1, 80, 2, group)
    assert layout.block_rows >= int(suffix.max()) and layout.group_slots % layout.block_rows == 0
    slot = layout.token_slot
    assert torch.equal(layout.slot_token[slot], torch.arange(layout.total))
    assert slot.unique().numel() == layout.total
    for n in range(len(suffix)):
        rows = slot[int(layout.cu[n]):int(layout.cu[n + 1])]
        assert torch.equal(rows, rows[0] + torch.arange(len(rows)))  # consecutive, in order
        assert int(rows[0]) // layout.block_rows == int(rows[-1]) // layout.block_rows  # one block
        assert int(rows[0]) // layout.group_slots == int(group[n])  # its group's row of the grid
    blocks = (layout.groups * layout.group_slots) // layout.block_rows
    assert layout.blocked.shape == (blocks, layout.block_rows, layout.block_rows)


def test_the_block_size_is_chosen_where_padding_and_scores_cost_least():
    """By default Bq is the one of block_row_choices (multiples of 16 from S to 2S) that minimises
    slots × (P + Bq + SLOT_COST): 100 suffixes of four rows and one of nine fill blocks of 16 with almost no
    padding; suffixes of 17 to 30 rows, mostly one per block of 32, take blocks of 48."""
    suffix = torch.tensor([4] * 100 + [9])
    layout = make_layout(suffix + 16, 80, 17)
    assert layout.block_rows == 16
    assert layout.total / layout.slot_token.numel() > 0.95
    assert block_row_choices(9) == [16, 32] and block_row_choices(17) == [32, 48, 64]
    torch.manual_seed(0)
    long = torch.randint(17, 31, (200,))
    assert make_layout(long, 80, 1).block_rows == 48


def test_bad_layouts_are_refused_before_any_work():
    eot = torch.tensor([4, 6, 3])
    with pytest.raises(ValueError, match="shorter than the longest suffix"):
        make_layout(eot, 10, 1, block_rows=5)
    with pytest.raises(ValueError, match="one group per sequence"):
        make_layout(eot, 10, 1, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="numbered 0..G-1"):
        make_layout(eot, 10, 1, torch.tensor([0, 2, 2]))


def test_the_attention_reads_no_value_on_the_host():
    """On the meta device (shapes, no values) the attention runs forward and backward: it reads no tensor's value
    on the host, which on CUDA would be a synchronisation in every training step (the layout is built once)."""
    suffix, group = torch.tensor([3, 1, 5, 2]), torch.tensor([0, 1, 0, 1])
    layout = make_layout(suffix + 1, 10, 2, group).to("meta")
    q, k, v = (torch.empty(int(suffix.sum()), HEADS * DH, device="meta", requires_grad=True) for _ in range(3))
    pk, pv = (torch.empty(2, HEADS, 2, DH, device="meta", requires_grad=True) for _ in range(2))
    out = packed_attention(q, k, v, HEADS, layout, (pk, pv))
    assert out.shape == q.shape
    grads = torch.autograd.grad(out.sum(), [q, k, v, pk, pv])
    assert [g.shape for g in grads] == [t.shape for t in (q, k, v, pk, pv)]


@pytest.fixture(scope="module")
def clip():
    return ClipBackbone(create_clip("fastprompt-tiny").double())


@pytest.mark.parametrize("checkpoint", [False, True], ids=["", "checkpointed"])
def test_the_tower_with_a_prefix_per_group_is_the_full_forward(clip, checkpoint):
    """The text tower on the packed path with G = 3 groups of unequal sizes, each sharing its own prefix (as
    CoCoOp's per-image context), equals the full 77-token forward: features and the embeddings' gradient, in
    float64, with and without activation checkpointing."""
    import open_clip

    names = ["dog", "sea lion", "x", "a b c d e", "cat", "golden retriever", "y"]
    group = torch.tensor([0, 0, 1, 1, 1, 2, 0])
    p = 4
    tokens = open_clip.tokenize([f"X X X {name}." for name in names])
    torch.manual_seed(0)
    emb = clip.token_embeddings(tokens).detach().clone()
    emb[:, 1:p] = torch.randn(3, p - 1, clip.text_width, dtype=emb.dtype)[group]  # one context per group
    eot = clip.eot_index(tokens)
    layout = make_layout(eot, tokens.shape[1], p, group)
    upstream = torch.randn(len(names), clip.embed_dim, dtype=emb.dtype)
    results = []
    for packed in (False, True):
        leaf = emb.clone().requires_grad_()
        if packed:
            feats = encode_packed(clip, leaf, layout, checkpoint=checkpoint)
        else:
            feats = clip.encode_text_stream(clip.text_stream(leaf), eot, checkpoint=checkpoint)
        results.append((feats, torch.autograd.grad(feats, leaf, upstream)[0]))
    (full, full_grad), (fast, fast_grad) = results
    torch.testing.assert_close(fast, full, rtol=1e-10, atol=1e-10)
    # the packed path reads each group's prefix from its first sequence: the gradient of the group's prefix rows
    # lands there, the sum of what the full forward gives that group's sequences
    want = full_grad.clone()
    want[:, :p] = 0
    for g, first in enumerate(layout.first.tolist()):
        want[first, :p] = full_grad[group == g, :p].sum(0)
    after_eot = torch.arange(tokens.shape[1])[None, :] > eot[:, None]
    want[after_eot] = 0  # rows after EOT never reach the features (the full forward gives them exact zeros too)
    torch.testing.assert_close(fast_grad, want, rtol=1e-10, atol=1e-10)
