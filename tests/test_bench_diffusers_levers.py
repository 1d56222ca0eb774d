"""benchmarks/bench_diffusers_adapter_levers.py: each memory lever's layout scores over seeds, against all blocks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.bench_diffusers_adapter_levers import (
    REFERENCE,
    VARIANTS,
    _from_seeds_file,
    markdown,
    summarize,
)
from diffusers_ext.demo import DEMO_CONFIG, QUICK_CONFIG, table_title

REPO = Path(__file__).resolve().parents[1]
SCORES = [
    "mean IoU with the requested box (64 objects)",
    "share of objects with IoU > 0.5",
    "share of objects whose centre lies in the box",
]


def _scores(iou):
    return dict(zip(SCORES, [iou, iou / 2, 0.9]))


def test_each_variant_is_compared_with_all_blocks_seed_for_seed():
    scores = {REFERENCE: {0: _scores(0.40), 1: _scores(0.50)}, "mid": {0: _scores(0.30), 1: _scores(0.55)}}
    memory = {
        REFERENCE: {"sdxl_blocks": 70, "sdxl_parameters": 2 * 2**30, "bytes_per_parameter": 16.0},
        "mid": {"sdxl_blocks": 10, "sdxl_parameters": 2**30 // 4, "bytes_per_parameter": 16.0},
    }
    summary = summarize(scores, memory)
    mid = summary["variants"]["mid"]
    assert mid["scores"][SCORES[0]] == pytest.approx({"mean": 0.425, "min": 0.30, "max": 0.55})
    assert mid["minus_reference"][SCORES[0]] == pytest.approx({"mean": -0.025, "min": -0.10, "max": 0.05})
    assert mid["higher_than_reference"][SCORES[0]] == 1
    lines = markdown(summary)
    assert lines[2].startswith("| all blocks | 0.450 (0.400 .. 0.500) |")
    assert "| -0.025 (-0.100 .. +0.050), higher in 1 of 2 | 10 / 0.27 B | 4.0 GiB (0.12x) |" in lines[3]
    assert lines[3].endswith(f"| {VARIANTS['mid'][2]} |")


def test_the_reference_runs_are_read_from_a_seeds_file_of_the_same_demo(tmp_path):
    data = {
        "part": "diffusers_ext",
        "quick": False,
        "title": table_title(DEMO_CONFIG),
        "seeds": [0, 1],
        "columns": ["setting", *SCORES],
        "per_seed": {
            "0": {"adapter": [0.4, 0.2, 0.9], "no adapter": [0.1, 0.0, 0.2]},
            "1": {"adapter": [0.5, 0.3, 0.8]},
        },
    }
    path = tmp_path / "seeds.json"
    path.write_text(json.dumps(data))
    assert _from_seeds_file(path, [0, 1], quick=False)[1] == dict(zip(SCORES, [0.5, 0.3, 0.8]))
    with pytest.raises(SystemExit, match=r"has seeds \[0, 1\], not \[2\]"):
        _from_seeds_file(path, [0, 1, 2], quick=False)
    with pytest.raises(SystemExit, match="written with --quick False, this run is --quick True"):
        _from_seeds_file(path, [0], quick=True)
    path.write_text(json.dumps({**data, "title": table_title({**DEMO_CONFIG, "adapter_steps": 10})}))
    with pytest.raises(
        SystemExit, match="its runs are 'diffusers_ext: layout control on 64 held-out layouts after 10"
    ):
        _from_seeds_file(path, [0], quick=False)
    path.write_text(json.dumps({**data, "part": "clip_ext"}))
    with pytest.raises(SystemExit, match="not a diffusers_ext seeds.json"):
        _from_seeds_file(path, [0], quick=False)


@pytest.mark.slow
def test_the_quick_benchmark_runs_by_path_from_another_directory_and_resumes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    quick_scores = [SCORES[0].replace("64", "8"), *SCORES[1:]]
    baseline = {  # the all-blocks runs, as `vlext.seeds --part diffusers_ext --quick` writes them
        "part": "diffusers_ext",
        "quick": True,
        "title": table_title({**DEMO_CONFIG, **QUICK_CONFIG}),
        "seeds": [0],
        "columns": ["setting", *quick_scores],
        "per_seed": {"0": {"adapter": [0.25, 0.5, 0.75], "no adapter": [0.1, 0.0, 0.2]}},
    }
    (tmp_path / "seeds.json").write_text(json.dumps(baseline))
    script = REPO / "benchmarks" / "bench_diffusers_adapter_levers.py"
    args = [sys.executable, str(script), "--quick", "--seeds", "1", "--variants", "mid", "--out", "b"]
    args += ["--baseline", "seeds.json"]
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((tmp_path / "b" / "levers.json").read_text())
    assert list(data["variants"]) == [REFERENCE, "mid"]
    assert data["per_seed"][REFERENCE]["0"] == dict(zip(quick_scores, [0.25, 0.5, 0.75]))  # read, not run
    run = json.loads((tmp_path / "b" / "mid" / "seed_0" / "diffusers_ext" / "result.json").read_text())
    assert run["result"]["levers"]["adapter_layers"] == "mid" and run["result"]["fusers"] == 1
    assert data["per_seed"]["mid"]["0"][SCORES[1]] == round(run["result"]["share_iou_gt_0.5_adapter"], 3)
    assert data["variants"]["mid"]["sdxl_blocks"] == 10 and data["variants"][REFERENCE]["sdxl_blocks"] == 70
    again = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--overwrite" in again.stderr  # a used --out is refused
    resumed = subprocess.run(
        [*args, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "mid seed 0: finished in" in resumed.stdout and "(started" not in resumed.stdout  # nothing re-run
    assert json.loads((tmp_path / "b" / "levers.json").read_text())["per_seed"] == data["per_seed"]
