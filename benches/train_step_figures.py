"""Whole training steps, fastprompt against the public codes' way, side by side in one run (issue 14).

One training step (the method's loss, backward, SGD step) per method on two paths that share the method
object, so the same weights and the same prompt values:
  public      the loss computed the way the method's public code computes it (benches/public_methods.py):
              prompts cat'd into 77-token sequences, the text tower over all C·77 tokens (CoCoOp, TMML:
              B·C·77) in LND with nn.MultiheadAttention and a float causal mask, CMPA and CAVPT as the public
              modules compute them (benches/public_towers.py)
  fastprompt  the method's own `loss`: EOT packing, prefix reuse (and class chunking or checkpointing when
              given with --opt), the default backend
Rows: coop, cocoop, maple, dcp (couple_text=False: the public code's model), dcp-coupled (couple_text=True,
fastprompt's default and the paper's design; its public way is the public code with CMPA's text output
written back into the text stream), dpt, tmml. Each method runs with its defaults, which are its public
recipe's (coop 16 context tokens, maple 2, dcp 16), on the first C ImageNet class names; cocoop and tmml,
whose text tower runs once per image, at --bc-batch (1), the others at --batch (4).

Per row: the loss of both paths at the same parameters, in fp32 whatever --precision (checked equal within
1e-5 relative; the script exits with status 1 otherwise), then one warm-up step counted by torch's
FlopCounterMode (the matmul and attention FLOPs of forward and backward), one profiled step (its peak
memory, benches/peak_memory.py: CUDA's
max_memory_allocated, or on the CPU the running sum of the allocation events torch's profiler records
with profile_memory=True; and the share of the step in each tower's blocks, fastprompt.train.bench.parts_of),
then --rounds timed steps interleaved round by round across all rows and paths (a busy machine slows them
alike); the step time is their median. The bound beside each speed-up is the ratio of the two paths'
counted FLOPs: what a compute-bound step could gain, since every FLOP removed is a text token not computed.

    python benches/train_step_figures.py [--methods coop maple ...] [--model ViT-B-16] [--classes 100 200]
        [--batch 4] [--bc-batch 1] [--rounds 3] [--threads 1] [--device cpu|cuda] [--precision fp32|bf16]
        [--paths public fastprompt] [--opt class_chunk=250 ...] [--out FILE]

It prints one Markdown table per class count (and, for two or more, the public way's growth), and as its
last line one JSON object {"rows": [{"method", "path", "step_s", "peak_mb", "loss", ...}, ...]}; --out writes
the same text to a file. Progress goes to stderr. MB are 2^20 bytes.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import gc
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fastprompt import backends, methods  # noqa: E402
from fastprompt.clip import SMALL_CONFIGS, create_clip  # noqa: E402
from fastprompt.train.bench import parts_of  # noqa: E402
from peak_memory import measured  # noqa: E402
from public_methods import PublicWay  # noqa: E402

# row -> (method, options beyond the method's defaults)
ROWS = {
    "coop": ("coop", {}),
    "cocoop": ("cocoop", {}),
    "maple": ("maple", {}),
    "dcp": ("dcp", dict(couple_text=False)),
    "dcp-coupled": ("dcp", dict(couple_text=True)),
    "dpt": ("dpt", {}),
    "tmml": ("tmml", {}),
}
PATHS = ("public", "fastprompt")
PER_IMAGE_TEXT = {"cocoop", "tmml"}  # the text tower runs B·C sequences
VISUAL_PROMPTS = {"maple": "n_ctx", "dcp": "n_ctx"}  # rows appended to the image stream (DPT: see image_tokens)
PRECISIONS = ("fp32", "bf16")
LOSS_RTOL = 1e-5  # the loss check, always in fp32: the two paths compute one function in two orders
MB = 2 ** 20


@dataclass
class Run:
    """One row: a method on one path, its step and what was measured."""

    row: str
    path: str
    method: object
    batch: int
    step: Callable[[], torch.Tensor]
    loss: float = float("nan")
    loss_error: float = float("nan")  # relative difference from the other path's loss (nan: one path ran)
    flops: int = 0
    peak_bytes: int = 0
    parts: dict = field(default_factory=dict)
    times: list = field(default_factory=list)
    cpu_times: list = field(default_factory=list)  # the process's CPU seconds per timed step

    @property
    def step_s(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")

    @property
    def cpu_s(self) -> float:
        return statistics.median(self.cpu_times) if self.cpu_times else float("nan")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def text_tokens(method, path: str, batch: int) -> int:
    """Tokens each text block computes in one step: every row of every 77-token sequence on the public path;
    on fastprompt's packed path each sequence's tokens up to its EOT, the shared prefix once per call."""
    n_cls, length = method.prompts.ids.shape
    images = batch if method.name in PER_IMAGE_TEXT else 1
    text_path = method.text_path
    if path == "public" or not text_path.pack_text:
        return images * n_cls * length
    prefix = method.prompts.prefix_for(text_path)
    suffixes = int((method.prompts.eot + 1 - prefix).sum())
    chunks = math.ceil(n_cls / (text_path.class_chunk or n_cls))
    calls = chunks * (images if method.name == "cocoop" else 1)  # cocoop encodes each image's prompts apart
    return calls * prefix + images * suffixes


def image_tokens(method, batch: int) -> int:
    """Tokens each image block computes in one step (the same on both paths): B·(1 + patches + the prompt
    rows in the stream); DPT: its prompted blocks' B·(1 + patches + 10), besides the zero-shot forward."""
    rows = method.clip.model.visual.positional_embedding.shape[0]
    if method.name in VISUAL_PROMPTS:
        rows += getattr(method, VISUAL_PROMPTS[method.name])
    elif method.name == "dpt" and method.visual_prompts is not None:
        rows += method.visual_prompts.shape[1]
    return batch * rows


