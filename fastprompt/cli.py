"""The `fastprompt` command (also `python -m fastprompt`).

  fastprompt train              train a method (no arguments: DCP on the built-in shapes, a small CLIP)
  fastprompt recipes            the public codes' training configs, by name (train --recipe NAME)
  fastprompt eval RUN           top-1 of a trained run on its evaluation sets
  fastprompt run PROTOCOL       a protocol of the field over seeds, ending in a summary table
  fastprompt plot RUN...        loss and accuracy against steps and seconds (PNG, SVG or PDF)
  fastprompt compare RUN...     final and best top-1, steps and seconds to a target accuracy, images/s
  fastprompt bench              images/s of a training step per method and backend, and a profile of one step
  fastprompt info               versions, and which backends can run each op here
  fastprompt demo               the ops at CLIP sizes on every available backend, checked against float64
"""

import argparse
import ast
import dataclasses
import json
import os
import shlex
import sys


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _options(pairs) -> dict:
    from .train.config import ConfigError

    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--opt takes key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = _value(value.strip())
    return out


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line `error: ...` and exit status 2, like every other bad input (argparse
    prints the usage above the error; --help still shows it)."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message}\n")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """The options of a run. None has an argparse default: a run's configuration is TrainConfig's defaults, then
    the recipe's values (--recipe), then the options given here (train/recipes.py), so only what is given
    overrides; the help shows TrainConfig's default."""
    from .train import TrainConfig

    d = TrainConfig()

    def add(*flags, **kwargs):
        if "default" in kwargs:
            kwargs["help"] = (kwargs.get("help", "") + f" (default: {kwargs.pop('default')})").strip()
        p.add_argument(*flags, default=argparse.SUPPRESS, **kwargs)

    add("--recipe", help="a public code's training config by name, e.g. maple/vit_b16_c2_ep5_batch4_2ctx "
        "(`fastprompt recipes` lists them); the options given here override its values")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved run configuration as one JSON object and exit")
    add("--method", default=d.method, help="coop, cocoop, vpt_deep, ivlp, maple, dcp, dpt, map_dafe, tmml, or the "
        "baseline zeroshot")
    add("--model", default=f"{d.model}; with --pretrained FILE, read from the weights",
        help="open_clip model name (ViT-B-16, ...) or fastprompt-tiny/-small")
    add("--pretrained", help="open_clip pretrained tag (openai, ...) or a local checkpoint: an OpenAI TorchScript "
        "archive (~/.cache/clip/ViT-B-16.pt), an OpenAI-layout state_dict or an open_clip checkpoint")
    add("--quick-gelu", dest="quick_gelu", action="store_const", const=True,
        help="the weights' CLIP uses QuickGELU (OpenAI's): needed for a state_dict under a plain model name")
    add("--no-quick-gelu", dest="quick_gelu", action="store_const", const=False,
        help="the weights' CLIP uses GELU (most open_clip / LAION trainings)")
    add("--opt", action="append", metavar="KEY=VALUE", help="a method option, e.g. --opt n_ctx=16")
    add("--data", help="dataset folder (split_*.json or ImageFolder); none: built-in")
    add("--split-file")
    add("--image-dir")
    add("--shots", type=int, default=d.shots, help="training images per class (0: every image of a dataset on disk)")
    add("--subsample", default=d.subsample, choices=["all", "base", "new"])
    add("--epochs", type=int, default=d.epochs)
    add("--batch-size", type=int, default=d.batch_size)
    add("--eval-batch-size", type=int, default=d.eval_batch_size)
    add("--lr", type=float, default=d.lr)
    add("--optimizer", default=d.optimizer, choices=["auto", "sgd", "adamw"],
        help="auto: SGD (the field's recipe), AdamW on the built-in data with random weights")
    add("--momentum", type=float, default=d.momentum)
    add("--weight-decay", type=float, default=d.weight_decay)
    add("--warmup-epochs", type=int, nargs="+", default=d.warmup_epochs,
        help="constant warm-up epochs; several values: one per parameter group of the method (DPT: context, rest)")
    add("--warmup-lr", type=float, default=d.warmup_lr)
    add("--schedule", default=d.schedule, choices=["cosine", "dassl_cosine"],
        help="the cosine after the warm-up: over the remaining epochs, or Dassl's (the public codes')")
    add("--image-size", type=int, default="the model's", help="checked against the model")
    add("--augmentation", nargs="+", default=" ".join(d.augmentation),
        help="training transforms by Dassl's names: random_resized_crop random_flip normalize")
    add("--backend", default=d.backend, choices=["auto", "reference", "triton", "cuda"])
    add("--precision", default=d.precision, choices=["auto", "fp32", "bf16", "fp16"])
    add("--device", default=d.device, help="auto, cpu, cuda (the current device; under torchrun the local rank's) "
        "or cuda:N")
    add("--seed", type=int, default=d.seed)
    add("--output", help="the run's folder; an existing run there is resumed "
        "(default: a fresh runs/<method>-<time>, runs/latest pointing to it)")
    add("--deterministic", action="store_const", const=True)
    add("--no-resume", dest="resume", action="store_const", const=False)
    add("--workers", dest="num_workers", type=int, default=d.num_workers)
    add("--eval-every", type=int, default=d.eval_every, help="epochs between evaluations (0: at the end only)")
    add("--max-steps", type=int)
    add("--no-progress", dest="progress", action="store_const", const=False)


