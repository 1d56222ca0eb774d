"""`python -m vlext.demo --out <relative dir> --quick`, run as a user runs it, writes what it promises there only,
and the same numbers in every run, whatever --jobs is."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from demo_page import check_page_matches_summary

from vlext.manifest import load_demos
from vlext.report import without_timings

REPO = Path(__file__).resolve().parents[1]
PROMISED = {
    "lavis_ext": ["retrieval_panel.png", "lavis_ext_demo.json"],
    "diffusers_ext": ["diffusers_layout_grid.png", "diffusers_gate_loss.png", "diffusers_demo.json"],
    "clip_ext": ["loss_curves.png"],
}


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if "__pycache__" not in p.parts}


def _quick_demo(cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "vlext.demo", "--out", "demo_out", "--quick", *extra],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """One quick demo with the default --jobs 2, from a directory outside the repository."""
    cwd = tmp_path_factory.mktemp("quick_demo")
    lavis_dir = Path(importlib.util.find_spec("lavis").origin).parent
    lavis_before = _files(lavis_dir)
    proc = _quick_demo(cwd)
    return cwd, proc, lavis_before == _files(lavis_dir)


@pytest.mark.slow
def test_quick_demo_from_another_directory_writes_its_page_and_files_under_the_relative_out(quick_demo):
    cwd, proc, lavis_untouched = quick_demo
    out = cwd / "demo_out"
    assert sorted(p.name for p in cwd.iterdir()) == ["demo_out"]  # nothing beside the out folder
    assert lavis_untouched  # nothing inside the installed lavis package

    summary = json.loads((out / "summary.json").read_text())
    assert summary["quick"] is True and summary["threads"] == 1
    assert list(summary["parts"]) == [demo.package for demo in load_demos()]
    assert {entry["status"] for entry in summary["parts"].values()} == {"ok"}
    for package, names in PROMISED.items():
        for name in names:
            assert (out / package / name).stat().st_size > 0, f"{package}/{name} missing"
    assert check_page_matches_summary(out, summary) >= 20  # the page shows the printed numbers

    lavis = summary["parts"]["lavis_ext"]["result"]
    assert lavis["setup"]["epochs"] == 1 and len(lavis["retrieval_examples"]) == 6
    assert all(len(ex["top"]) == 5 and ex["reference"] not in ex["top"] for ex in lavis["retrieval_examples"])
    diffusers = summary["parts"]["diffusers_ext"]["result"]
    assert diffusers["adapter_steps"] == 30 and diffusers["output_layer_norm_end"] > 0.0

    # the driver names each part and its elapsed time; clip's log lines appear once, dynamo's not at all
    assert "[diffusers_ext" in proc.stdout and "[lavis_ext" in proc.stdout
    assert "TorchDynamo" not in proc.stdout + proc.stderr
    assert proc.stdout.count("(started, 1 thread(s))") == 3  # every part keeps one thread for its whole run
    starts = [
        line for line in proc.stdout.splitlines() if line.startswith("[clip_ext") and "Start epoch 0" in line
    ]
    assert len(starts) == 3  # three trainings, each logs its first epoch once


@pytest.mark.slow
def test_two_quick_demos_with_different_jobs_write_the_same_summary(quick_demo, tmp_path):
    """--jobs 3 starts every part at once (other finishing order, other neighbours) and prints the same numbers."""
    first = json.loads((quick_demo[0] / "demo_out" / "summary.json").read_text())
    proc = _quick_demo(tmp_path, "--jobs", "3")
    second = json.loads((tmp_path / "demo_out" / "summary.json").read_text())
    assert "(started, 1 thread(s))" in proc.stdout
    assert first["total_seconds"] > 0 and "seconds" in second["parts"]["clip_ext"]  # timings were there
    a, b = without_timings(first), without_timings(second)
    assert "total_seconds" not in a and "seconds" not in a["parts"]["lavis_ext"]
    for package in a["parts"]:
        assert a["parts"][package] == b["parts"][package], package
    assert a == b
