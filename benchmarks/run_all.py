"""Run every ``benchmarks/bench_*.py`` in turn (``make bench``); each prints its own ratios.

Pass names to run a subset: ``python -m benchmarks.run_all bench_clip_memory_bank``. Each script runs with
its default arguments; run one directly (``python -m benchmarks.bench_lavis_fusion --help``) to change them.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _scripts() -> list[Path]:
    return sorted(HERE.glob("bench_*.py"))


def main(argv: list[str] | None = None) -> int:
    scripts = _scripts()
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run_all",
        description="Run the benchmarks (all, or the named ones) with their default arguments.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"benchmarks to run: {', '.join(s.stem for s in scripts)}"
    )
    args = parser.parse_args(argv)
    known = {script.stem for script in scripts}
    unknown = sorted(set(args.names) - known)
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {sorted(known)}")
    if args.names:
        scripts = [script for script in scripts if script.stem in args.names]
    # Started by path, sys.path[0] is benchmarks/ and fairscale's top-level `benchmarks` package would
    # shadow ours for the scripts' `from benchmarks.x import ...`: the repository goes first.
    if str(REPO) not in sys.path[:1]:
        sys.path.insert(0, str(REPO))
    for script in scripts:
        print(f"\n=== {script.stem}", flush=True)
        saved = sys.argv
        sys.argv = [str(script)]
        try:
            runpy.run_path(str(script), run_name="__main__")
        finally:
            sys.argv = saved
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
