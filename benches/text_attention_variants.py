"""Causal attention over the packed text sequences: which implementation the packed path should use.

fastprompt's packed text path (fastprompt/clip/packed.py) runs every per-token layer on the sequences cut at
their EOT and packed, (T, D), and runs attention on whole sequences packed into blocks (packed_attention).
This script times that choice against the alternatives, on the attention of one block of a ViT-B/16 text tower
(8 heads of 64) over CoOp's sequences for the first C ImageNet class names with n context tokens (the ragged
lengths to EOT that CoOp produces, no shared prefix), forward and forward + backward:

  packed blocks     fastprompt.clip.packed.packed_attention: whole sequences packed into blocks of Bq slots,
                    one masked Bq × Bq score matmul per block (what packed.py does)
  padded SDPA       pad (T, H, dh) → (N, H, S, dh), scaled_dot_product_attention(is_causal=True), unpad
                    (what packed.py did before; causality keeps the padding out of every real token's keys)
  flex eager        FlexAttention on the packed (1, H, T, dh) with a document + causal block mask
  flex compiled     the same under torch.compile
  varlen_attn       torch.nn.attention.varlen.varlen_attn with cumulative lengths, causal (flash: CUDA only)
  per-sequence loop one SDPA call per sequence

Masks and index tensors are per static layout, made once outside the timings; the first call of each
(where torch.compile compiles) is reported apart. Every variant's output and input gradients are checked
against the per-sequence loop in float64; a variant that fails to run is a cell of the table with its error.
The timed calls are interleaved round by round, all forwards first, then all forwards + backwards.

    python benches/text_attention_variants.py [--classes 200] [--ctx 2 16] [--rounds 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HEADS, HEAD_DIM = 8, 64  # ViT-B/16's text tower: width 512


def coop_lengths(n_classes: int, n_ctx: int) -> torch.Tensor:
    """Lengths up to EOT inclusive of CoOp's sequences ([SOS] ctx_1..ctx_n {class}. [EOT]) over the first
    n_classes ImageNet names. Tokenization only: the tiny CLIP is built for its tokenizer settings."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    from fastprompt import methods
    from fastprompt.clip import create_clip

    if not 1 <= n_classes <= len(IMAGENET_CLASSNAMES):
        raise ValueError(f"classes must be in 1..{len(IMAGENET_CLASSNAMES)}, got {n_classes}")
    coop = methods.build("coop", create_clip("fastprompt-tiny"), list(IMAGENET_CLASSNAMES[:n_classes]), n_ctx=n_ctx)
    return coop.prompts.eot.long() + 1


class Layout:
    """The packed layout of sequences of `lengths`: cumulative lengths, each token's sequence, and the
    packed row of every padded slot (T for padding), on `device`."""

    def __init__(self, lengths: torch.Tensor, device):
        lengths = lengths.cpu().long()
        self.lengths = lengths.tolist()
        self.n, self.total, self.max_len = len(self.lengths), int(lengths.sum()), int(lengths.max())
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        slot = torch.arange(self.max_len)
        self.valid = (slot[None, :] < lengths[:, None]).to(device)
        self.pad_index = torch.where(self.valid.cpu(), cu[:-1, None] + slot[None, :],
                                     torch.full((self.n, self.max_len), self.total)).to(device)
        self.doc = torch.repeat_interleave(torch.arange(self.n), lengths).to(device)
        self.cu = cu.to(device=device, dtype=torch.int32)
        self.starts = cu[:-1].tolist()


# ---- the variants: (T, H, dh) packed q, k, v → (T, H, dh) ------------------------------------------------
def packed_blocks(layout: Layout):
    from fastprompt.clip.packed import make_layout, packed_attention

    lengths = torch.tensor(layout.lengths)
    blocks = make_layout(lengths - 1, int(lengths.max())).to(layout.cu.device)

    def attend(q, k, v):
        total, heads, dh = q.shape
        o = packed_attention(*(x.reshape(total, heads * dh) for x in (q, k, v)), heads, blocks)
        return o.view(total, heads, dh)
    return attend


def padded_sdpa(layout: Layout):
    def attend(q, k, v):
        def pad(x):  # (T, H, dh) → (N, H, S, dh), zeros in the padding slots
            return torch.cat([x, x.new_zeros(1, *x.shape[1:])])[layout.pad_index].transpose(1, 2)
        o = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), is_causal=True)
        return o.transpose(1, 2)[layout.valid]
    return attend


def flex(layout: Layout, compiled: bool):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    doc = layout.doc

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    mask = create_block_mask(document_causal, None, None, layout.total, layout.total, device=doc.device)
    if compiled:
        # a compile that failed before (FlexAttention's backward on a CPU) leaves dynamo running flex_attention
        # eagerly from then on: start from a clean state, so that this variant is compiled (and its compile
        # counted in its first call)
        torch._dynamo.reset()
    run = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention

    def attend(q, k, v):
        o = run(*(x.transpose(0, 1)[None] for x in (q, k, v)), block_mask=mask)
        return o[0].transpose(0, 1)
    return attend


def varlen(layout: Layout):
    from torch.nn.attention.varlen import varlen_attn

    def attend(q, k, v):
        m = layout.max_len
        return varlen_attn(q, k, v, layout.cu, layout.cu, m, m, window_size=(-1, 0))  # (-1, 0): causal
    return attend


def per_sequence(layout: Layout):
    def attend(q, k, v):
        outs = []
        for start, length in zip(layout.starts, layout.lengths):
            qs, ks, vs = (x[start:start + length].transpose(0, 1)[None] for x in (q, k, v))
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)[0].transpose(0, 1))
        return torch.cat(outs)
    return attend


