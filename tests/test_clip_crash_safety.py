"""clip_ext.train loses no work: atomic checkpoints, --resume latest finds the last complete one after a
SIGKILL mid-save, and unreadable training images are named (or skipped and counted), never used."""

import hashlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_clip_open_clip_compat import run_ours, tiny_argv

from clip_ext.checkpoint import atomic_save, latest_complete_checkpoint
from vlext.images import BadImageError
from vlext.test_hooks import arm
from vlext.toyworld import write_clip_csv


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("boom while pickling")


def test_a_failed_save_leaves_the_previous_file_whole_and_no_temporary(tmp_path):
    path = tmp_path / "epoch_1.pt"
    atomic_save({"state_dict": {"w": torch.ones(3)}}, path)
    before = sha(path)
    with pytest.raises(RuntimeError, match="boom while pickling"):
        atomic_save({"state_dict": {"w": torch.zeros(3)}, "bad": Unpicklable()}, path)
    assert sha(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_1.pt"]


def test_latest_complete_checkpoint_skips_truncated_files_and_ignores_other_names(tmp_path, caplog):
    for epoch in (1, 2, 10):
        atomic_save(
            {"epoch": epoch, "state_dict": {"w": torch.full((256,), float(epoch))}},
            tmp_path / f"epoch_{epoch}.pt",
        )
    whole = (tmp_path / "epoch_10.pt").read_bytes()
    (tmp_path / "epoch_10.pt").write_bytes(
        whole[: len(whole) // 2]
    )  # what an in-place write killed midway leaves
    (tmp_path / "tmp.pt").write_bytes(whole)  # open_clip's own search would pick this one (sorted by name)
    (tmp_path / "epoch_latest.pt").write_bytes(whole)
    (tmp_path / "epoch_final.pt").write_bytes(b"not a checkpoint")
    (tmp_path / ".epoch_11.pt.4242.tmp").write_bytes(whole)  # an interrupted atomic_save
    with caplog.at_level(logging.WARNING):
        found = latest_complete_checkpoint(tmp_path)
    assert found == str(tmp_path / "epoch_2.pt")  # numeric order: 10 > 2, but 10 is truncated
    assert f"skipping {tmp_path / 'epoch_10.pt'}, it is not a complete checkpoint" in caplog.text
    assert (
        f"{tmp_path / '.epoch_11.pt.4242.tmp'} was left by an interrupted save; it is not used" in caplog.text
    )
    assert latest_complete_checkpoint(tmp_path / "missing") is None


LOSS = re.compile(r"Train Epoch: 1 \[\s*(\d+)/\d+.* Loss: ([-\d.eE+naif]+) \(")


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_then_resume_latest_continues_from_the_last_complete_one(
    tmp_path, monkeypatch
):
    write_clip_csv(tmp_path / "data", 8, seed=0, image_size=32, split="train")
    args = tiny_argv(Path("data"), "logs", "run", "--memory-bank-size", "8", "--save-frequency", "1",
                     "--log-every-n-steps", "1", epochs=2)  # relative paths, run from the data's folder  # fmt: skip
    checkpoints = tmp_path / "logs/run/checkpoints"
    # epoch 2's save stops between temp write and rename (vlext.test_hooks)
    env = {**os.environ, **arm("atomic-write:before-rename", "sleep:600", "epoch_2.pt")}
    # the resume below runs in this process: the same intra-op thread count gives bit-identical losses
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    proc = subprocess.Popen([sys.executable, "-m", "clip_ext.train", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 900
        while not list(checkpoints.glob(".epoch_2.pt.*.tmp")):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "epoch 2's checkpoint write never started"
            time.sleep(0.2)
        first = sha(checkpoints / "epoch_1.pt")
        proc.send_signal(signal.SIGKILL)  # kill -9 while epoch_2.pt is being written
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (checkpoints / "epoch_2.pt").exists()  # never a partial file under the final name
    # what open_clip's own in-place torch.save leaves when killed: a truncated epoch_2.pt
    partial = next(checkpoints.glob(".epoch_2.pt.*.tmp")).read_bytes()
    (checkpoints / "epoch_2.pt").write_bytes(partial[: len(partial) // 2])

    # the resume needs no process boundary: clip_ext.train.main in this process, from the same folder
    monkeypatch.chdir(tmp_path)
    run_ours([*args, "--resume", "latest"])
    log = (tmp_path / "logs/run/out.log").read_text()
    assert (
        f"skipping {os.path.join('logs/run/checkpoints', 'epoch_2.pt')}, it is not a complete checkpoint"
        in log
    )
    assert "Found latest resume checkpoint at logs/run/checkpoints/epoch_1.pt" in log
    assert sha(checkpoints / "epoch_1.pt") == first  # the earlier checkpoint is intact
    final = torch.load(checkpoints / "epoch_2.pt", map_location="cpu", weights_only=True)
    assert final["epoch"] == 2 and int(final["clip_ext"]["state_dict"]["memory_bank.step"]) == 4
    # epoch 2 (index 1) ran in the killed process and again after the resume: the same batches (the RNG state
    # travels with the checkpoint) and the same weights give the same losses
    lines = LOSS.findall(log)
    killed, again = lines[: len(lines) // 2], lines[len(lines) // 2 :]
    assert len(killed) == len(again) == 2 and killed == again, lines


def _truncate_png(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_image_fails_naming_the_file(tmp_path):
    write_clip_csv(tmp_path / "data", 8, seed=0, image_size=32, split="train")
    bad = tmp_path / "data/images/train/000003.png"
    _truncate_png(bad)
    with pytest.raises(
        BadImageError, match=rf"{re.escape(str(bad))}: not a readable image .*--skip-bad-images"
    ):
        run_ours(tiny_argv(tmp_path / "data", tmp_path / "logs", "bad"))


def test_a_file_that_is_no_image_fails_naming_the_file_and_the_flag(tmp_path):
    write_clip_csv(tmp_path / "data", 8, seed=0, image_size=32, split="train")
    bad = tmp_path / "data/images/train/000005.png"
    bad.write_text("this is not a PNG")  # PIL cannot even identify it: open_clip's Image.open fails
    with pytest.raises(
        BadImageError,
        match=rf"{re.escape(str(bad))}: not a readable image \(UnidentifiedImageError.*--skip-bad-images",
    ):
        run_ours(tiny_argv(tmp_path / "data", tmp_path / "logs", "bad"))


def test_skip_bad_images_leaves_them_out_counted_and_logged(tmp_path):
    write_clip_csv(tmp_path / "data", 8, seed=0, image_size=32, split="train")
    truncated, not_image = (
        tmp_path / "data/images/train/000003.png",
        tmp_path / "data/images/train/000005.png",
    )
    _truncate_png(truncated)
    not_image.write_text("this is not a PNG")
    model = run_ours(tiny_argv(tmp_path / "data", tmp_path / "logs", "skip", "--skip-bad-images"))
    assert model is not None
    log = (tmp_path / "logs/skip/out.log").read_text()
    assert f"--skip-bad-images: skipping {truncated} (CSV row 4)" in log
    assert f"--skip-bad-images: skipping {not_image} (CSV row 6)" in log
    assert "--skip-bad-images: 2 of 8 training images cannot be read and are left out" in log
    shutil.rmtree(tmp_path / "logs")
