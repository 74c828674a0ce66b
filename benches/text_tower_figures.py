"""The figures of the exact text-tower acceleration, measured side by side in one run (DESIGN.md, issue 7).

The text tower over CoOp's prompts for the first C ImageNet class names with n context tokens, forward and
forward + backward (into the context), on four paths:
  open_clip encode_text   CoOp's prompted embeddings through open_clip's own encode_text on the full 77-token
                          sequences (benches/open_clip_text.py): the baseline, what prompt-learning code runs
  fastprompt, 77 tokens   fastprompt's full-length path (pack_text=False, prefix_reuse=False)
  EOT packing             pack_text=True, prefix_reuse=False
  packing + prefix reuse  both on (fastprompt's default)
and CoOp's logits for one image end to end (forward): open_clip's encode_image + encode_text, CoOp with both
switches off, and with both on. Every path starts from the same context, and the table reports how far its
features are from open_clip's. fp32, random weights; the timed calls are interleaved round by round (so that
a busy machine slows every path alike) after one warm-up call each, and each figure is the median.

    python benches/text_tower_figures.py [--model ViT-B-16] [--classes 200] [--ctx 2 16] [--rounds 3]
                                         [--forward-only] [--threads N] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fastprompt import methods  # noqa: E402
from fastprompt.clip import create_clip  # noqa: E402
from open_clip_text import open_clip_coop_logits, open_clip_coop_text_features  # noqa: E402

BASELINE = "open_clip encode_text (77 tokens)"
PATHS = {BASELINE: dict(pack_text=False, prefix_reuse=False),  # its coop only holds the prompts and context
         "fastprompt, 77 tokens (pack_text=False)": dict(pack_text=False, prefix_reuse=False),
         "EOT packing": dict(pack_text=True, prefix_reuse=False),
         "packing + prefix reuse": dict(pack_text=True, prefix_reuse=True)}
END_TO_END = {"open_clip encode_image + encode_text": BASELINE,  # label -> the path whose CoOp runs
              "CoOp, both switches off": "fastprompt, 77 tokens (pack_text=False)",
              "CoOp, both switches on": "packing + prefix reuse"}


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn):
    """(seconds, result) of one call."""
    _sync()
    t0 = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - t0, out


def _seconds(fn) -> float:
    return _timed(fn)[0]


def _interleaved_medians(calls: dict, rounds: int) -> dict:
    """{label: median seconds} of `rounds` calls each, taken round by round across the labels."""
    times = {label: [] for label in calls}
    for _ in range(rounds):
        for label, fn in calls.items():
            times[label].append(_seconds(fn))
    return {label: statistics.median(t) for label, t in times.items()}


def _features(label, coop):
    return (lambda: open_clip_coop_text_features(coop)) if label == BASELINE else coop.text_features


def measure(model_name="ViT-B-16", n_classes=200, n_ctx=2, rounds=3, backward=True, end_to_end=True, log=print):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    load = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    model = create_clip(model_name, device=device)
    names = list(IMAGENET_CLASSNAMES[:n_classes])
    coops = {}
    for label, path in PATHS.items():
        # train mode: coop(image) recomputes its text features (eval mode would cache them)
        coops[label] = methods.build("coop", model, names, n_ctx=n_ctx, **path).to(device).train()
        with torch.no_grad():
            coops[label].ctx.copy_(coops[BASELINE].ctx)  # one context for every path

    calls, agreement = {}, {}
    for label, coop in coops.items():
        features = _features(label, coop)

        def forward(features=features):
            with torch.no_grad():
                return features()

        def forward_backward(features=features):
            features().sum().backward()

        calls[label, "forward"] = forward
        if backward:
            calls[label, "forward+backward"] = forward_backward
    reference = None
    for (label, direction), fn in calls.items():  # the warm-up calls; the forwards' features are compared
        t, out = _timed(fn)
        log(f"warm-up {label} {direction}: {t:.2f} s")
        if direction == "forward":
            reference = out if label == BASELINE else reference
            agreement[label] = float(((out - reference).norm(dim=-1) / reference.norm(dim=-1)).max())
    text = _interleaved_medians(calls, rounds)

    e2e = {}
    if end_to_end:
        image = torch.randn(1, 3, *[model.visual.image_size[0]] * 2, device=device)
        logit_calls = {}
        for label, path in END_TO_END.items():
            def logits(coop=coops[path], open_clip=path == BASELINE):
                with torch.no_grad():
                    return open_clip_coop_logits(coop, image) if open_clip else coop(image)
            logit_calls[label] = logits
        for label, fn in logit_calls.items():
            log(f"warm-up {label}: {_seconds(fn):.2f} s")
        e2e = _interleaved_medians(logit_calls, rounds)
    prompts = coops["packing + prefix reuse"].prompts
    return dict(model=model_name, device=str(device), classes=n_classes, ctx=n_ctx, rounds=rounds,
                mean_eot_len=(prompts.eot.float() + 1).mean().item(), prefix=prompts.prefix_len,
                text=text, agreement=agreement, end_to_end=e2e, threads=torch.get_num_threads(), load=load)


def table(r) -> str:
    directions = ["forward"] + (["forward+backward"] if any(d == "forward+backward" for _, d in r["text"]) else [])
    head = " | ".join(f"{d.replace('+', ' + ')} s | speed-up" for d in directions)
    lines = [f"text tower, {r['model']} (random weights), fp32, {r['device']} ({r['threads']} threads, load average "
             f"{r['load']:.1f} at the start), C = {r['classes']} ImageNet class names, {r['ctx']} context tokens "
             f"(mean length to EOT {r['mean_eot_len']:.1f}, shared prefix {r['prefix']} rows); median of "
             f"{r['rounds']} interleaved runs",
             "", f"| path | {head} | features vs open_clip (max relative) |",
             "|---|" + "---|---|" * len(directions) + "---|"]
    for label in PATHS:
        cells = []
        for d in directions:
            s, base = r["text"][label, d], r["text"][BASELINE, d]
            cells.append(f"{s:.3f} | {base / s:.1f}×")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {r['agreement'][label]:.0e} |")
    if r["end_to_end"]:
        e = r["end_to_end"]
        base, off = e["open_clip encode_image + encode_text"], e["CoOp, both switches off"]
        lines += ["", "CoOp logits for one image, end to end (forward):", "",
                  "| path | s | vs open_clip | vs both off |", "|---|---|---|---|"]
        for label, s in e.items():
            lines.append(f"| {label} | {s:.3f} | {base / s:.1f}× | {off / s:.1f}× |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--ctx", type=int, nargs="+", default=[2, 16])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--forward-only", action="store_true", help="leave out the forward + backward")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (torch's default: one per core); on a shared machine 1 is steadier")
    parser.add_argument("--out", default=None, help="append the tables to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for n_ctx in args.ctx:
        torch.manual_seed(0)
        text = table(measure(args.model, args.classes, n_ctx, args.rounds, backward=not args.forward_only))
        print(text + "\n", flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(text + "\n\n")
