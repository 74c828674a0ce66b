"""The packed text path's attention before and after issue 14's fix, in whole training steps, side by side.

Two attentions inside fastprompt's own training step (the method's loss, backward, SGD step), on one method
object (the same weights and prompt values), swapped in the text stream:
  before  the attention as it was until this fix (kept here, `padded_packed_block`): every suffix padded to the
          longest, the shared prefix's keys and values gathered for every sequence and cat'd before the
          suffix's, one masked SDPA over the padded (N, H, S, P + S) problem
  after   fastprompt.clip.packed.packed_attention: whole sequences packed into blocks, the prefix scored per
          group without a copy, one softmax over both
Rows as benches/train_step_figures.py's (coop, cocoop, maple, ... with their public recipes' defaults, the first
C ImageNet class names; cocoop and tmml at --bc-batch). Per row and attention: the loss at the same parameters
(fp32; the two must agree within 1e-5 relative, else the script exits with status 1), one warm-up step, one
profiled step for the peak memory (benches/peak_memory.py), then --rounds timed steps interleaved across all
rows and both attentions (a busy machine slows them alike): medians of wall-clock and process CPU seconds.

    python benches/packed_attention_figures.py [--methods coop maple cocoop] [--classes 100 200 1000]
        [--rounds 3] [--threads 1] [--model ViT-B-16] [--batch 4] [--bc-batch 1] [--out FILE] [--attention-only]

--attention-only times one text block's attention alone instead (forward + backward on random inputs at each
row's packed layout): before, and after at every block size make_layout weighs (block_row_choices), its
choice marked.

Prints a Markdown table per class count and, last, one JSON line {"rows": [...]}. MB are 2^20 bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fastprompt import methods  # noqa: E402
from fastprompt.clip import SMALL_CONFIGS, create_clip, streams  # noqa: E402
from fastprompt.clip.blocks import ClipBlock  # noqa: E402
from fastprompt.clip.packed import (  # noqa: E402
    PackedLayout, block_row_choices, make_layout, packed_attention, padded, unpadded)
from peak_memory import measured  # noqa: E402
from train_step_figures import PER_IMAGE_TEXT, ROWS, Run, report, seconds  # noqa: E402

LOSS_RTOL = 1e-5
MB = 2 ** 20


def padded_attention(q, k, v, heads: int, layout: PackedLayout, prefix_kv=None) -> torch.Tensor:
    """packed_attention as it was before issue 14's fix, q, k, v (T, D) → (T, D): on the padded (N, S) view of the
    suffixes, the prefix's keys and values gathered for every sequence (`t[layout.group]`) and cat'd before the
    suffix's, one masked SDPA."""
    q, k, v = (padded(t, layout).unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))  # (N, H, S, dh)
    if prefix_kv is None:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        pk, pv = (t[layout.group] for t in prefix_kv)
        s, p = q.shape[2], pk.shape[2]
        allowed = torch.ones(s, p + s, dtype=torch.bool, device=q.device)
        allowed[:, p:] = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
        o = F.scaled_dot_product_attention(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), attn_mask=allowed)
    return unpadded(o.transpose(1, 2).flatten(-2), layout)


def padded_packed_block(block: ClipBlock, x: torch.Tensor, layout: PackedLayout, x_ln=None, prefix_kv=None):
    """packed_block as it was before issue 14's fix (padded_attention)."""
    h = block.ln_1(x) if x_ln is None else x_ln
    o = padded_attention(*block.qkv(h), block.heads, layout, prefix_kv)
    return block.mlp_residual(block.attention_residual(x, o))


ATTENTIONS = {"before": padded_packed_block, "after": streams.packed_block}


@contextlib.contextmanager
def attention(name: str):
    """The text stream's packed block swapped for the one of `name` while the context lasts."""
    kept = streams.packed_block
    streams.packed_block = ATTENTIONS[name]
    try:
        yield
    finally:
        streams.packed_block = kept