# the compiled variant last: its compiles are the slow part of a run with a time limit (the GPU check)
VARIANTS = {"packed blocks (packed.py)": packed_blocks, "padded SDPA": padded_sdpa, "varlen_attn": varlen, "per-sequence loop": per_sequence,
            "flex eager": lambda lay: flex(lay, False), "flex compiled": lambda lay: flex(lay, True)}


# ---- measuring ----------------------------------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_ms(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def _forward(attend, q, k, v):
    def forward():
        with torch.no_grad():
            return attend(q, k, v)
    return forward


def _forward_backward(attend, leaves, grad):
    def forward_backward():
        for x in leaves:
            x.grad = None
        out = attend(*leaves)
        out.backward(grad)
        return out
    return forward_backward


def _inputs(layout, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, grad = (torch.randn(layout.total, HEADS, HEAD_DIM, generator=g, dtype=torch.float64)
                     for _ in range(4))
    return (q, k, v), grad


def _reference(inputs, grad, layout):
    """The per-sequence loop in float64 on the CPU: the output and the gradients of q, k, v."""
    leaves = [x.clone().requires_grad_() for x in inputs]
    out = per_sequence(layout)(*leaves)
    out.backward(grad)
    return out.detach(), [x.grad for x in leaves]


def _error(got, want) -> float:
    return float((got.detach().double().cpu() - want).abs().max())


def _failure(exc) -> str:
    """The exception's type and first sentence, short enough for a table cell."""
    text = str(exc).splitlines()[0].split(". ")[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:120]}"


def measure(n_classes=200, n_ctx=2, device="cpu", dtype=torch.float32, rounds=5, variants=None, log=print):
    """One table: for each variant its setup time, and for the forward and the forward + backward the median
    ms, the first call's seconds and the max abs error against float64 (or why it failed)."""
    device = torch.device(device)
    load = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    lengths = coop_lengths(n_classes, n_ctx)
    layout = Layout(lengths, device)
    inputs, grad = _inputs(layout, device, dtype)
    ref_out, ref_grads = _reference(inputs, grad, Layout(lengths, "cpu"))
    q, k, v = (x.to(device, dtype) for x in inputs)
    g = grad.to(device, dtype)
    rows, attends = {}, {}
    for name in variants or VARIANTS:
        row = rows[name] = {}
        try:
            t0 = time.perf_counter()
            attends[name] = VARIANTS[name](layout)
            _sync(device)
            row["setup_s"] = time.perf_counter() - t0
        except Exception as exc:
            row["setup_failed"] = _failure(exc)
    # all forwards, then all forwards + backwards: a compiled backward that fails cannot then turn a
    # compiled forward eager before its timings
    for key in ("forward", "backward"):
        timed = {}
        for name, attend in attends.items():
            row = rows[name]
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]
            fn = _forward(attend, q, k, v) if key == "forward" else _forward_backward(attend, leaves, g)
            try:
                t0 = time.perf_counter()
                out = fn()  # the first call: compiles under torch.compile
                _sync(device)
                row[f"{key}_first_s"] = time.perf_counter() - t0
                errors = [_error(out, ref_out)]
                if key == "backward":
                    errors += [_error(x.grad, r) for x, r in zip(leaves, ref_grads)]
                row[f"{key}_error"] = max(errors)
                fn()  # warm-up
                timed[name] = (fn, [])
            except Exception as exc:  # a variant that cannot run here is a result too
                row[f"{key}_failed"] = _failure(exc)
            log(f"{name} {key}: {row}")
        # the rounds interleave the variants, so that a busy machine slows them alike
        for _ in range(rounds):
            for fn, times in timed.values():
                times.append(_time_ms(fn, device))
        for name, (_, times) in timed.items():
            rows[name][f"{key}_ms"] = statistics.median(times)
    return dict(classes=n_classes, ctx=n_ctx, device=str(device), dtype=str(dtype).replace("torch.", ""),
                n=layout.n, total=layout.total, max_len=layout.max_len, mean_len=layout.total / layout.n,
                rounds=rounds, rows=rows, threads=torch.get_num_threads(), load=load)


def table(r) -> str:
    lines = [f"causal attention over packed sequences, {r['device']}, {r['dtype']}, C = {r['classes']} ImageNet "
             f"class names, {r['ctx']} context tokens: {r['n']} sequences, {r['total']} tokens (mean length "
             f"{r['mean_len']:.1f}, max {r['max_len']}), {HEADS} heads of {HEAD_DIM}, {r['threads']} threads, load "
             f"average {r['load']:.1f} at the start; median of {r['rounds']} interleaved runs, first call and max "
             "abs error against float64 in brackets", "",
             "| variant | forward ms | forward + backward ms |", "|---|---|---|"]
    for name, row in r["rows"].items():
        if "setup_failed" in row:
            lines.append(f"| {name} | failed: {row['setup_failed']} | |")
            continue
        cells = []
        for key in ("forward", "backward"):
            if f"{key}_failed" in row:
                cells.append(f"failed: {row[key + '_failed']}")
            else:
                cells.append(f"{row[key + '_ms']:,.1f} (first {row[key + '_first_s']:.2f} s, "
                             f"error {row[key + '_error']:.0e})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--ctx", type=int, nargs="+", default=[2, 16])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 on the CPU, bfloat16 on CUDA by default")
    parser.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (torch's default: one per core); on a shared machine 1 is steadier")
    parser.add_argument("--out", default=None, help="append the tables to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    for n_ctx in args.ctx:
        text = table(measure(args.classes, n_ctx, args.device, dtype, args.rounds, args.variants))
        print(text + "\n", flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(text + "\n\n")
