"""`make test` as independent parts run side by side on the machine's cores (2 on CI), each with its own log.

What `make test` checks is unchanged: the whole of tests/ under the Triton interpreter (with the CUDA extension
required where nvcc built it), the op tests on the CUDA emulator in both thread orders (where g++ exists), and
the benchmark smoke. Run one after another on 2 cores, those leave a core idle most of the time (the Triton
interpreter and the emulator's fibers are single-threaded Python / C++); here they are cut into parts that
two workers take longest first. Every test file of tests/ is in exactly one of the parts run under the
interpreter: the files no part names make up the part "rest", so a new test file is never left out.

Each part runs single-threaded (OMP_NUM_THREADS=1 unless set) so that two of them never oversubscribe the
cores. A part's output goes to build/test-logs/<part>.log; the summary lists every part with its time and
pytest's last line, and the logs of failed parts are printed in full.

  python .ci/test_parts.py [--jobs N] [--expect-extension] [--emulator] [--list] [--only PART...]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOGS = ROOT / "build" / "test-logs"
OPS = "tests/ops"  # the op tests: every op against float64 on every backend; the emulator parts take the folder

# (name, kind, pytest arguments), in the order they start, the longest first (README "Tests" gives the times
# seen); kind "main" runs under TRITON_INTERPRET=1 as the suite always did, "emulated" on the CUDA emulator,
# "bench" is the benchmark smoke. The main parts name folders of tests/ (one per layer) or files in them.
PARTS = [
    ("ops-cmpa", "main", ["tests/ops/test_cmpa.py"]),
    ("ops", "main", [OPS, "--ignore=tests/ops/test_cmpa.py"]),
    ("rest", "main", None),  # every test file no main part names: kernels (compile check, extension), package
    ("train", "main", ["tests/train"]),
    ("methods", "main", ["tests/methods", "tests/clip"]),
    ("emulator", "emulated", [OPS, "tests/kernels/test_cuda_emulator.py", "-k", "cuda or emulator"]),
    ("emulator-reversed", "emulated-reverse", [OPS, "-k", "cuda"]),
    ("bench-smoke", "bench", ["benches", "--benchmark-disable"]),
]


def test_files(args: list) -> list:
    """The test files that pytest arguments of a part select: its files, and the test_*.py under its folders
    less the --ignore'd ones (options such as -k filter tests, not files)."""
    ignored = {a.split("=", 1)[1] for a in args if a.startswith("--ignore=")}
    files = []
    for arg in args:
        if arg.startswith("-") or not arg.startswith("tests"):
            continue
        path = ROOT / arg
        found = sorted(path.rglob("test_*.py")) if path.is_dir() else [path]
        files += [str(f.relative_to(ROOT)) for f in found if str(f.relative_to(ROOT)) not in ignored]
    return files


def all_test_files() -> list:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py"))


def _rest() -> list:
    named = {f for _, kind, args in PARTS if kind == "main" and args for f in test_files(args)}
    return [f for f in all_test_files() if f not in named]


def _env(kind: str, expect_extension: bool, jobs: int) -> dict:
    env = dict(os.environ)
    if jobs > 1:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(var, "1")
    if kind != "bench":
        env["TRITON_INTERPRET"] = "1"
    if kind == "main" and expect_extension:
        env["FASTPROMPT_EXPECT_CUDA_EXTENSION"] = "1"
    if kind.startswith("emulated"):
        env.pop("FASTPROMPT_EXPECT_CUDA_EXTENSION", None)  # the emulator stands in for the extension there
        env["FASTPROMPT_CUDA_EMULATE"] = "1"
    if kind == "emulated-reverse":
        env["FASTPROMPT_CUDA_EMULATE_ORDER"] = "reverse"
    return env


RUNNING: set = set()
LOCK = threading.Lock()


def run_part(name: str, kind: str, args: list, expect_extension: bool, jobs: int) -> tuple:
    """Run one part; (name, exit status, seconds, pytest's last line)."""
    log = LOGS / f"{name}.log"
    # the cache plugin is off: two pytest processes would rewrite each other's .pytest_cache
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=10", *args]
    start = time.monotonic()
    with open(log, "w") as out:
        out.write(" ".join(cmd) + "\n")
        out.flush()
        child = subprocess.Popen(cmd, cwd=ROOT, env=_env(kind, expect_extension, jobs), stdout=out,
                                 stderr=subprocess.STDOUT)
        with LOCK:
            RUNNING.add(child)
        status = child.wait()
        with LOCK:
            RUNNING.discard(child)
    seconds = time.monotonic() - start
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    summary = next((line.strip("= ") for line in reversed(lines) if re.search(r"\d+ (passed|failed|error)", line)),
                   lines[-1] if lines else "no output")
    print(f"  {name:<18} {'ok' if status == 0 else f'FAILED (exit {status})':<16} {seconds:6.0f} s   {summary}",
          flush=True)
    return name, status, seconds, summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--expect-extension", action="store_true", help="the CUDA extension was built: require it")
    parser.add_argument("--emulator", action="store_true", help="run the op tests on the CUDA emulator (needs g++)")
    parser.add_argument("--list", action="store_true", help="print the parts and their pytest arguments, run nothing")
    parser.add_argument("--only", nargs="+", metavar="PART", help="run these parts only")
    options = parser.parse_args(argv)
    unknown = set(options.only or []) - {name for name, _, _ in PARTS}
    if unknown:
        parser.error(f"no part {', '.join(sorted(unknown))}; parts are {', '.join(name for name, _, _ in PARTS)}")
    parts = [(name, kind, _rest() if args is None else args) for name, kind, args in PARTS
             if (options.emulator or not kind.startswith("emulated")) and (not options.only or name in options.only)]
    parts = [p for p in parts if p[2]]
    if options.list:
        for name, kind, args in parts:
            print(f"{name} ({kind}): {' '.join(args)}")
        return 0
    LOGS.mkdir(parents=True, exist_ok=True)
    jobs = max(1, min(options.jobs, len(parts)))
    print(f"make test: {len(parts)} parts on {jobs} worker(s), logs in {LOGS.relative_to(ROOT)}/", flush=True)
    start = time.monotonic()
    try:
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            results = list(pool.map(lambda p: run_part(*p, options.expect_extension, jobs), parts))
    except KeyboardInterrupt:
        with LOCK:
            for child in RUNNING:
                child.terminate()
        raise
    failed = [name for name, status, _, _ in results if status != 0]
    for name in failed:
        print(f"\n===== {name} (build/test-logs/{name}.log) =====\n{(LOGS / f'{name}.log').read_text()}")
    total = time.monotonic() - start
    print(f"make test: {len(results) - len(failed)} of {len(results)} parts passed in {total:.0f} s "
          f"(parts' own times add up to {sum(r[2] for r in results):.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
