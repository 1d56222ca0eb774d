"""What each memory lever costs in layout control: the toy demo's adapter over seeds, one lever at a time.

Issue 28's levers make SDXL and Kolors adapters fit a 24 GB card (docs/diffusers_memory_plan.md): lighter
fuser presets, 8-bit AdamW, gradient accumulation and bf16 adapter weights with stochastic rounding. Memory
saved is only half of the question; this runs the diffusers demo (``diffusers_ext.demo.run``: the shipped
frozen toy UNet, 1000 adapter steps, 64 held-out layouts scored by colour segmentation) once per variant and
training seed, each variant changing one lever against "all blocks" (GLIGEN's placement, fp32 AdamW, the
whole batch of 32 at once), and prints each variant's layout scores as mean (min .. max) over the seeds, its
difference to all blocks and in how many seeds it came out higher, beside what the lever saves at SDXL's
published size (adapter parameters, bytes of weights + gradients + optimizer state per parameter, from
``diffusers_ext.fuser_presets.preset_parameter_counts`` and ``training.optimizers.bytes_per_parameter``).

Each run is its own process with pinned CPU kernels and one thread (:mod:`vlext.parts`, as ``make demo``),
``--jobs`` at a time; the all-blocks runs equal ``python -m vlext.seeds --part diffusers_ext`` seed for seed,
so ``--baseline`` takes them from that command's ``seeds.json`` instead of running them again.

    uv run --frozen python -m benchmarks.bench_diffusers_adapter_levers --seeds 3 \\
        --baseline docs/results/seeds_diffusers_ext.json --out bench_out/adapter_levers

About 9 minutes of one core per run on the development machine; "bf16 adapter" runs only when named
(``--variants``), since a pinned CPU run takes nine times as long in bf16 (``OPT_IN``). Writes
``<out>/levers.json`` (every run's scores and the statistics).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # started by path: fairscale's `benchmarks` package must not shadow ours
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# variant -> (demo config overrides, the trainer flags it stands for, what it saves on the GPU)
VARIANTS = {
    "all blocks": ({}, "GLIGEN: --layers all, AdamW, batch 32", "(the reference)"),
    "migc": (
        {"adapter_layers": "migc"},
        "--layers migc (mid block + deepest up stage)",
        "adapter state; activations of the dropped fusers",
    ),
    "mid": ({"adapter_layers": "mid"}, "--layers mid", "adapter state; activations of the dropped fusers"),
    "8-bit AdamW": ({"adapter_optimizer": "adamw8bit"}, "--use-8bit-adam", "optimizer state"),
    "accumulation 4 x 8": (
        {"gradient_accumulation_steps": 4},
        "--batch-size 8 --gradient-accumulation-steps 4",
        "activations: a micro-batch of 8 instead of 32",
    ),
    "bf16 adapter": (
        {"bf16_adapter": True},
        "--bf16-adapter --mixed-precision bf16",
        "adapter weights and gradients at half width",
    ),
}
# bf16 runs are slow on a CPU: started first, the shorter runs fill in around them
LONGEST_FIRST = ("bf16 adapter",)
# not run unless named: with the kernels pinned to AVX2 a bf16 convolution has no oneDNN kernel and falls
# back to aten's _slow_conv2d_forward (47 % of a bf16 step in torch.profiler, bf16 matmuls another 38 %),
# so a bf16 step takes 9x an fp32 one here (5.7 s vs 0.65 s) and three seeds would take about 10 core-hours.
# On a GPU, or a CPU run with --native-kernels on AVX512-BF16, it costs no more than the others
OPT_IN = ("bf16 adapter",)
REFERENCE = "all blocks"


def _scores(result_table: dict) -> dict[str, float]:
    """The adapter column of the demo's table, by score."""
    columns = result_table["columns"]
    j = columns.index("adapter")
    return {row[0]: row[j] for row in result_table["rows"]}


