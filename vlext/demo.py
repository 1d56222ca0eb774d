"""``make demo``: run each extension's demo on the built-in toy world, in the order registry.yaml gives.

Each demo is ``run(out_dir: Path) -> dict`` and prints its own report; this driver adds a summary and
writes every result to ``<out>/summary.json``. A demo whose package has not landed yet is reported as
missing instead of failing the whole run; a demo that raises fails the run (exit status 1).
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
import traceback
from pathlib import Path

from vlext.manifest import load_demos


def _load(run: str):
    module_name, _, function = run.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):
            return None  # the extension's demo is not there yet
        raise
    return getattr(module, function)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument(
        "--out", type=Path, default=Path("demo_out"), help="output folder (default: demo_out)"
    )
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="run only these packages (e.g. lavis_ext clip_ext); default: all",
    )
    args = parser.parse_args(argv)
    demos = load_demos()
    known = {demo.package for demo in demos}
    if args.only:
        unknown = sorted(set(args.only) - known)
        if unknown:
            parser.error(f"--only: unknown package(s) {unknown}; registry.yaml lists {sorted(known)}")
        demos = [demo for demo in demos if demo.package in args.only]
    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, dict] = {}
    failed = False
    for demo in demos:
        print(f"\n=== {demo.package}: {demo.what}", flush=True)
        run = _load(demo.run)
        if run is None:
            print(f"--- {demo.package}: not there yet ({demo.run} does not exist); skipped")
            summary[demo.package] = {"status": "missing"}
            continue
        start = time.perf_counter()
        try:
            result = run(args.out / demo.package)
        except Exception:  # report and go on with the other demos, but fail the run
            traceback.print_exc()
            summary[demo.package] = {"status": "failed"}
            failed = True
            continue
        seconds = time.perf_counter() - start
        summary[demo.package] = {"status": "ok", "seconds": round(seconds, 1), "result": result}
        print(f"--- {demo.package}: done in {seconds:.0f} s")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print("\n=== summary")
    for package, entry in summary.items():
        print(
            f"{package:>14}: {entry['status']}" + (f" ({entry['seconds']} s)" if "seconds" in entry else "")
        )
    print(f"results: {args.out / 'summary.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