def _given(args) -> set:
    """The TrainConfig fields given on the command line (the others have no value in `args`)."""
    from .train import TrainConfig

    return {f.name for f in dataclasses.fields(TrainConfig) if getattr(args, f.name, None) is not None} | (
        {"method_config"} if getattr(args, "opt", None) else set())


def _config(args):
    """The run's TrainConfig from the options given (train/recipes.py resolve: defaults < recipe < given)."""
    from .train import TrainConfig
    from .train.recipes import resolve

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields}
    recipe = given.pop("recipe", None)
    if getattr(args, "opt", None):
        given["method_config"] = _options(args.opt)
    if len(given.get("warmup_epochs", [None, None])) == 1:
        given["warmup_epochs"] = given["warmup_epochs"][0]
    if recipe is None and "model" not in given and given.get("pretrained") and os.path.isfile(given["pretrained"]):
        given["model"] = None  # a checkpoint file without a model name: the architecture is read from it
    return resolve(recipe, given)


def _print_config(config) -> int:
    from .train.recipes import describe

    print(json.dumps(describe(config), sort_keys=True))
    return 0


def _list_recipes(as_json: bool) -> str:
    from .train.recipes import RECIPES

    if as_json:
        return json.dumps({name: {**dataclasses.asdict(r), "values": r.values()} for name, r in RECIPES.items()},
                          indent=2)
    width = max(len(name) for name in RECIPES)
    lines = []
    for name, r in RECIPES.items():
        v = r.values()
        what = (f"{v['epochs']} epochs, lr {v['lr']}, batch {v['batch_size']}" if "lr" in v else "nothing trained")
        lines.append(f"{name:<{width}}  {v['model']}, {what}  [{r.source}]")
    return "\n".join(lines)


def _resume_command(argv: list, output: str) -> str:
    """The command that resumes an interrupted run: the same arguments, --output naming its folder, without
    --no-resume (which would start it over)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--output":
            skip = True
        elif not (arg.startswith("--output=") or arg == "--no-resume"):
            kept.append(arg)
    return "fastprompt " + shlex.join([*kept, "--output", output])


def _one_line(exc: BaseException) -> str:
    """The message of a harness error on one line. An error raised in a DataLoader worker comes back wrapped
    with the worker's traceback in its message: its last line holds the original 'Type: message'."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split())


