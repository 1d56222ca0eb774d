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
MAIN_IMPORT = "from benchmarks.peak_memory import peak_bytes"


@pytest.mark.slow
def test_the_diffusers_benchmark_starts_by_path_from_another_directory(tmp_path):
    """`python benchmarks/bench_diffusers_spatial_adapter.py` answers, and the import its main() makes after
    parsing (our benchmarks.peak_memory, not fairscale's package) works from the path a by-path start gives.

    The smallest real run builds SD1.5-wide UNets (minutes on 2 cores), so the second process starts the
    script the way the interpreter does for a path (its folder first on sys.path, ``__package__`` unset),
    runs the module's top level, then main()'s own import line and a measurement with it."""
    result = _run([str(BENCH), "--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--repeats" in result.stdout
    code = (
        "import inspect, runpy, sys; "
        f"sys.path[0] = {str(BENCH.parent)!r}; sys.argv = [{str(BENCH)!r}]; "
        f"g = runpy.run_path({str(BENCH)!r}, run_name='bench'); "
        f"assert {MAIN_IMPORT!r} in inspect.getsource(g['main']); "
        f"{MAIN_IMPORT}; import torch; "
        "print(sys.modules['benchmarks'].__file__); print(peak_bytes(lambda: torch.ones(1 << 20)))"
    )
    started = _run(["-c", code], cwd=tmp_path)
    assert started.returncode == 0, started.stderr[-3000:]
    package, peak = started.stdout.split()
    assert Path(package) == REPO / "benchmarks" / "__init__.py"
    assert int(peak) >= 4 << 20  # a 4 MiB tensor was allocated inside the measured call


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