def _make_step(loss_fn, optimizer, images, labels, autocast) -> Callable[[], torch.Tensor]:
    """One training step: the loss under autocast, its backward, the SGD step, gradients set to None.
    The scopes are fastprompt.train.bench's, so a profile splits both paths alike."""
    def step():
        with torch.profiler.record_function("fastprompt.loss_and_forward"), autocast():
            loss = loss_fn(images, labels)
        loss.backward()
        with torch.profiler.record_function("fastprompt.optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def _options_for(method_name: str, options: dict) -> dict:
    """The --opt options this method takes (class_chunk, checkpoint_text, ... where it has them)."""
    known = methods.options(method_name)
    return {k: v for k, v in options.items() if k in known}


def build_runs(model_name, clip_model, classnames, rows, batch, bc_batch, device, precision, paths, options, seed,
               log):
    small = methods.SMALL_MODEL_CONFIGS if model_name in SMALL_CONFIGS else {}  # configs that fit the tiny CLIPs
    size = clip_model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    runs = []
    for row in rows:
        name, row_options = ROWS[row]
        torch.manual_seed(seed)  # every row's prompts drawn alike, whatever rows run
        config = {**small.get(name, {}), **row_options, **_options_for(name, options)}
        method = methods.build(name, clip_model, classnames, **config).to(device).train()
        b = bc_batch if name in PER_IMAGE_TEXT else batch
        g = torch.Generator().manual_seed(seed + 1)
        images = torch.randn(b, 3, size, size, generator=g).to(device)
        labels = torch.randint(0, len(classnames), (b,), generator=g).to(device)

        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

        loss_fns = {"public": PublicWay(method).loss, "fastprompt": method.loss}
        # the loss check: both paths at the same parameters, in fp32 whatever the steps' precision (bf16
        # rounds the two orders of operations apart by far more than a wrong computation might)
        with torch.no_grad():
            losses = {path: float(loss_fns[path](images, labels)) for path in paths}
        error = float("nan")
        if len(losses) == 2:
            error = abs(losses["public"] - losses["fastprompt"]) / max(abs(losses["public"]), 1e-12)
            log(f"{row}: fp32 loss public {losses['public']:.7f}, fastprompt {losses['fastprompt']:.7f}, relative "
                f"difference {error:.1e} ({'ok' if error <= LOSS_RTOL else 'MISMATCH'})")
        for path in paths:  # each path steps the same parameters with its own SGD (the values do not change the time)
            optimizer = torch.optim.SGD(method.trainable_parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
            step = _make_step(loss_fns[path], optimizer, images, labels, autocast)
            runs.append(Run(row, path, method, b, step, losses[path], error))
    return runs


def seconds(step, device) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one call. On a CPU with one thread the two agree on an idle
    machine; on a shared one the CPU seconds leave out the time other processes held the core."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    step()
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def measure(model_name="ViT-B-16", rows=None, classes=200, batch=4, bc_batch=1, rounds=3, warmup=1, device=None,
            precision="fp32", paths=PATHS, options=None, seed=0, log=None, clip_model=None) -> dict:
    """Every row on every path at C = `classes`; returns the runs and the conditions of the measurement."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    rows = list(rows or ROWS)
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ValueError(f"unknown rows {unknown}; rows are {', '.join(ROWS)}")
    if not 1 <= classes <= len(IMAGENET_CLASSNAMES):
        raise ValueError(f"--classes takes 1 to {len(IMAGENET_CLASSNAMES)} ImageNet class names, got {classes}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision is one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    load = os.getloadavg()[0]
    if clip_model is None:
        clip_model = create_clip(model_name, device=device)
    runs = build_runs(model_name, clip_model, list(IMAGENET_CLASSNAMES[:classes]), rows, batch, bc_batch, device,
                      precision, paths, options or {}, seed, log)
    for run in runs:
        with FlopCounterMode(display=False) as counter:  # the first step: warm-up, and the FLOPs it runs
            t, _ = seconds(run.step, device)
        run.flops = counter.get_total_flops()
        for _ in range(warmup - 1):
            run.step()
        gc.collect()
        with measured(device, profile=True) as m:
            run.step()
        run.peak_bytes = m.peak_bytes
        run.parts = parts_of(m.profile.events(), gpu=device.type == "cuda")
        log(f"{run.row} {run.path}: warm-up {t:.2f} s, {run.flops / 1e9:.1f} GFLOP, peak {run.peak_bytes / MB:.0f} MB")
    for r in range(rounds):
        for run in runs:
            wall, cpu = seconds(run.step, device)
            run.times.append(wall)
            run.cpu_times.append(cpu)
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{run.row} {run.path} {run.times[-1]:.2f} s" for run in runs))
    problem = dict(dtype=torch.float32, m=1, dv=1, dt=1, d=1)
    return dict(runs=runs, model=model_name, device=device, classes=classes, batch=batch, bc_batch=bc_batch,
                rounds=rounds, precision=precision, threads=torch.get_num_threads(), load=load,
                backend=backends.select("insert_prompts", "auto", device, problem).backend,
                card=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")


def _share(run, part) -> float:
    total = sum(run.parts.values()) or 1.0
    return 100 * run.parts.get(part, 0.0) / total


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def table(r: dict) -> str:
    """The Markdown table of one class count: a row per method and path, the ratios on fastprompt's rows."""
    runs = r["runs"]
    by = {(run.row, run.path): run for run in runs}
    cpu = r["device"].type == "cpu"
    where = f"{r['card']} ({r['threads']} threads, load average {r['load']:.1f} at the start)" if cpu else r["card"]
    lines = [
        f"training step, {r['model']} (random weights), {r['precision']}, {where}, C = {r['classes']} ImageNet "
        f"class names, batch {r['batch']} (cocoop, tmml: {r['bc_batch']}), fastprompt backend {r['backend']}; "
        f"median of {r['rounds']} interleaved steps; loss in fp32 at the same parameters "
        f"({time.strftime('%Y-%m-%d')}, torch {torch.__version__})",
        "",
        "| method | path | step s | " + ("CPU s | " if cpu else "") + "peak MB | speed-up | memory ÷ | bound: FLOP "
        "ratio | GFLOP | text tokens / block | image tokens / block | image tower % | text tower % | loss |",
        "|---|---|---|" + ("---|" if cpu else "") + "---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        public = by.get((run.row, "public"))
        ratios = ["—", "—", "—"]
        if run.path == "fastprompt" and public is not None:
            speed = f"{public.step_s / run.step_s:.1f}×" + (f" (CPU {public.cpu_s / run.cpu_s:.1f}×)" if cpu else "")
            ratios = [speed, f"{public.peak_bytes / max(run.peak_bytes, 1):.1f}×",
                      f"{public.flops / max(run.flops, 1):.1f}×"]
        checked = run.path == "fastprompt" and not math.isnan(run.loss_error)
        loss = f"{run.loss:.6f}" + (f" (Δ {run.loss_error:.0e})" if checked else "")
        cells = [run.row, run.path, _fmt(run.step_s)] + ([_fmt(run.cpu_s)] if cpu else []) + [
            _fmt(run.peak_bytes / MB), *ratios, _fmt(run.flops / 1e9),
            f"{text_tokens(run.method, run.path, run.batch):,}",
            f"{image_tokens(run.method, run.batch):,}", f"{_share(run, 'image tower'):.0f}",
            f"{_share(run, 'text tower'):.0f}", loss]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def growth(results: list) -> str:
    """The public way's peak memory and step time against C (least squares over the measured class counts),
    extrapolated to C = 1000: what it would need where it was not run."""
    points = {}
    for r in results:
        for run in r["runs"]:
            if run.path == "public":
                points.setdefault(run.row, []).append((r["classes"], run.peak_bytes / MB, run.step_s))
    lines = []
    for row, pts in points.items():
        if len({c for c, _, _ in pts}) < 2:
            continue
        fits = []
        for i in (1, 2):
            xs, ys = [p[0] for p in pts], [p[i] for p in pts]
            mx, my = statistics.fmean(xs), statistics.fmean(ys)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
            fits.append((slope, my - slope * mx))
        (mem_b, mem_a), (t_b, t_a) = fits
        lines.append(f"| {row} | {mem_b:.1f} | {(mem_a + 1000 * mem_b) / 1024:.1f} | {t_b:.3f} | "
                     f"{t_a + 1000 * t_b:.1f} |")
    if not lines:
        return ""
    cs = sorted({r["classes"] for r in results})
    return "\n".join([f"the public way's growth with C (fitted over C = {', '.join(map(str, cs))}), extrapolated "
                      "to C = 1000:", "", "| method | peak MB per class | peak at C = 1000, GB | step s per class "
                      "| step at C = 1000, s |", "|---|---|---|---|---|"] + lines)


def report(texts: list[str], last: str, out: Optional[str]) -> None:
    """Print the JSON line (the tables are printed as they are measured) and write tables and line to `out`."""
    print(last, flush=True)
    if out:
        with open(out, "w") as f:
            f.write("\n\n".join(texts) + "\n\n" + last + "\n")


def json_line(results: list) -> str:
    rows = []
    for r in results:
        for run in r["runs"]:
            rows.append(dict(method=run.row, path=run.path, step_s=run.step_s, cpu_s=run.cpu_s,
                             peak_mb=run.peak_bytes / MB, loss=run.loss, classes=r["classes"], batch=run.batch,
                             gflop=run.flops / 1e9,
                             text_tokens=text_tokens(run.method, run.path, run.batch),
                             image_tokens=image_tokens(run.method, run.batch),
                             image_tower_share=_share(run, "image tower") / 100,
                             text_tower_share=_share(run, "text tower") / 100,
                             model=r["model"], device=str(r["device"]), precision=r["precision"]))
    return json.dumps({"rows": rows})


def _option(text: str):
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--opt takes KEY=VALUE, got {text!r}")
    with contextlib.suppress(ValueError, SyntaxError):
        return key, ast.literal_eval(value)
    return key, value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(ROWS), choices=list(ROWS), metavar="ROW",
                        help=f"rows to run: {', '.join(ROWS)} (default: all)")
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--classes", type=int, nargs="+", default=[200], help="one table per class count")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--bc-batch", type=int, default=1, help="batch of cocoop and tmml (B·C text sequences)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before the profiled one")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (torch's default: one per core); on a shared machine 1 is steadier")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda where there is one)")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="the timed steps' precision (bf16: autocast); the loss check runs in fp32")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--opt", type=_option, nargs="+", default=[], metavar="KEY=VALUE",
                        help="fastprompt method options, for the methods that take them (class_chunk=250 ...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the tables and the JSON line to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results, texts, clip_model = [], [], None
    for classes in args.classes:
        r = measure(args.model, args.methods, classes, args.batch, args.bc_batch, args.rounds, args.warmup,
                    args.device, args.precision, args.paths, dict(args.opt), args.seed, clip_model=clip_model)
        clip_model = r["runs"][0].method.clip.model if r["runs"] else None
        results.append(r)
        texts.append(table(r))
        print(texts[-1] + "\n", flush=True)
    extra = growth(results)
    if extra:
        texts.append(extra)
        print(extra + "\n")
    report(texts, json_line(results), args.out)
    mismatched = sorted({run.row for r in results for run in r["runs"] if run.loss_error > LOSS_RTOL})
    # (nan compares False: a row run on one path has nothing to check)
    if mismatched:
        print(f"loss check FAILED for {', '.join(mismatched)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
