"""runner_safe's file handling: atomic checkpoint writes, the latest readable checkpoint, unique run folders."""

import logging
import os
import time

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
