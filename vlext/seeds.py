"""``python -m vlext.seeds --part lavis_ext --seeds 3``: one demo over N training seeds, mean and range.

A demo compares two settings on one seed (lavis_ext: gated fusion vs plain SPRC; clip_ext: the memory bank
vs none; diffusers_ext: the adapter vs none, on the same frozen UNet and noise). How far such a lead is from noise shows only over several seeds, so this runs the part's demo
(the same ``run`` function ``make demo`` runs, each seed in its own process with ``--threads`` torch threads,
``--jobs`` at a time, as :mod:`vlext.demo` runs its parts) for the seeds ``first, first + 1, ...`` and prints
each table row's mean and range over them, the treatment-minus-control difference per metric, and in how
many seeds the treatment came out ahead. The first seed defaults to the demo's own, so ``make demo``'s run is
one of them (and, with the same ``--threads`` and numerics, gives the same numbers: both pin the CPU kernels
by default, :mod:`vlext.numerics`). The seed is the training seed
(weights, batch order, dropout); the toy data stay the same. Not part of ``make demo``.

Writes ``<out>/seeds.json`` (every seed's table, the statistics and the numerics); ``python -m vlext.report``
renders it into the docs. A ``--out`` that already holds results is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

from vlext.atomic_files import atomic_write_json
from vlext.numerics import numerics_record, pinned_environment
from vlext.output_folder import output_folder_problem
from vlext.report import seeds_markdown  # noqa: F401  (re-exported: the table vlext.report renders)

# part -> (treatment row, control row); a label ending in "*" matches the first row that starts with it
COMPARISONS = {
    "lavis_ext": ("sprc+gated_fusion", "sprc"),
    "clip_ext": ("bank K=64, warmup*", "no bank"),
    "diffusers_ext": ("adapter", "no adapter"),
}
# parts whose demo table compares its settings in columns (one row per score): transposed before the
# statistics, so that every part's seeds.json has one row per setting and one column per score
BY_COLUMN = {"diffusers_ext"}


def transposed(table: dict) -> dict:
    """A demo table with settings as columns turned into one with settings as rows (``title`` kept)."""
    columns, rows = table["columns"], table["rows"]
    return {
        "title": table["title"],
        "columns": ["setting", *(row[0] for row in rows)],
        "rows": [[setting, *(row[j] for row in rows)] for j, setting in enumerate(columns[1:], start=1)],
    }


def _row(rows: dict[str, list], pattern: str) -> str:
    for label in rows:
        if label == pattern or (pattern.endswith("*") and label.startswith(pattern[:-1])):
            return label
    raise KeyError(f"no table row matches {pattern!r}; rows are {list(rows)}")


def seed_statistics(part: str, tables: dict[int, dict]) -> dict:
    """Mean, min and max over seeds of every numeric cell of the demo's first table, and the comparison.

    ``tables`` maps each seed to that run's ``tables[0]`` (``title``, ``columns``, ``rows``).
    """
    seeds = sorted(tables)
    columns = tables[seeds[0]]["columns"]
    by_seed = {s: {row[0]: row[1:] for row in tables[s]["rows"]} for s in seeds}
    labels = list(by_seed[seeds[0]])
    stats: dict[str, dict[str, dict]] = {}
    for label in labels:
        stats[label] = {}
        for j, column in enumerate(columns[1:]):
            values = [by_seed[s][label][j] for s in seeds]
            if any(v is None for v in values):
                continue
            stats[label][column] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}
    result = {"part": part, "seeds": seeds, "columns": columns, "per_seed": by_seed, "stats": stats}
    if part in COMPARISONS:
        treatment, control = (_row(by_seed[seeds[0]], p) for p in COMPARISONS[part])
        diff, ahead = {}, {}
        for j, column in enumerate(columns[1:]):
            deltas = [by_seed[s][treatment][j] - by_seed[s][control][j] for s in seeds]
            if any(d is None or math.isnan(d) for d in deltas):
                continue
            diff[column] = {"mean": sum(deltas) / len(deltas), "min": min(deltas), "max": max(deltas)}
            ahead[column] = sum(d > 0 for d in deltas)
        result["comparison"] = {
            "treatment": treatment,
            "control": control,
            "difference": diff,
            "ahead": ahead,
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument(
        "--part", required=True, help="the demo to repeat: lavis_ext, clip_ext or diffusers_ext"
    )
    parser.add_argument("--seeds", type=int, default=3, help="how many seeds (default 3)")
    parser.add_argument(
        "--first-seed",
        type=int,
        default=None,
        help="the first seed (default: the demo's own, as in make demo)",
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: demo_seeds/<part>)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results in a used --out (without it a used --out is refused, naming what is there)",
    )
    parser.add_argument(
        "--native-kernels",
        action="store_true",
        help="this CPU's widest kernels (faster; the figures then depend on the machine: vlext.numerics)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="seeds run at the same time (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per seed's process (default 1)")
    parser.add_argument(
        "--quick", action="store_true", help="the demos' --quick sizes (a test of the command)"
    )
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.jobs < 1 or args.threads < 1:
        parser.error(
            f"--seeds, --jobs and --threads must be >= 1, got {args.seeds}, {args.jobs}, {args.threads}"
        )
    if args.first_seed is not None and args.first_seed < 0:
        parser.error(
            f"--first-seed must be >= 0 (numpy and torch take seeds 0 .. 2**32 - 1), got {args.first_seed}"
        )
    from vlext.manifest import load_demos

    demos = {demo.package: demo for demo in load_demos()}
    if args.part not in demos:
        parser.error(f"unknown --part {args.part!r}; registry.yaml lists {sorted(demos)}")
    if args.part not in COMPARISONS:
        parser.error(f"--part {args.part}: seeds run for {sorted(COMPARISONS)} (demos with a training seed)")
    out = args.out if args.out is not None else Path("demo_seeds") / args.part
    problem = output_folder_problem(out, args.overwrite)  # before the demo's module (and its host) loads
    if problem:
        parser.error(problem)
    import inspect

    from vlext.parts import PartJob, load_demo_function, run_parts

    function = load_demo_function(demos[args.part].run)
    if function is None:
        parser.error(f"{demos[args.part].run} does not exist")
    seed_parameter = inspect.signature(function).parameters.get("seed")
    if seed_parameter is None:
        parser.error(f"--part {args.part}: {demos[args.part].run} takes no seed argument")
    first = seed_parameter.default if args.first_seed is None else args.first_seed
    seeds = list(range(first, first + args.seeds))
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    jobs = [PartJob(f"{args.part} seed {s}", args.part, out / f"seed_{s}", seed=s) for s in seeds]
    entries = run_parts(jobs, args.quick, min(args.jobs, len(jobs)), args.threads, args.native_kernels)
    failed = [name for name, entry in entries.items() if entry["status"] != "ok"]
    if failed:
        print(f"failed: {', '.join(failed)} (their logs are above)")
        return 1
    tables = {s: entries[job.name]["result"]["tables"][0] for s, job in zip(seeds, jobs)}
    if args.part in BY_COLUMN:
        tables = {s: transposed(table) for s, table in tables.items()}
    data = seed_statistics(args.part, tables)
    data.update(
        quick=args.quick,
        threads=args.threads,
        numerics=numerics_record(pinned_environment(os.environ, args.threads, args.native_kernels)),
        title=tables[seeds[0]]["title"],
        command=f"python -m vlext.seeds --part {args.part} --seeds {args.seeds}"
        + (f" --first-seed {args.first_seed}" if args.first_seed is not None else "")
        + (" --quick" if args.quick else ""),
        total_seconds=round(time.perf_counter() - started, 1),
    )
    path = atomic_write_json(out / "seeds.json", data, indent=2)
    print(f"\n=== {data['title']}: seeds {seeds}")
    print("\n".join(seeds_markdown(data)))
    print(f"total: {data['total_seconds']:.0f} s; results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
