"""Timing half of the prepared GPU check (benches/gpu_check.sh runs the build and the tests first).

Three parts (--only picks some; gpu_check.sh runs the ops, then the text-tower parts under their own limit):
  ops        for about ten representative shapes of the three ops, forward + backward of: eager PyTorch (the
             reference math), torch.compile of it, CUDA-graph replay of it, and fastprompt's triton and cuda
             backends where they run. Each time is the median of CUDA-event timings after a warm-up, rotating
             among enough copies of the inputs and weights to exceed twice the L2 cache, so that weights are
             read from device memory as in a training step (CMPA's bf16 weights, 22 MB, would otherwise sit
             in an H100's 50 MB L2). Each result is appended to OUT/results.jsonl as soon as it is measured;
             the table is written to OUT/results.md.
  text       the text-tower figures (benches/text_tower_figures.py), ViT-B/16, C = 1000, 2 and 16 context
             tokens: open_clip's encode_text against EOT packing and packing + prefix reuse, forward and
             forward + backward, and CoOp's logits end to end
  attention  the causal attention of the packed path (benches/text_attention_variants.py), C = 1000, 2 and
             16 context tokens, bf16: packed blocks (packed.py), padded SDPA, varlen_attn, a per-sequence loop, FlexAttention eager
             and compiled, forward and forward + backward
Every table is appended to OUT/results.md and printed as soon as it is measured.

    python benches/gpu_check.py --out benches/results/<card>-<date> [--skip-compile] [--reps 50]
                                [--only ops text attention]
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fastprompt  # noqa: E402
from fastprompt import backends  # noqa: E402
from fastprompt.ops import cross_modal_prompt_attention, dafe_fusion, insert_prompts  # noqa: E402
from fastprompt.reference.cmpa import cmpa_eager  # noqa: E402
from fastprompt.reference.dafe import dafe_eager  # noqa: E402
from fastprompt.reference.insert_prompts import insert_eager  # noqa: E402

DTYPE = torch.bfloat16
PROVIDERS = ["eager", "compile", "cudagraph", "triton", "cuda"]


def cmpa_case(m, b, c):
    dv, hv, dt, ht = 768, 12, 512, 8

    def make():
        module = fastprompt.CrossModalPromptAttention(dv, hv, dt, ht).cuda().to(DTYPE)
        return [torch.randn(m, b, dv), torch.randn(m, c, dt)], list(module.side_params("visual")) + list(
            module.side_params("text"))

    def eager(v, t, *p):
        return cmpa_eager(v, t, p[:14], p[14:], hv, ht, "mean")

    def kernel(backend):
        return lambda v, t, *p: cross_modal_prompt_attention(v, t, p[:14], p[14:], n_head_visual=hv,
                                                             n_head_text=ht, backend=backend)
    return "cmpa", f"M={m} B={b} C={c}", make, eager, kernel


def dafe_case(n, m, d):
    def make():
        module = fastprompt.DeepAdaptiveFeatureEnhancement(d).cuda().to(DTYPE)
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0, d ** -0.5)
        return [torch.randn(n, m, d), torch.randn(m, d)], list(module.parameters())

    def eager(prev, task, *p):
        return dafe_eager(prev, task, list(p), "channel")

    def kernel(backend):
        return lambda prev, task, w, b, wp, bp, wt: dafe_fusion(
            prev, task, ln_weight=w, ln_bias=b, gate_prev_weight=wp, gate_prev_bias=bp, gate_task_weight=wt,
            backend=backend)
    return "dafe", f"N={n} M={m} D={d} channel", make, eager, kernel


def insert_case(n, length, m, d, start, mode):
    def make():
        return [torch.randn(n, length, d), torch.randn(m, d)], [torch.ones(d, device="cuda", dtype=DTYPE),
                                                                 torch.zeros(d, device="cuda", dtype=DTYPE)]

    def eager(x, p, w, b):
        return insert_eager(x, p, start, w, b, mode=mode)

    def kernel(backend):
        return lambda x, p, w, b: insert_prompts(x, p, start, w, b, mode=mode, backend=backend)
    return "insert_prompts", f"N={n} L={length} M={m} D={d} {mode}", make, eager, kernel


CASES = [
    cmpa_case(2, 4, 100), cmpa_case(4, 32, 100), cmpa_case(16, 32, 1000), cmpa_case(16, 4, 1),
    dafe_case(32, 4, 768), dafe_case(1000, 4, 512),
    insert_case(32, 197 + 16, 16, 768, 197, "replace"), insert_case(32, 197, 16, 768, 197, "insert"),
    insert_case(1000, 77, 4, 512, 1, "replace"),
]


def _fwd_bwd(fn, leaves):
    def step():
        outs = fn(*leaves)
        outs = [o for o in (outs if isinstance(outs, tuple) else (outs,)) if o is not None]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return step


def _graphed(step):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def _sets(make):
    """Copies of (inputs + parameters) totalling more than twice the L2 cache, as leaves on the GPU."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    inputs, params = make()
    size = sum(t.numel() * 2 for t in inputs + params)
    copies = max(1, min(16, math.ceil(2 * l2 / size)))
    sets = []
    for _ in range(copies):
        inputs, params = make()
        sets.append([t.to("cuda", DTYPE).requires_grad_() for t in inputs]
                    + [p.detach().clone().requires_grad_() for p in params])
    return sets


