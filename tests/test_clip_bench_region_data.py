"""benchmarks/bench_clip_region_data.py runs by path from another directory and prints its ratios."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYTHON = str(REPO / ".venv/bin/python") if (REPO / ".venv/bin/python").exists() else sys.executable


@pytest.mark.slow
def test_the_region_data_benchmark_prints_its_ratios_and_writes_nothing_where_started(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    args = [
        "--n",
        "32",
        "--shards",
        "2",
        "--workers",
        "1",
        "--batch",
        "8",
        "--image-size",
        "32",
        "--repeats",
        "1",
    ]
    result = subprocess.run([PYTHON, str(REPO / "benchmarks/bench_clip_region_data.py"), *args], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rates = dict(re.findall(r"^  (.+?)\s+([\d.]+) samples/s$", result.stdout, flags=re.M))
    assert len(rates) == 5 and all(float(r) > 0 for r in rates.values()), result.stdout
    ratio = re.search(
        r"webdataset \+ region stage / open_clip's loader = ([\d.]+) \(goal >= 0.9\)", result.stdout
    )
    plain, ours = float(rates["webdataset, open_clip's loader"]), float(rates["webdataset + region stage"])
    assert ratio and float(ratio[1]) == pytest.approx(ours / plain, abs=1e-3)
    assert list(tmp_path.iterdir()) == []
