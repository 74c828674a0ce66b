"""The figures of the exact text-tower acceleration, measured side by side in one run (DESIGN.md, issue 7):
the text tower forward over C ImageNet class names with n context tokens, with open_clip's encode_text on the
full 77-token sequences, with EOT packing, and with packing + shared-prefix reuse; and CoOp's logits for one
image end to end with both switches off and on. fp32, random weights, median of `rounds` runs.

    python benches/text_tower_figures.py [--model ViT-B-16] [--classes 200] [--ctx 2] [--rounds 3] [--out FILE]
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastprompt import methods  # noqa: E402
from fastprompt.clip import create_clip  # noqa: E402


def _median_s(fn, rounds):
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(model_name="ViT-B-16", n_classes=200, n_ctx=2, rounds=3, backward=False):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = create_clip(model_name, device=device)
    names = list(IMAGENET_CLASSNAMES[:n_classes])
    variants = {"encode_text (77 tokens)": dict(pack_text=False, prefix_reuse=False),
                "EOT packing": dict(pack_text=True, prefix_reuse=False),
                "packing + prefix reuse": dict(pack_text=True, prefix_reuse=True)}
    rows = {}
    for label, path in variants.items():
        coop = methods.build("coop", model, names, n_ctx=n_ctx, **path).to(device)

        def text():
            if backward:
                coop.text_features().sum().backward()
            else:
                with torch.no_grad():
                    coop.text_features()
        rows[label] = _median_s(text, rounds)
    lengths = coop.prompts.eot.float() + 1
    image = torch.randn(1, 3, *[model.visual.image_size[0]] * 2, device=device)
    end_to_end = {}
    for label, path in (("both off", dict(pack_text=False, prefix_reuse=False)),
                        ("both on", dict(pack_text=True, prefix_reuse=True))):
        coop = methods.build("coop", model, names, n_ctx=n_ctx, **path).to(device)

        def logits():
            with torch.no_grad():
                coop(image)
        end_to_end[label] = _median_s(logits, rounds)
    return dict(model=model_name, device=str(device), classes=n_classes, ctx=n_ctx, mean_eot_len=lengths.mean().item(),
                prefix=coop.prompts.prefix_len, text=rows, end_to_end=end_to_end, backward=backward)


def table(r) -> str:
    base = r["text"]["encode_text (77 tokens)"]
    what = "forward + backward" if r["backward"] else "forward"
    lines = [f"text tower {what}, {r['model']} (random weights), fp32, {r['device']}, C = {r['classes']} ImageNet "
             f"class names, {r['ctx']} context tokens (mean length to EOT {r['mean_eot_len']:.1f}, shared prefix "
             f"{r['prefix']} rows)", "", "| path | seconds | speed-up |", "|---|---|---|"]
    for label, s in r["text"].items():
        lines.append(f"| {label} | {s:.3f} | {base / s:.1f}× |")
    off, on = r["end_to_end"]["both off"], r["end_to_end"]["both on"]
    lines += ["", f"CoOp logits for one image, end to end: both switches off {off:.3f} s, both on {on:.3f} s: "
              f"{off / on:.1f}×"]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--ctx", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backward", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    text = table(measure(args.model, args.classes, args.ctx, args.rounds, args.backward))
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n\n")