def _median_us(steps, reps, warmup=10):
    for i in range(warmup):
        steps[i % len(steps)]()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for i, (start, end) in enumerate(events):
        start.record()
        steps[i % len(steps)]()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) * 1e3


def attention_tables(device="cuda", classes=1000, contexts=(2, 16), rounds=20, variants=None, write=print):
    """The causal attention of the packed text path (benches/text_attention_variants.py): packed blocks (what
    packed.py does), padded SDPA (what it did before), varlen_attn, a per-sequence loop, FlexAttention with a document + causal mask eager
    and compiled; forward and forward + backward over CoOp's ragged sequences for C ImageNet names, bf16 on
    CUDA. Decides whether the packed path should call varlen_attn or FlexAttention on this GPU."""
    from text_attention_variants import measure, table

    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    results = []
    for n_ctx in contexts:
        results.append(measure(classes, n_ctx, device, dtype, rounds, variants))
        write(table(results[-1]))
    return results


def text_tower_tables(model="ViT-B-16", classes=1000, contexts=(2, 16), rounds=5, write=print):
    """The exact text-tower acceleration on this device (benches/text_tower_figures.py): open_clip's
    encode_text against EOT packing and packing + prefix reuse, forward and forward + backward, and CoOp's
    logits for one image end to end; fp32."""
    from text_tower_figures import measure, table

    results = []
    for n_ctx in contexts:
        torch.manual_seed(0)
        results.append(measure(model, classes, n_ctx, rounds))
        write(table(results[-1]))
    return results


SECTIONS = ("ops", "text", "attention")


def run_sections(out_dir, sections) -> None:
    """The text-tower sections, each table appended to OUT/results.md as soon as it is measured (a run cut
    short by its time limit keeps what it finished); a failing section is reported and the next one runs."""
    os.makedirs(out_dir, exist_ok=True)

    def write(text):
        with open(os.path.join(out_dir, "results.md"), "a") as f:
            f.write("\n" + text + "\n")
        print("\n" + text, flush=True)

    for name in sections:
        section = {"text": text_tower_tables, "attention": attention_tables}[name]
        try:
            section(write=write)
        except Exception as exc:
            write(f"{section.__name__} failed: {type(exc).__name__}: {exc}")


def run(out_dir, reps, skip_compile):
    os.makedirs(out_dir, exist_ok=True)
    jsonl = open(os.path.join(out_dir, "results.jsonl"), "a")
    card = torch.cuda.get_device_name(0)
    rows = []
    for op, shape, make, eager, kernel in CASES:
        sets = _sets(make)
        times = {}
        for provider in PROVIDERS:
            t0 = time.time()
            try:
                if provider in ("triton", "cuda"):
                    reason = backends.unavailable_reason(op, provider, torch.device("cuda"))
                    if reason:
                        times[provider] = None
                        print(f"{op} {shape} {provider}: unavailable ({reason})", flush=True)
                        continue
                    steps = [_fwd_bwd(kernel(provider), s) for s in sets]
                elif provider == "eager":
                    steps = [_fwd_bwd(eager, s) for s in sets]
                elif provider == "compile":
                    if skip_compile:
                        times[provider] = None
                        continue
                    compiled = torch.compile(eager)
                    steps = [_fwd_bwd(compiled, s) for s in sets]
                else:
                    steps = [_graphed(_fwd_bwd(eager, s)) for s in sets]
                us = _median_us(steps, reps)
            except Exception as exc:  # a failing provider is a result too, not the end of the run
                us = None
                print(f"{op} {shape} {provider}: FAILED {type(exc).__name__}: {exc}", flush=True)
            times[provider] = us
            record = dict(card=card, op=op, shape=shape, provider=provider, median_us=us, copies=len(sets),
                          seconds=round(time.time() - t0, 1), dtype=str(DTYPE))
            jsonl.write(json.dumps(record) + "\n")
            jsonl.flush()
            print(json.dumps(record), flush=True)
        rows.append((op, shape, times))
    table = format_table(card, rows)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    print(table)


def format_table(card, rows):
    def fmt(v):
        return "—" if v is None else f"{v:,.1f}"
    lines = [f"forward + backward, {DTYPE}, median µs on {card} ({time.strftime('%Y-%m-%d')})", "",
             "| op | shape | eager | compile | cudagraph | triton | cuda | best fastprompt vs eager | vs best baseline |",
             "|---|---|---|---|---|---|---|---|---|"]
    for op, shape, t in rows:
        ours = [t[p] for p in ("triton", "cuda") if t.get(p)]
        base = [t[p] for p in ("eager", "compile", "cudagraph") if t.get(p)]
        speed_eager = f"{t['eager'] / min(ours):.2f}×" if ours and t.get("eager") else "—"
        speed_best = f"{min(base) / min(ours):.2f}×" if ours and base else "—"
        lines.append(f"| {op} | {shape} | " + " | ".join(fmt(t.get(p)) for p in PROVIDERS)
                     + f" | {speed_eager} | {speed_best} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benches/results/local")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--skip-compile", action="store_true", help="leave out torch.compile (its compiles are slow)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="the parts to run: the op timings, the text-tower figures, the attention variants")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check.py needs a CUDA device")
    if "ops" in args.only:
        run(args.out, args.reps, args.skip_compile)
    run_sections(args.out, [s for s in args.only if s != "ops"])
