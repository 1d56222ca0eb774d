"""Benchmarks start both ways README shows them: by module from the repository and by path from anywhere.

fairscale (a LAVIS dependency) installs a top-level ``benchmarks`` package. A script started by path has
its own folder, not the repository, first on ``sys.path``, so ``from benchmarks.peak_memory import ...``
found fairscale's package and failed with ``ModuleNotFoundError: No module named 'benchmarks.peak_memory'``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYTHON = (
    str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
)


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    return subprocess.run([PYTHON, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_fairscale_still_ships_the_shadowing_package():
    """The hazard the entry points guard against is real in this environment (else the tests below prove little)."""
    site_copy = [p for p in sys.path if p and Path(p, "benchmarks", "fsdp.py").exists()]
    assert site_copy, "fairscale's top-level benchmarks package is no longer installed"


def test_run_all_by_path_lists_the_benchmarks_and_refuses_unknown_names(tmp_path):
    listed = _run([str(REPO / "benchmarks" / "run_all.py"), "--help"], cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    for name in ("bench_clip_memory_bank", "bench_diffusers_spatial_adapter", "bench_lavis_fusion"):
        assert name in listed.stdout
    unknown = _run([str(REPO / "benchmarks" / "run_all.py"), "bench_nope"], cwd=tmp_path)
    assert unknown.returncode == 2
    assert "unknown benchmark(s) ['bench_nope']" in unknown.stderr


BENCH = REPO / "benchmarks" / "bench_diffusers_spatial_adapter.py"


@pytest.mark.slow
def test_the_diffusers_benchmark_runs_by_path_from_another_directory(tmp_path):
    """`python benchmarks/bench_diffusers_spatial_adapter.py` from elsewhere: a real run (the tiny UNet), which
    reaches main()'s import of our benchmarks.peak_memory (fairscale's `benchmarks` shadowed it once)."""
    result = _run(
        [str(BENCH), "--unet", "tiny", "--latent", "8", "--batch", "1", "--repeats", "1"], cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    diff = float(result.stdout.split("max |processor - native| = ")[1].split()[0])
    assert diff < 1e-4  # the processor path equals diffusers' gated UNet on the same weights
    assert (
        "processor / native gated = " in result.stdout
        and "forward memory processor / native gated" in result.stdout
    )
    assert list(tmp_path.iterdir()) == []  # nothing written where it was started


@pytest.mark.slow
def test_the_diffusers_benchmark_starts_as_a_module_from_the_repository():
    result = _run(["-m", "benchmarks.bench_diffusers_spatial_adapter", "--help"], cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--repeats" in result.stdout
    # started as a module from here, the `benchmarks` main() imports from is the repository's package
    code = "import importlib.util as u; print(u.find_spec('benchmarks.peak_memory').origin)"
    found = _run(["-c", code], cwd=REPO)
    assert found.returncode == 0, found.stderr[-3000:]
    assert Path(found.stdout.strip()) == REPO / "benchmarks" / "peak_memory.py"
