"""Memory plan of spatial-adapter training on SD1.5, SDXL and Kolors: the meta-device rehearsal of the trainer's
own step (``python -m diffusers_ext.training.plan``) for the configurations that matter, and a "start here"
line per card (24 / 48 / 80 GB). docs/diffusers_memory_plan.md is this script's output.

Each row is one rehearsal (diffusers_ext/training/plan.py): the published-size pipeline on the meta device, the
trainer's placement, cache pass, ``build_trainables`` and ``training_step`` in bf16 with every one of the 30
object slots filled, counted by PyTorch's MemTracker. A row "fits" a card when its peak (the training step's
or the cache pass's, whichever is larger) is within 90 % of it; the rest is the CUDA context, workspaces and
fragmentation. The start-here line names the first row, in the order of the grid (fastest first: fewer
levers, larger batches), that fits.

Usage: ``python -m benchmarks.bench_diffusers_train_memory [--models sd15 sdxl kolors]``; ``--grid quick``
rehearses one row per model (a check that it runs).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

if not __package__:  # run by path: the repository before fairscale's top-level `benchmarks` package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GiB = 2**30
CARDS = (24, 48, 80)
CACHED = ["--cache-dir", "--cache-latents"]
# rows, fastest first (the start-here line takes the first that fits); per model: GLIGEN's batch for SD1.5
LEAN = ["--batch-size", "1", "--gradient-accumulation-steps", "8", *CACHED, "--gradient-checkpointing",
        "--trainer-flag=--bf16-adapter"]  # fmt: skip
GRID = {
    "sd15": [
        ["--batch-size", "8", *CACHED],
        ["--batch-size", "8", *CACHED, "--gradient-checkpointing"],
        ["--batch-size", "1"],
        ["--batch-size", "1", *CACHED, "--gradient-checkpointing"],
    ],
    **{
        model: [
            ["--batch-size", "4", *CACHED, "--gradient-checkpointing"],
            ["--batch-size", "1", *CACHED],
            ["--batch-size", "1", *CACHED, "--gradient-checkpointing"],
            LEAN,  # all 70 fusers (GLIGEN-XL's layout), effective batch 8, fp32 AdamW moments
            [*LEAN, "--trainer-flag=--use-8bit-adam"],  # the same with bitsandbytes' 8-bit moments
            [*LEAN, "--trainer-flag=--use-8bit-adam", "--layers", "migc"],
            ["--batch-size", "1"],
        ]
        for model in ("sdxl", "kolors")
    },
}
QUICK = {model: rows[-1:] for model, rows in GRID.items()}


def _g(n: int) -> str:
    return f"{n / GiB:.2f}"


def _row(model: str, argv: list[str]) -> dict:
    from diffusers_ext.training import plan

    opts = plan.parse_args(["--model", model, "--mixed-precision", "bf16", *argv])
    result = plan.rehearse(opts)
    return {"flags": plan.user_flags(opts), "result": result}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_diffusers_train_memory",
        description="Memory plan of spatial-adapter training on SD1.5, SDXL and Kolors from the meta-device "
        "rehearsal of the trainer's step; prints what fits on 24 / 48 / 80 GB and where to start.",
        allow_abbrev=False,
    )
    p.add_argument("--models", nargs="+", choices=sorted(GRID), default=list(GRID))
    p.add_argument("--grid", choices=("full", "quick"), default="full", help="quick: one row per model")
    args = p.parse_args(argv)

    import torch

    grid = GRID if args.grid == "full" else QUICK
    started = time.process_time()
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}"
    )
    print("bf16, 30 objects per sample; GiB at the peak; fits = peak within 90 % of the card")
    for model in args.models:
        rows = [_row(model, argv) for argv in grid[model]]
        print(f"\n## {model}")
        print("| flags | parameters | gradients | optimizer | EMA | activations | temporaries | cache pass | "
              "peak | 24 | 48 | 80 |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for row in rows:
            r, s = row["result"], row["result"].step
            fits = " | ".join("yes" if r.fits(card) else "no" for card in CARDS)
            print(f"| `{row['flags']}` | {_g(s.get('Parameter', 0) + s.get('Buffer', 0))} | "
                  f"{_g(s.get('Gradient', 0))} | {_g(s.get('Optstate', 0))} | {_g(s.get('EMA', 0))} | "
                  f"{_g(s.get('Activation', 0))} | {_g(s.get('Temp', 0) + s.get('Other', 0))} | "
                  f"{_g(r.cache_pass)} | **{_g(r.peak)}** | {fits} |", flush=True)  # fmt: skip
        for card in CARDS:
            first = next((row for row in rows if row["result"].fits(card)), None)
            start = f"`{first['flags']}`" if first else "none of these rows fits"
            print(f"- start here on {card} GB: {start}")
    print(f"\n{time.process_time() - started:.0f} s of CPU time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