def _from_seeds_file(path: Path, seeds: list[int], quick: bool) -> dict[int, dict[str, float]]:
    """The all-blocks runs from ``python -m vlext.seeds --part diffusers_ext``'s seeds.json."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("part") != "diffusers_ext":
        raise SystemExit(f"--baseline {path}: not a diffusers_ext seeds.json (part {data.get('part')!r})")
    if bool(data.get("quick")) != quick:
        raise SystemExit(
            f"--baseline {path}: written with --quick {bool(data.get('quick'))}, this run is --quick {quick}"
        )
    from diffusers_ext.demo import DEMO_CONFIG, QUICK_CONFIG, table_title

    expected = table_title({**DEMO_CONFIG, **(QUICK_CONFIG if quick else {})})
    if data.get("title") != expected:
        raise SystemExit(
            f"--baseline {path}: its runs are {data.get('title')!r}, this benchmark's are {expected!r}"
        )
    missing = [s for s in seeds if str(s) not in data["per_seed"]]
    if missing:
        raise SystemExit(f"--baseline {path}: has seeds {data['seeds']}, not {missing}")
    return {s: dict(zip(data["columns"][1:], data["per_seed"][str(s)]["adapter"])) for s in seeds}


def _finished_run(job, quick: bool) -> dict | None:
    """The table of a run that finished in ``job.out`` with this job's seed, levers and sizes, else None."""
    from diffusers_ext.demo import DEMO_CONFIG, LEVER_KEYS, QUICK_CONFIG
    from vlext.parts import RESULT_FILE

    path = job.out / job.package / RESULT_FILE
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # not there, or cut short while written: run it again
    result = entry.get("result") or {}
    config = {**DEMO_CONFIG, **(QUICK_CONFIG if quick else {}), **json.loads(job.config or "{}")}
    same = (
        entry.get("status") == "ok"
        and result.get("training_seed") == job.seed
        and result.get("levers") == {k: config[k] for k in LEVER_KEYS}
        and result.get("adapter_steps") == config["adapter_steps"]
    )
    return result["tables"][0] if same else None


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def _cell(s: dict, sign: str = "") -> str:
    return f"{s['mean']:{sign}.3f} ({s['min']:{sign}.3f} .. {s['max']:{sign}.3f})"


def memory_at_published_size() -> dict[str, dict]:
    """Per variant: SDXL adapter parameters and bytes of its training state (weights, gradients, optimizer)."""
    from diffusers_ext.fuser_presets import preset_parameter_counts
    from diffusers_ext.training.optimizers import bytes_per_parameter

    counts = preset_parameter_counts(["all", "migc", "mid"])["sdxl"]
    out = {}
    for name, (config, *_) in VARIANTS.items():
        blocks, params = counts[config.get("adapter_layers") or "all"]
        per = bytes_per_parameter(
            config.get("adapter_optimizer", "adamw"),
            bf16_stochastic_rounding=config.get("bf16_adapter", False),
        )["total"]
        out[name] = {"sdxl_blocks": blocks, "sdxl_parameters": params, "bytes_per_parameter": per}
    return out


def summarize(scores: dict[str, dict[int, dict[str, float]]], memory: dict[str, dict]) -> dict:
    """Mean and range per variant and score, and the difference to the reference seed for seed."""
    seeds = sorted(scores[REFERENCE])
    names = list(scores[REFERENCE][seeds[0]])
    stats = {}
    for variant, by_seed in scores.items():
        entry = {"scores": {}, "minus_reference": {}, "higher_than_reference": {}}
        for name in names:
            values = [by_seed[s][name] for s in seeds]
            entry["scores"][name] = _stats(values)
            deltas = [by_seed[s][name] - scores[REFERENCE][s][name] for s in seeds]
            entry["minus_reference"][name] = _stats(deltas)
            entry["higher_than_reference"][name] = sum(d > 0 for d in deltas)
        entry.update(memory.get(variant, {}))
        stats[variant] = entry
    return {"seeds": seeds, "score_names": names, "variants": stats}


