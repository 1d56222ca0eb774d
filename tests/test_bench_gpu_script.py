"""``benchmarks/gpu/run.sh``: every section runs on CPU with ``--tiny`` and prints its figures; a failing
section does not stop the others; the total time guard skips what would start after the budget."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu" / "run.sh"
SECTIONS = ["device", "train-sd15", "train-sdxl", "train-kolors", "processor-vs-native", "generate-sd15"]
PYTHON = (
    str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
)


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    full.update({"PYTHON": PYTHON, "OMP_NUM_THREADS": "1", **env})
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd="/", env=full, capture_output=True, text=True, timeout=900
    )


@pytest.mark.slow
def test_tiny_run_on_cpu_passes_every_section_with_its_figures():
    """--tiny runs the GPU path's code on CPU: the trainer's own steps in bf16 autocast (the loss is finite),
    the rehearsal's prediction beside the measurement, the generate ratio labelled with its grounded steps."""
    run = _run("--tiny")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert [f"=== {s}: ok" in out for s in SECTIONS] == [True] * len(SECTIONS)
    assert "GPU: none (CPU)" in out and "all sections passed" in out
    for model in ("sd15", "sdxl", "kolors"):
        for batch in (1, 4):
            step = re.search(
                rf"train {model} \d+px batch {batch}: .*bf16 autocast.*: ([0-9.]+) s/step, .* loss ([0-9.]+)",
                out,
            )
            assert step and float(step.group(1)) > 0 and float(step.group(2)) < 100, model
            memory = re.search(rf"memory {model} batch {batch}: rehearsal ([0-9.]+) GiB, measured", out)
            assert memory and float(memory.group(1)) > 0, model
    ratio = float(out.split("processor / native gated = ")[1].split()[0])
    assert ratio > 0
    assert "generate with / without adapter = " in out and "(1 of 4 steps grounded)" in out
    assert float(out.split("per grounded step / plain step = ")[1].split()[0]) > 0
    rates = re.findall(r"batch 2 (without adapter|with adapter, [^:]+): ([0-9.]+) images/s", out)
    assert [r[0] for r in rates] == [
        "without adapter",
        "with adapter, GLIGEN schedule (1 of 4 steps grounded)",
        "with adapter, grounded on every step (4 of 4)",
    ]
    assert all(float(r[1]) > 0 for r in rates)


def test_a_failing_section_does_not_stop_the_others():
    run = _run("--tiny", PYTHON="false")  # every section's process fails at once
    assert run.returncode == 1
    assert [f"=== {s}: FAILED (exit 1)" in run.stdout for s in SECTIONS] == [True] * len(SECTIONS)
    assert f"failed sections: {' '.join(SECTIONS)}" in run.stdout


def test_the_total_time_guard_skips_sections_after_the_budget():
    run = _run("--tiny", GPU_BENCH_BUDGET_S="5")
    assert run.returncode == 1
    assert [f"=== {s}: SKIPPED" in run.stdout for s in SECTIONS] == [True] * len(SECTIONS)


def test_unknown_arguments_are_refused():
    run = _run("--fast")
    assert run.returncode == 2 and "unknown argument --fast; accepted: --tiny" in run.stderr
