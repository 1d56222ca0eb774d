"""runner_safe's file handling: atomic checkpoint writes, the latest readable checkpoint, unique run folders."""

import logging
import os
import time
from pathlib import Path

import pytest
import torch

from lavis_ext.runner import atomic_save, claim_run_folder, find_latest_checkpoint


class _FailsToPickle:
    def __reduce__(self):
        raise RuntimeError("disk full (simulated)")


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_temporary_file(tmp_path):
    path = tmp_path / "checkpoint_best.pth"
    atomic_save({"model": {"w": torch.ones(3)}, "epoch": 0}, path)
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save({"model": {"w": torch.zeros(3)}, "epoch": 1, "x": _FailsToPickle()}, path)
    kept = torch.load(path, weights_only=True)
    assert kept["epoch"] == 0 and kept["model"]["w"].tolist() == [1.0, 1.0, 1.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_best.pth"]


def lavis_checkpoint(path, epoch, mtime):
    atomic_save({"model": {"w": torch.full((2,), float(epoch))}, "optimizer": {}, "epoch": epoch}, path)
    os.utime(path, (mtime, mtime))


def test_latest_is_the_newest_readable_checkpoint_of_any_run_folder(tmp_path, caplog):
    now = time.time()
    (tmp_path / "run_a").mkdir()
    (tmp_path / "run_b").mkdir()
    lavis_checkpoint(tmp_path / "run_a" / "checkpoint_last.pth", 3, now - 30)
    lavis_checkpoint(tmp_path / "run_b" / "checkpoint_last.pth", 5, now - 20)
    broken = tmp_path / "run_b" / "checkpoint_best.pth"
    data = (tmp_path / "run_b" / "checkpoint_last.pth").read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    os.utime(broken, (now, now))
    (tmp_path / "run_b" / "notes.txt").write_text("not a checkpoint")
    with caplog.at_level(logging.WARNING):
        path, state_dict, meta = find_latest_checkpoint(tmp_path)
    assert path == str(tmp_path / "run_b" / "checkpoint_last.pth")
    assert meta["epoch"] == 5 and state_dict["w"].tolist() == [5.0, 5.0]
    assert f"skipping unreadable checkpoint {broken}" in caplog.text


def test_latest_without_any_readable_checkpoint_is_an_error(tmp_path):
    (tmp_path / "checkpoint_1.pth").write_bytes(b"\x00" * 10)
    with pytest.raises(FileNotFoundError, match="no readable checkpoint"):
        find_latest_checkpoint(tmp_path)


def test_runs_with_the_same_job_id_get_distinct_folders(tmp_path):
    names = [claim_run_folder(tmp_path / "out", "20261201120000") for _ in range(3)]
    assert names == ["20261201120000", "20261201120000_1", "20261201120000_2"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(names)


def test_resuming_from_an_sprc_checkpoint_loads_its_weights_only(tmp_path, monkeypatch, caplog):
    """SPRC's {"epoch", "Blip2QformerCirAlignPrompt"} files hold no optimizer: weights load, epoch 0 starts."""
    from lavis.models import load_model

    from lavis_ext.train import main
    from vlext.toyworld import write_cirr

    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    write_cirr(tmp_path / "cirr_dataset", 16, 6, 3, seed=0, image_size=32)
    model = load_model("blip2_cir_align_prompt", "tiny")
    with torch.no_grad():
        model.temp.fill_(0.5)  # the model initialises it to 0.07
    torch.save({"epoch": 7, "Blip2QformerCirAlignPrompt": model.state_dict()}, tmp_path / "sprc.pt")
    caplog.set_level(logging.INFO)
    cfg = Path(__file__).resolve().parent.parent / "lavis_ext" / "projects" / "cirr_tiny.yaml"
    options = ["datasets.cirr.build_info.root=cirr_dataset", "run.output_dir=out", "run.batch_size_train=8"]
    options += ["run.resume_ckpt_path=sprc.pt", "run.init_lr=0", "run.min_lr=0", "run.warmup_lr=0"]
    runner = main(["--cfg-path", str(cfg), "--options", *options])
    assert "weights only (sprc format has no optimizer state); training starts at epoch 0" in caplog.text
    assert runner.start_epoch == 0
    assert runner.unwrap_dist_model(runner.model).temp.item() == 0.5  # lr 0: the loaded weights, unchanged