def _end_distributed() -> None:
    """Under torchrun: wait for every rank, then close the process group. The caller has dropped its trainer
    first: a DistributedDataParallel wrapper keeps the process group alive past destroy_process_group (its
    reducer holds it, in reference cycles that only the collector frees), and a gloo group then destroyed
    during interpreter shutdown can abort the rank with 'terminate called without an active exception'."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()  # the wrappers of the runs that ended, with their hold on the group
        dist.barrier()
        dist.destroy_process_group()


def main(argv=None) -> int:
    """Run the command; input the harness rejects (its DataError, ConfigError, BackendUnavailableError) is
    printed as one line `error: ...` with exit status 2, a run whose loss stopped being finite likewise with
    status 1, Ctrl-C as one line with status 130; anything else keeps its traceback (a bug)."""
    from .backends import BackendUnavailableError
    from .data import DataError
    from .train.config import ConfigError
    from .train.trainer import TrainingDiverged, TrainingInterrupted

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _main(argv)
    except SystemExit as exc:  # argparse: --help (0) or its one-line error (2)
        return exc.code if isinstance(exc.code, int) else 2
    except (DataError, ConfigError, BackendUnavailableError) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except TrainingInterrupted as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"interrupted at step {exc.step} ({exc.position}): saved {exc.checkpoint}; resume with: "
                  f"{_resume_command(argv, os.path.dirname(exc.checkpoint))}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _main(argv=None) -> int:
    parser = _Parser(prog="fastprompt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p_train = sub.add_parser("train", help="train a method (default: DCP on the built-in shapes)")
    _add_run_options(p_train)
    p_train.add_argument("--stop-after", type=int, default=None, help="epochs to run now (resume later)")

    p_recipes = sub.add_parser("recipes", help="the public codes' training configs, by name (train --recipe NAME)")
    p_recipes.add_argument("--json", action="store_true", help="every recipe with its values, as JSON")

    p_eval = sub.add_parser("eval", help="top-1 of a trained run on its evaluation sets")
    p_eval.add_argument("run", help="the run's output folder")

    p_run = sub.add_parser("run", help="a protocol of the field over seeds: base2new, fewshot, cross_dataset, "
                                       "domain_generalization")
    p_run.add_argument("protocol")
    _add_run_options(p_run)
    p_run.add_argument("--seeds", type=int, nargs="+", default=None, help="default 1 2 3")
    p_run.add_argument("--targets", nargs="+", default=None, help="target datasets of the transfer protocols")
    p_run.add_argument("--shots-list", type=int, nargs="+", default=None, help="fewshot's K (default 1 2 4 8 16)")

    p_plot = sub.add_parser("plot", help="loss and accuracy against steps and seconds, runs overlaid")
    p_plot.add_argument("runs", nargs="+", help="run folders (or their metrics.jsonl)")
    p_plot.add_argument("--output", default="convergence.png", help="PNG, SVG or PDF by suffix")
    p_plot.add_argument("--metric", default=None, choices=["top1", "loss", "lr", "images_per_s"],
                        help="one quantity alone, against steps and seconds (default: loss and top-1)")
    p_plot.add_argument("--smooth", type=int, default=1, metavar="N",
                        help="moving average over N steps of the per-step curves, raw values faint behind")

    p_compare = sub.add_parser("compare", help="a table of runs: final and best top-1, steps and seconds to a "
                                               "target top-1, images/s")
    p_compare.add_argument("runs", nargs="+", help="run folders (or their metrics.jsonl)")
    p_compare.add_argument("--target", type=float, default=None, help="top-1 (%%) to reach (default: the lowest "
                           "best top-1 of the runs, so that every run reaches it)")
    p_compare.add_argument("--split", default="auto", choices=["auto", "test", "base", "new", "hm"],
                           help="the evaluation the target is read on (auto: hm where present, else test)")
    p_compare.add_argument("--json", action="store_true")

    p_bench = sub.add_parser("bench", help="images/s of a training step per method and backend; one step's profile")
    p_bench.add_argument("--methods", nargs="+", default=None)
    p_bench.add_argument("--backends", nargs="+", default=None)
    p_bench.add_argument("--model", default=None, help="default: ViT-B-16 on a GPU, fastprompt-tiny on a CPU")
    p_bench.add_argument("--batch-size", type=int, default=None)
    p_bench.add_argument("--classes", type=int, default=None)
    p_bench.add_argument("--steps", type=int, default=5)
    p_bench.add_argument("--json", action="store_true")

    p_info = sub.add_parser("info", help="versions, and which backends can run each op here (and why not)")
    p_info.add_argument("--json", action="store_true", help="print the report as JSON")
    p_demo = sub.add_parser("demo", help="the ops at CLIP sizes on every available backend, checked against "
                                         "the float64 reference")
    p_demo.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu or cuda")
    p_demo.add_argument("--backends", nargs="+", default=(), metavar="NAME",
                        help="backends to check (default: every one that runs fast on the device)")
    p_demo.add_argument("--rounds", type=int, default=5, help="timed repetitions per backend")
    args = parser.parse_args(argv)

    if args.command == "recipes":
        print(_list_recipes(args.json))
        return 0
    if args.command == "train":
        from .train import Trainer

        if args.print_config:
            return _print_config(_config(args))
        say = print if int(os.environ.get("RANK", "0")) == 0 else (lambda *a, **k: None)
        trainer = Trainer(_config(args), stop_after=args.stop_after, announce=lambda line: say(line, flush=True))
        config = trainer.config  # with its output folder resolved
        say(f"fastprompt train: {config.method} on {trainer.task.description}; {config.model or config.pretrained} on "
            f"{trainer.device} x{trainer.world}; output {config.output}", flush=True)
        results = trainer.fit()
        if trainer.resumed and not trainer.steps_run:
            say(f"{config.output} holds a finished run (or one at --max-steps): nothing to train; its last "
                "evaluation follows")
        say("top-1: " + ", ".join(f"{k} {v:.2f}%" for k, v in results.items()) if results else "stopped early")
        say(f"metrics: {config.output}/metrics.jsonl  checkpoint: {config.output}/checkpoint.pt")
        del trainer  # its DDP wrapper holds the process group (see _end_distributed)
        _end_distributed()
        return 0
    if args.command == "eval":
        from .train import ConfigError, Trainer, TrainConfig

        import torch

        path = os.path.join(args.run, "checkpoint.pt")
        if not os.path.isfile(path):
            raise ConfigError(f"{args.run} holds no checkpoint.pt: eval takes the output folder of a run")
        state = torch.load(path, map_location="cpu", weights_only=False)
        config = TrainConfig.from_dict({**json.loads(state["config"]), "output": args.run, "resume": True})
        trainer = Trainer(config)
        trainer.load_checkpoint()
        results = trainer.evaluate()
        print(json.dumps(results))
        return 0
    if args.command == "run":
        from .train.protocols import check_protocol_flags, run_protocol

        check_protocol_flags(args.protocol, _given(args))
        if args.print_config:
            return _print_config(_config(args))
        text, _ = run_protocol(args.protocol, _config(args), seeds=args.seeds, targets=args.targets,
                               shots_list=args.shots_list)
        print(text)
        _end_distributed()
        return 0
    if args.command == "plot":
        from .train.plot import plot_runs

        print(plot_runs(args.runs, args.output, metric=args.metric, smooth=args.smooth))
        return 0
    if args.command == "compare":
        from .train.compare import compare_runs, format_comparison

        rows = compare_runs(args.runs, target=args.target, split=args.split)
        print(json.dumps(rows, indent=2) if args.json else format_comparison(rows))
        return 0
    if args.command == "bench":
        from .train.bench import bench_steps, format_bench

        # bench_steps checks its arguments before any work
        results = bench_steps(args.methods, args.backends, model=args.model, batch_size=args.batch_size,
                              classes=args.classes, steps=args.steps)
        print(json.dumps(results, indent=2) if args.json else format_bench(results))
        return 0
    if args.command == "info":
        from .info import format_report, report

        data = report()
        print(json.dumps(data, indent=2) if args.json else format_report(data))
        return 0
    if args.command == "demo":
        from .demo import run_demo
        from .train.config import ConfigError
        from .train.device import resolve_device
        from .train.validate import check_arguments, check_backend_names

        check_backend_names(args.backends, "demo --backends")
        check_arguments("demo", [
            ("--rounds", args.rounds, lambda v: v >= 1, "a number of timed repetitions, at least 1")])
        try:  # the harness's own rule for --device (auto, cpu, cuda, cuda:N), said as demo's
            device = resolve_device(args.device)
        except ConfigError as exc:
            raise ConfigError(f"demo {exc}") from None
        return run_demo(device, tuple(args.backends), args.rounds)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