def _step(method, optimizer, images, labels, attention_name):
    def step():
        with attention(attention_name):
            loss = method.loss(images, labels)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def build(model_name, clip_model, classes, rows, batch, bc_batch, device, seed) -> list:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    small = methods.SMALL_MODEL_CONFIGS if model_name in SMALL_CONFIGS else {}
    size = clip_model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    runs = []
    for row in rows:
        name, options = ROWS[row]
        torch.manual_seed(seed)
        method = methods.build(name, clip_model, list(IMAGENET_CLASSNAMES[:classes]),
                               **{**small.get(name, {}), **options}).to(device).train()
        b = bc_batch if name in PER_IMAGE_TEXT else batch
        g = torch.Generator().manual_seed(seed + 1)
        images = torch.randn(b, 3, size, size, generator=g).to(device)
        labels = torch.randint(0, classes, (b,), generator=g).to(device)
        for a in ATTENTIONS:
            with torch.no_grad(), attention(a):
                loss = float(method.loss(images, labels))
            optimizer = torch.optim.SGD(method.trainable_parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
            # train_step_figures' Run, its path the attention
            runs.append(Run(row, a, method, b, _step(method, optimizer, images, labels, a), loss))
    return runs


def _check_classes(classes: int) -> None:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    if not 1 <= classes <= len(IMAGENET_CLASSNAMES):
        raise ValueError(f"--classes takes 1 to {len(IMAGENET_CLASSNAMES)} ImageNet class names, got {classes}")


def measure(model_name="ViT-B-16", rows=("coop",), classes=100, batch=4, bc_batch=1, rounds=3, device=None, seed=0,
            clip_model=None, log=None) -> dict:
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    _check_classes(classes)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    load = os.getloadavg()[0]
    clip_model = clip_model or create_clip(model_name, device=device)
    runs = build(model_name, clip_model, classes, rows, batch, bc_batch, device, seed)
    for run in runs:
        t, _ = seconds(run.step, device)  # warm-up
        gc.collect()
        with measured(device) as m:
            run.step()
        run.peak_bytes = m.peak_bytes
        log(f"C = {classes} {run.row} {run.path}: warm-up {t:.2f} s, peak {run.peak_bytes / MB:.0f} MB")
    for r in range(rounds):
        for run in runs:
            wall, cpu = seconds(run.step, device)
            run.times.append(wall)
            run.cpu_times.append(cpu)
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{run.row} {run.path} {run.times[-1]:.2f} s" for run in runs))
    return dict(runs=runs, model=model_name, device=device, classes=classes, batch=batch, bc_batch=bc_batch,
                rounds=rounds, threads=torch.get_num_threads(), load=load, clip_model=clip_model)


def attention_sweep(model_name="ViT-B-16", rows=("coop",), classes=1000, batch=4, bc_batch=1, rounds=5,
                    device=None, seed=0, clip_model=None, prefix_reuse=True) -> dict:
    """One text block's attention alone, forward + backward on random q, k, v (T, D) and prefix keys and values,
    at each row's packed layout: before, and after at every block size make_layout weighs (block_row_choices;
    `default` marks its choice). Medians of `rounds` calls interleaved across the variants. prefix_reuse=False:
    the layouts without a shared prefix (the methods' option of that name)."""
    _check_classes(classes)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    clip_model = clip_model or create_clip(model_name, device=device)
    small = methods.SMALL_MODEL_CONFIGS if model_name in SMALL_CONFIGS else {}
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    found = []
    for row in rows:
        name, options = ROWS[row]
        config = {**small.get(name, {}), **options}
        if not prefix_reuse:
            config["prefix_reuse"] = False
        method = methods.build(name, clip_model, list(IMAGENET_CLASSNAMES[:classes]), **config)
        prompts, block = method.prompts, method.clip.text_blocks[0]
        prefix = prompts.prefix_for(method.text_path)
        eot = prompts.eot.repeat(bc_batch if name == "tmml" else 1)  # TMML's B·C sequences; CoCoOp's C per image
        length, heads, d = prompts.ids.shape[1], block.heads, block.width
        default = make_layout(eot, length, prefix)
        layouts = {("before", None): default}
        layouts.update({("after", bq): make_layout(eot, length, prefix, block_rows=bq)
                        for bq in block_row_choices(default.max_suffix)})
        layouts = {key: layout.to(device) for key, layout in layouts.items()}  # not inside the timed calls
        g = torch.Generator().manual_seed(seed)
        qkv = [torch.randn(default.total, d, generator=g).to(device) for _ in range(3)]
        kv = [torch.randn(1, heads, prefix, d // heads, generator=g).to(device) for _ in range(2)] if prefix else []

        def call(variant, layout):
            leaves = [t.clone().requires_grad_() for t in qkv + kv]
            fn = padded_attention if variant == "before" else packed_attention
            out = fn(*leaves[:3], heads, layout, tuple(leaves[3:]) or None)
            out.backward(torch.ones_like(out))

        times = {key: [] for key in layouts}
        for key, layout in layouts.items():
            call(key[0], layout)  # warm-up
        for _ in range(rounds):
            for key, layout in layouts.items():
                times[key].append(seconds(lambda: call(key[0], layout), device)[1 if device.type == "cpu" else 0])
        for (variant, bq), layout in layouts.items():
            slots = layout.pad_index.numel() if variant == "before" else layout.slot_token.numel()
            found.append(dict(method=row, classes=classes, prefix=prefix, sequences=eot.shape[0], tokens=layout.total,
                              max_suffix=layout.max_suffix, attention=variant, block_rows=bq, slots=slots,
                              default=variant == "after" and bq == default.block_rows,
                              ms=1000 * statistics.median(times[variant, bq])))
    return dict(rows=found, model=model_name, device=device, rounds=rounds, threads=torch.get_num_threads(),
                load=os.getloadavg()[0], clip_model=clip_model)


def sweep_table(r: dict) -> str:
    lines = [f"one text block's attention, forward + backward ({'CPU' if r['device'].type == 'cpu' else 'wall'} "
             f"ms), {r['model']} text width and heads, fp32, {r['device'].type} ({r['threads']} threads, load average "
             f"{r['load']:.1f}); medians of {r['rounds']} interleaved calls", "",
             "| method | C | P | N | T | S | attention | Bq | slots | ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        bq = "—" if x["block_rows"] is None else f"{x['block_rows']}" + (" (default)" if x["default"] else "")
        lines.append(f"| {x['method']} | {x['classes']} | {x['prefix']} | {x['sequences']:,} | {x['tokens']:,} | "
                     f"{x['max_suffix']} | {x['attention']} | {bq} | {x['slots']:,} | {x['ms']:.1f} |")
    return "\n".join(lines)


def _loss_error(runs, row) -> float:
    before, after = (next(r for r in runs if r.row == row and r.path == a) for a in ATTENTIONS)
    return abs(after.loss - before.loss) / max(abs(before.loss), 1e-12)


def table(r: dict) -> str:
    runs, cpu = r["runs"], r["device"].type == "cpu"
    lines = [f"training step with the packed attention before and after, {r['model']} (random weights), fp32, "
             f"{r['device'].type} ({r['threads']} threads, load average {r['load']:.1f} at the start), C = "
             f"{r['classes']} ImageNet class names, batch {r['batch']} (cocoop, tmml: {r['bc_batch']}); medians of "
             f"{r['rounds']} interleaved steps ({time.strftime('%Y-%m-%d')}, torch {torch.__version__})", "",
             f"| method | attention | step s | CPU s | peak MB | time after ÷ before ({'CPU' if cpu else 'wall'}) | "
             "peak after ÷ before | loss |", "|---|---|---|---|---|---|---|---|"]
    by = {(run.row, run.path): run for run in runs}
    for run in runs:
        ratio = ["—", "—"]
        if run.path == "after":
            before = by[run.row, "before"]
            time_ratio = run.cpu_s / before.cpu_s if cpu else run.step_s / before.step_s  # CPU s leave out others
            ratio = [f"{time_ratio:.2f}", f"{run.peak_bytes / max(before.peak_bytes, 1):.2f}"]
        loss = f"{run.loss:.6f}" + (f" (Δ {_loss_error(runs, run.row):.0e})" if run.path == "after" else "")
        lines.append(f"| {run.row} | {run.path} | {run.step_s:.3g} | {run.cpu_s:.3g} | "
                     f"{run.peak_bytes / MB:,.0f} | {ratio[0]} | {ratio[1]} | {loss} |")
    return "\n".join(lines)


def json_line(results: list) -> str:
    rows = [dict(method=run.row, attention=run.path, classes=r["classes"], batch=run.batch,
                 step_s=run.step_s, cpu_s=run.cpu_s, peak_mb=run.peak_bytes / MB,
                 loss=run.loss, model=r["model"], device=str(r["device"]))
            for r in results for run in r["runs"]]
    return json.dumps({"rows": rows})


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["coop", "maple", "cocoop"], choices=list(ROWS))
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--classes", type=int, nargs="+", default=[1000])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--bc-batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    parser.add_argument("--attention-only", action="store_true",
                        help="time one block's attention alone at every block size (attention_sweep), not steps")
    parser.add_argument("--no-prefix-reuse", action="store_true",
                        help="with --attention-only: the layouts without a shared prefix (prefix_reuse=False)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.attention_only:
        texts, clip_model, rows = [], None, []
        for classes in args.classes:
            r = attention_sweep(args.model, args.methods, classes, args.batch, args.bc_batch, max(args.rounds, 1),
                                args.device, args.seed, clip_model, not args.no_prefix_reuse)
            clip_model = r["clip_model"]
            rows += r["rows"]
            texts.append(sweep_table(r))
            print(texts[-1] + "\n", flush=True)
        report(texts, json.dumps({"rows": rows}), args.out)
        return 0
    results, texts, clip_model = [], [], None
    for classes in args.classes:
        r = measure(args.model, args.methods, classes, args.batch, args.bc_batch, args.rounds, args.device,
                    args.seed, clip_model)
        clip_model = r["clip_model"]
        results.append(r)
        texts.append(table(r))
        print(texts[-1] + "\n", flush=True)
    report(texts, json_line(results), args.out)
    bad = sorted({(r["classes"], run.row) for r in results for run in r["runs"]
                  if _loss_error(r["runs"], run.row) > LOSS_RTOL})
    if bad:
        print(f"loss check FAILED for {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
