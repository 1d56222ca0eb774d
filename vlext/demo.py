"""``make demo``: run each extension's demo on the built-in toy world, then write one page to look at.

Each demo is ``run(out_dir: Path, quick: bool) -> dict`` (registry.yaml's ``demos:`` lists them) and prints
its own report. The driver runs every demo in its own process, ``--jobs`` at a time, prefixes their output
with the part's name and elapsed time, and writes ``<out>/summary.json`` and ``<out>/index.html`` (static,
relative links). ``--quick`` runs the same functions with smaller numbers (minutes; the test of this
command). A demo that raises fails the run (exit status 1); a demo whose package has not landed is reported
as missing.

Reproducible figures: every part runs with pinned CPU kernels (:mod:`vlext.numerics`: the same numbers on any
x86-64 machine with AVX2; ``--native-kernels`` opts out for speed) and ``--threads`` torch threads (default
1) from its first operator to its last, whatever ``--jobs`` is and whenever the other parts finish. A float reduction split over two
threads adds in another order than over one (``torch.randn(10**6).sum()`` differs in the last bits), and
over hundreds of training steps such differences grow into different recalls; so the thread count is fixed
per part, and ``--jobs`` only decides how many parts run side by side. Two runs on one machine with the
same ``--threads`` write the same ``summary.json`` apart from its timings (tests/test_demo_command.py).
A used ``--out`` is refused unless ``--overwrite`` (:mod:`vlext.output_folder`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from vlext.atomic_files import atomic_write_json
from vlext.manifest import load_demos
from vlext.numerics import numerics_record, pin_this_process, pinned_environment
from vlext.output_folder import output_folder_problem
from vlext.parts import PartJob, run_part, run_parts
from vlext.report import write_index

DEFAULT_THREADS = 1


def extension_demo_command(package: str, run, description: str, argv: list[str] | None = None) -> None:
    """``python -m <package>.demo [--out DIR] [--quick] [--seed S]``: one extension's demo, in this process.

    ``run(out_dir, quick=..., seed=...)`` is the same function ``make demo`` runs; the extensions' ``main``
    only parse these flags, so their ``--help`` answers before torch or the host library is imported.
    """
    parser = argparse.ArgumentParser(
        prog=f"python -m {package}.demo", description=description, allow_abbrev=False
    )
    parser.add_argument(
        "--out", type=Path, default=Path(f"demo_out/{package}"), help="output folder (default: %(default)s)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the same path on a few samples for one epoch (a test of the command)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="training seed (default: the demo's own, as in make demo)"
    )
    parser.add_argument(
        "--native-kernels",
        action="store_true",
        help="this machine's own CPU kernels (faster; the figures then depend on the CPU: vlext.numerics)",
    )
    args = parser.parse_args(argv)
    if "torch" not in sys.modules:  # pinned as make demo pins its parts, before torch is imported
        pin_this_process(DEFAULT_THREADS, args.native_kernels)
    run(args.out, quick=args.quick, **({} if args.seed is None else {"seed": args.seed}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument(
        "--out", type=Path, default=Path("demo_out"), help="output folder (default: demo_out)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results in a used --out (without it a used --out is refused, naming what is there)",
    )
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="run only these packages (e.g. lavis_ext clip_ext); default: all",
    )
    parser.add_argument(
        "--quick", action="store_true", help="the same demos with smaller numbers (a few minutes)"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="demos run at the same time (default 2); results do not depend on it",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        help="torch threads of each demo for its whole run (default %(default)s); the figures depend on it, "
        "so compare runs with the same value",
    )
    parser.add_argument(
        "--native-kernels",
        action="store_true",
        help="let torch, MKL and oneDNN use this CPU's widest kernels (faster on AVX-512; the figures then "
        "depend on the machine). Default: pinned to AVX2, the same figures on any x86-64 with AVX2",
    )
    parser.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one demo in this process
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)  # internal, with --part (vlext.seeds)
    parser.add_argument("--config", help=argparse.SUPPRESS)  # internal, with --part: JSON config overrides
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    demos = load_demos()
    known = {demo.package for demo in demos}
    for name in [*(args.only or []), *([args.part] if args.part else [])]:
        if name not in known:
            parser.error(f"unknown package {name!r}; registry.yaml lists {sorted(known)}")
    if args.part:
        # a part run directly (not by the driver) is pinned here, before torch is imported
        pin_this_process(args.threads, args.native_kernels)
        import torch

        torch.set_num_threads(args.threads)
        (demo,) = [d for d in demos if d.package == args.part]
        config = None if args.config is None else json.loads(args.config)
        status = run_part(demo.run, args.out / demo.package, args.quick, args.seed, config)["status"]
        return 0 if status != "failed" else 1
    problem = output_folder_problem(args.out, args.overwrite)
    if problem:
        parser.error(problem)
    if args.only:
        demos = [demo for demo in demos if demo.package in args.only]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    jobs = [PartJob(demo.package, demo.package, args.out, demo.what) for demo in demos]
    summary = run_parts(jobs, args.quick, min(args.jobs, len(jobs)), args.threads, args.native_kernels)
    total = time.perf_counter() - started
    numerics = numerics_record(pinned_environment(os.environ, args.threads, args.native_kernels))
    atomic_write_json(
        args.out / "summary.json",
        {
            "quick": args.quick,
            "threads": args.threads,
            "numerics": numerics,
            "total_seconds": round(total, 1),
            "parts": summary,
        },
        indent=2,
        default=str,
    )
    page = write_index(args.out)
    print("\n=== summary")
    for package, entry in summary.items():
        print(
            f"{package:>14}: {entry['status']}" + (f" ({entry['seconds']} s)" if "seconds" in entry else "")
        )
    print(f"total: {total:.0f} s; results: {args.out / 'summary.json'}; page: {page}")
    return 1 if any(entry["status"] == "failed" for entry in summary.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
