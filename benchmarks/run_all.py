"""Run every ``benchmarks/bench_*.py`` in turn (``make bench``); each prints its own ratios.

Pass names to run a subset: ``python -m benchmarks.run_all bench_clip_memory_bank``.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    scripts = sorted(Path(__file__).parent.glob("bench_*.py"))
    if argv:
        known = {script.stem for script in scripts}
        unknown = sorted(set(argv) - known)
        if unknown:
            print(f"unknown benchmark(s) {unknown}; available: {sorted(known)}", file=sys.stderr)
            return 2
        scripts = [script for script in scripts if script.stem in argv]
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