def markdown(summary: dict) -> list[str]:
    seeds, names = summary["seeds"], summary["score_names"]
    short = {names[0]: "mean IoU", names[1]: "IoU > 0.5", names[2]: "centre in box"}
    header = [
        f"variant (mean (min .. max) over seeds {', '.join(map(str, seeds))})",
        *(short[n] for n in names),
        f"mean IoU minus {REFERENCE}",
        "SDXL fusers / adapter parameters",
        "adapter training state at SDXL size",
        "also saves",
    ]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    ref_bytes = None
    for variant, entry in summary["variants"].items():
        state = entry.get("sdxl_parameters", 0) * entry.get("bytes_per_parameter", 0)
        ref_bytes = ref_bytes or state
        delta = entry["minus_reference"][names[0]]
        cells = [
            variant,
            *(_cell(entry["scores"][n]) for n in names),
            ""
            if variant == REFERENCE
            else f"{_cell(delta, '+')}, higher in {entry['higher_than_reference'][names[0]]} of {len(seeds)}",
            f"{entry.get('sdxl_blocks', '?')} / {entry.get('sdxl_parameters', 0) / 1e9:.2f} B",
            f"{state / 2**30:.1f} GiB ({state / ref_bytes:.2f}x)" if ref_bytes else "",
            VARIANTS[variant][2] if variant in VARIANTS else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument(
        "--seeds", type=int, default=3, help="training seeds 0 .. N-1 per variant (default 3)"
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[v for v in VARIANTS if v not in OPT_IN],
        metavar="NAME",
        help=f"variants to run: {'; '.join(f'{k!r} = {v[1]}' for k, v in VARIANTS.items())} (default: all "
        f"but {', '.join(map(repr, OPT_IN))}, which is 9x slower on a CPU with the kernels pinned)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help=f"take the {REFERENCE!r} runs from this vlext.seeds --part diffusers_ext seeds.json",
    )
    parser.add_argument("--out", type=Path, default=Path("bench_out/adapter_levers"), help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace the results in a used --out")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue in a used --out: a run that finished there with the same variant, seed and sizes is "
        "read back instead of run again (an interrupted benchmark loses only its unfinished runs)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs at the same time (default 2)")
    parser.add_argument(
        "--quick", action="store_true", help="the demo's --quick sizes (a test of the command)"
    )
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    if args.seeds < 1 or args.jobs < 1:
        parser.error(f"--seeds and --jobs must be >= 1, got {args.seeds}, {args.jobs}")
    if args.baseline is not None and not args.baseline.is_file():
        parser.error(f"--baseline {args.baseline}: no such file (python -m vlext.seeds --part diffusers_ext)")
    from vlext.output_folder import output_folder_problem

    if args.resume and args.overwrite:
        parser.error("--resume keeps the finished runs of --out and --overwrite replaces them: give one")
    problem = None if args.resume else output_folder_problem(args.out, args.overwrite)
    if problem:
        parser.error(problem)
    seeds = list(range(args.seeds))
    variants = [REFERENCE, *(v for v in args.variants if v != REFERENCE)]
    scores: dict[str, dict[int, dict[str, float]]] = {}
    if args.baseline is not None:
        scores[REFERENCE] = _from_seeds_file(args.baseline, seeds, args.quick)
    from vlext.atomic_files import atomic_write_json
    from vlext.parts import PartJob, run_parts

    jobs = {
        (variant, s): PartJob(
            f"{variant} seed {s}",
            "diffusers_ext",
            args.out / variant.replace(" ", "_") / f"seed_{s}",
            seed=s,
            config=json.dumps(VARIANTS[variant][0]) if VARIANTS[variant][0] else None,
        )
        for variant in sorted(variants, key=lambda v: v not in LONGEST_FIRST)
        if variant not in scores
        for s in seeds
    }
    if args.resume:
        for key, job in list(jobs.items()):
            table = _finished_run(job, args.quick)
            if table is not None:
                print(f"=== {job.name}: finished in {job.out}, read back (--resume)", flush=True)
                scores.setdefault(key[0], {})[key[1]] = _scores(table)
                del jobs[key]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    entries = run_parts(list(jobs.values()), args.quick, args.jobs, threads=1)
    failed = [name for name, entry in entries.items() if entry["status"] != "ok"]
    if failed:
        print(f"failed: {', '.join(failed)} (their logs are above)")
        return 1
    for (variant, s), job in jobs.items():
        scores.setdefault(variant, {})[s] = _scores(entries[job.name]["result"]["tables"][0])
    scores = {
        v: dict(sorted(scores[v].items())) for v in variants
    }  # VARIANTS order, whatever order the runs took
    summary = summarize(scores, memory_at_published_size())
    summary.update(
        quick=args.quick,
        command="python -m benchmarks.bench_diffusers_adapter_levers " + " ".join(argv or sys.argv[1:]),
        total_seconds=round(time.perf_counter() - started, 1),
        per_seed=scores,
    )
    path = atomic_write_json(args.out / "levers.json", summary, indent=2)
    print("\n".join(markdown(summary)))
    print(f"total: {summary['total_seconds']:.0f} s; results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
