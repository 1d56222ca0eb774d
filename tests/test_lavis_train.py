"""``python -m lavis_ext.train``: LAVIS's runner trains, evaluates, checkpoints and resumes the tiny model.

The runs call ``lavis_ext.train.main`` with the command line's arguments in this process (one thread, as the
subprocess runs had): what they check is what the runner computes, logs and saves. The command launched as
a user launches it is tested in test_lavis_runner_resume.py (another working directory, SIGKILL) and
test_lavis_distributed.py (torchrun)."""

import json

import pytest
import torch
from lavis_helpers import CFG, ROOT
from lavis_inprocess import train


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    from vlext.toyworld import write_cirr

    tmp = tmp_path_factory.mktemp("train")
    data = write_cirr(tmp / "cirr_dataset", 32, 12, 6, seed=0, image_size=32)
    out = tmp / "run1"
    _, log = train(
        f"datasets.cirr.build_info.root={data}",
        f"run.output_dir={out}",
        "run.batch_size_train=8",
        "model.use_gated_fusion=True",
        cfg=CFG,
    )
    (job,) = list(out.iterdir())
    return {"data": data, "tmp": tmp, "job": job, "log": log}


def test_one_epoch_reports_agg_metrics_and_saves_the_best_checkpoint(first_run):
    evaluations = [json.loads(line) for line in (first_run["job"] / "evaluate.txt").read_text().splitlines()]
    assert len(evaluations) == 1 and evaluations[0]["split"] == "val"
    metrics = evaluations[0]
    assert 0.0 <= metrics["agg_metrics"] <= 100.0
    assert metrics["agg_metrics"] == pytest.approx(
        (metrics["recall_at_5"] + metrics["recall_subset_at_1"]) / 2
    )
    assert (first_run["job"] / "checkpoint_best.pth").is_file() or metrics["agg_metrics"] == 0.0


def test_options_override_the_project_yaml(first_run):
    checkpoint = torch.load(first_run["job"] / "checkpoint_best.pth", map_location="cpu", weights_only=False)
    assert checkpoint["config"]["model"]["use_gated_fusion"] is True
    assert checkpoint["config"]["run"]["batch_size_train"] == 8
    assert "gated_fusion.alpha" in checkpoint["model"]
    # 32 triplets at batch 8 -> 4 optimizer steps: alpha left zero
    assert checkpoint["model"]["gated_fusion.alpha"].abs().item() > 0


def test_resume_continues_from_the_next_epoch(first_run):
    out = first_run["tmp"] / "run2"
    _, log = train(
        f"datasets.cirr.build_info.root={first_run['data']}",
        f"run.output_dir={out}",
        "run.batch_size_train=8",
        "model.use_gated_fusion=True",
        "run.max_epoch=2",
        f"run.resume_ckpt_path={first_run['job'] / 'checkpoint_best.pth'}",
        cfg=CFG,
    )
    assert "Resume checkpoint from" in log
    assert "Start training epoch 1" in log and "Start training epoch 0" not in log
    (job,) = list(out.iterdir())
    assert [json.loads(line)["epoch"] for line in (job / "evaluate.txt").read_text().splitlines()] == [1]


def test_missing_cfg_path_is_a_clear_error():
    from lavis_ext.train import main

    with pytest.raises(FileNotFoundError, match="--cfg-path 'nope.yaml' is not a file"):
        main(["--cfg-path", "nope.yaml"])


def test_fashioniq_tiny_trains_and_reports_per_category_recall(tmp_path):
    from vlext.toyworld import write_fashioniq

    data = write_fashioniq(tmp_path / "fashionIQ_dataset", n_per_category=8, seed=0, image_size=32)
    out = tmp_path / "fiq"
    train(
        f"datasets.fashioniq.build_info.root={data}",
        f"run.output_dir={out}",
        "run.batch_size_train=8",
        cfg=ROOT / "lavis_ext" / "projects" / "fashioniq_tiny.yaml",
    )
    (job,) = list(out.iterdir())
    (metrics,) = [json.loads(line) for line in (job / "evaluate.txt").read_text().splitlines()]
    assert metrics["split"] == "val"
    categories = ("dress", "shirt", "toptee")
    expected = {f"{c}_recall_at_{k}" for c in categories for k in (10, 50)}
    expected |= {"average_recall_at_10", "average_recall_at_50", "agg_metrics"}
    assert expected <= set(metrics)
    assert all(0.0 <= metrics[key] <= 100.0 for key in expected)
    for k in (10, 50):
        mean = sum(metrics[f"{c}_recall_at_{k}"] for c in categories) / 3
        assert metrics[f"average_recall_at_{k}"] == pytest.approx(mean)
    assert metrics["agg_metrics"] == pytest.approx(
        (metrics["average_recall_at_10"] + metrics["average_recall_at_50"]) / 2
    )
