"""`python -m vlext.seeds`: one demo over several training seeds, with each cell's mean and range."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlext.seeds import seed_statistics, seeds_markdown

REPO = Path(__file__).resolve().parents[1]


def _table(rows):
    return {"title": "t", "columns": ["run", "R@1", "loss"], "rows": rows}


def test_statistics_are_mean_and_range_over_seeds_and_the_comparison_counts_wins():
    tables = {
        0: _table([["no bank", 10.0, 0.5], ["bank K=64, warmup 4", 12.5, 0.75], ["random", 1.6, None]]),
        1: _table([["no bank", 20.0, 0.25], ["bank K=64, warmup 4", 15.0, 0.5], ["random", 1.6, None]]),
        2: _table([["no bank", 15.0, 0.5], ["bank K=64, warmup 4", 18.0, 1.0], ["random", 1.6, None]]),
    }
    data = seed_statistics("clip_ext", tables)
    assert data["seeds"] == [0, 1, 2]
    assert data["stats"]["no bank"]["R@1"] == {"mean": 15.0, "min": 10.0, "max": 20.0}
    assert data["stats"]["bank K=64, warmup 4"]["loss"]["mean"] == pytest.approx(0.75)
    assert "loss" not in data["stats"]["random"]  # the None cell is not averaged
    comparison = data["comparison"]
    assert (comparison["treatment"], comparison["control"]) == ("bank K=64, warmup 4", "no bank")
    assert comparison["difference"]["R@1"]["min"] == -5.0 and comparison["difference"]["R@1"]["max"] == 3.0
    assert comparison["difference"]["R@1"]["mean"] == pytest.approx(0.5 / 3)
    assert comparison["ahead"] == {"R@1": 2, "loss": 3}
    lines = seeds_markdown(data)
    assert lines[2] == "| no bank | 15.0 (10.0 .. 20.0) | 0.42 (0.25 .. 0.50) |"
    assert lines[-2] == "| bank K=64, warmup 4 minus no bank | +0.2 (-5.0 .. +3.0) | +0.33 (+0.25 .. +0.50) |"
    assert lines[-1] == "| seeds where bank K=64, warmup 4 is higher | 2 of 3 | 3 of 3 |"


def test_a_demo_without_a_training_seed_is_refused_before_anything_runs(monkeypatch, capsys, tmp_path):
    import vlext.parts
    import vlext.seeds

    def run(out_dir, quick=False):  # a registry demo whose run takes no seed
        raise AssertionError("must not run")

    monkeypatch.setattr(vlext.parts, "load_demo_function", lambda name: run)
    with pytest.raises(SystemExit) as exit_info:
        vlext.seeds.main(["--part", "clip_ext", "--out", str(tmp_path / "s")])
    assert exit_info.value.code == 2
    assert "--part clip_ext: clip_ext.demo:run takes no seed argument" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_a_part_compared_in_columns_is_transposed_to_one_row_per_setting():
    """diffusers_ext's table has one row per score and the settings as columns."""
    from vlext.seeds import transposed

    table = {
        "title": "t",
        "columns": ["score", "adapter", "no adapter"],
        "rows": [["IoU", 0.5, 0.1], ["hit", 0.4, 0.2]],
    }
    assert transposed(table) == {
        "title": "t",
        "columns": ["setting", "IoU", "hit"],
        "rows": [["adapter", 0.5, 0.4], ["no adapter", 0.1, 0.2]],
    }
    data = seed_statistics("diffusers_ext", {0: transposed(table)})
    assert data["comparison"]["difference"]["IoU"]["mean"] == pytest.approx(0.4)
    assert data["comparison"]["ahead"] == {"IoU": 1, "hit": 1}


@pytest.mark.slow
def test_quick_diffusers_demo_reports_its_training_seed_as_one_row_per_setting(tmp_path):
    """One seed (tests/test_diffusers_demo.py shows in-process that the seed moves the adapter, not the baseline)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    args = ["--part", "diffusers_ext", "--seeds", "1", "--first-seed", "3", "--quick", "--out", "s"]
    proc = subprocess.run(
        [sys.executable, "-m", "vlext.seeds", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((tmp_path / "s" / "seeds.json").read_text())
    assert data["seeds"] == [3] and data["columns"][0] == "setting"
    result = json.loads((tmp_path / "s" / "seed_3" / "diffusers_ext" / "result.json").read_text())["result"]
    assert result["training_seed"] == 3
    assert data["per_seed"]["3"]["adapter"][0] == round(result["mean_iou_adapter"], 3)
    assert data["per_seed"]["3"]["no adapter"][1] == round(result["share_iou_gt_0.5_baseline"], 3)
    assert data["comparison"]["treatment"] == "adapter" and data["comparison"]["control"] == "no adapter"
    assert "| adapter minus no adapter | " in proc.stdout


@pytest.mark.slow
def test_quick_clip_demo_over_two_seeds_reports_each_seed_and_their_mean(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "vlext.seeds", "--part", "clip_ext", "--seeds", "2", "--quick", "--out", "s"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((tmp_path / "s" / "seeds.json").read_text())
    assert data["seeds"] == [0, 1] and data["quick"] is True  # the demo's own seed first
    for seed in (0, 1):  # every seed's row is what that seed's demo returned
        result = json.loads((tmp_path / "s" / f"seed_{seed}" / "clip_ext" / "result.json").read_text())
        assert result["result"]["setup"]["seed"] == seed
        rows = {row[0]: row[1:] for row in result["result"]["tables"][0]["rows"]}
        assert data["per_seed"][str(seed)] == rows
    r5 = [data["per_seed"][s]["no bank"][1] for s in ("0", "1")]
    assert data["stats"]["no bank"]["i2t R@5"] == {"mean": sum(r5) / 2, "min": min(r5), "max": max(r5)}
    assert data["per_seed"]["0"] != data["per_seed"]["1"]  # the seed reaches the training
    assert data["comparison"]["control"] == "no bank"
    assert "| no bank | " in proc.stdout and "over 2 seeds" in proc.stdout
