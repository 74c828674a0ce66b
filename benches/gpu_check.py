"""Timing half of the prepared GPU check (benches/gpu_check.sh runs the build and the tests first).

For about ten representative shapes of the three ops it times forward + backward of: eager PyTorch (the
reference math), torch.compile of it, CUDA-graph replay of it, and fastprompt's triton and cuda backends
where they run. Each time is the median of CUDA-event timings after a warm-up, rotating among enough copies
of the inputs and weights to exceed twice the L2 cache, so that weights are read from device memory as in a
training step (CMPA's bf16 weights, 22 MB, would otherwise sit in an H100's 50 MB L2). Each result is
appended to OUT/results.jsonl as soon as it is measured; the table is written to OUT/results.md and
printed last.

    python benches/gpu_check.py --out benches/results/<card>-<date> [--skip-compile] [--reps 50]
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
from fastprompt.reference.insert import insert_eager  # noqa: E402

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


def attention_variants(out_dir) -> str:
    """Causal attention over packed ragged sequences on the GPU: torch's varlen_attn (flash) against the
    padded SDPA the packed text path uses, and FlexAttention with a document mask (compiled), bf16, 1000
    sequences of 3-21 tokens, 8 heads of 64: decides whether the packed path should call varlen_attn here."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    lens = torch.randint(3, 22, (1000,), generator=g)
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lens.cumsum(0).int()]).cuda()
    t, s_max = int(lens.sum()), int(lens.max())
    q, k, v = (torch.randn(t, 8, 64, device="cuda", dtype=DTYPE) for _ in range(3))
    pad_index = torch.full((1000, s_max), t, dtype=torch.long)
    for n, (start, length) in enumerate(zip(cu[:-1].tolist(), lens.tolist())):
        pad_index[n, :length] = torch.arange(start, start + length)
    pad_index = pad_index.cuda()

    def padded():
        qp, kp, vp = (torch.cat([x, x.new_zeros(1, 8, 64)])[pad_index].transpose(1, 2) for x in (q, k, v))
        return F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)

    rows = {"padded SDPA (the packed path)": padded}
    try:
        from torch.nn.attention.varlen import varlen_attn

        rows["varlen_attn"] = lambda: varlen_attn(q, k, v, cu, cu, s_max, s_max, window_size=(-1, 0))
    except ImportError as exc:
        print(f"varlen_attn unavailable: {exc}")
    lines = ["causal attention, 1000 ragged sequences (3-21 tokens), 8×64 heads, bf16: median µs", "",
             "| variant | µs |", "|---|---|"]
    for name, fn in rows.items():
        try:
            lines.append(f"| {name} | {_median_us([fn], 50):,.1f} |")
        except Exception as exc:
            lines.append(f"| {name} | failed: {type(exc).__name__}: {str(exc)[:80]} |")
    return "\n".join(lines)


def text_tower_tables() -> str:
    """The exact text-tower acceleration on this GPU (benches/text_tower_figures.py), C = 1000, 2 and 16
    context tokens, fp32."""
    from text_tower_figures import measure, table

    return "\n\n".join(table(measure("ViT-B-16", 1000, n_ctx, rounds=5)) for n_ctx in (2, 16))


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
    for section in (attention_variants, text_tower_tables):
        try:
            text = section(out_dir) if section is attention_variants else section()
        except Exception as exc:
            text = f"{section.__name__} failed: {type(exc).__name__}: {exc}"
        with open(os.path.join(out_dir, "results.md"), "a") as f:
            f.write("\n" + text + "\n")
        print("\n" + text, flush=True)


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
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check.py needs a CUDA device")
    run(args.out, args.reps, args.skip_compile)
