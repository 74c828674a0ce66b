"""The `fastprompt` command (also `python -m fastprompt`)."""

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastprompt", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p_info = sub.add_parser("info", help="versions, and which backends can run each op here (and why not)")
    p_info.add_argument("--json", action="store_true", help="print the report as JSON")
    p_demo = sub.add_parser("demo", help="the ops at CLIP sizes on every available backend, checked against "
                                         "the float64 reference")
    p_demo.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu or cuda")
    p_demo.add_argument("--backends", nargs="+", default=(), metavar="NAME",
                        help="backends to check (default: every one that runs fast on the device)")
    p_demo.add_argument("--rounds", type=int, default=5, help="timed repetitions per backend")
    args = parser.parse_args(argv)

    if args.command == "info":
        from .info import format_report, report

        data = report()
        print(json.dumps(data, indent=2) if args.json else format_report(data))
        return 0
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(args.device, tuple(args.backends), args.rounds)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
