"""A run killed with SIGKILL while writing a checkpoint loses nothing; evaluation reads the checkpoint asked for.

One training run is started as a user starts it (``python -m lavis_ext.train`` from another working directory,
relative paths everywhere) and killed with SIGKILL in the middle of a checkpoint write (the test hook point
``atomic-write:half-written`` of ``vlext.test_hooks`` pauses each write half-way). The run is then resumed with
``run.resume_ckpt_path=latest`` and compared with an uninterrupted run of the same config.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lavis_helpers import CFG
from lavis_inprocess import run_main

import lavis_ext  # noqa: F401  (shims before LAVIS is imported in this process)

pytestmark = pytest.mark.slow

OPTIONS = [
    "datasets.cirr.build_info.root=data/cirr_dataset",
    "run.output_dir=runs",
    "run.batch_size_train=8",
    "run.max_epoch=2",
    "run.optimizer_betas=[0.9,0.98]",
    "run.optimizer_eps=1e-7",
]


def arguments(*options):
    """``python -m lavis_ext.train``'s arguments, with paths relative to the user's working directory."""
    return ["--cfg-path", "cirr_tiny.yaml", "--options", *OPTIONS, *options]


def command(*options):
    return [sys.executable, "-W", "ignore", "-m", "lavis_ext.train", *arguments(*options)]


def wait_for(predicate, process, timeout=900):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        assert process.poll() is None, "training exited before the checkpoint write it should be killed in"
        time.sleep(0.05)
    raise TimeoutError("no checkpoint write seen")


def evaluations(job):
    return [json.loads(line) for line in (job / "evaluate.txt").read_text().splitlines()]


def train_losses(job):
    rows = [
        json.loads(line) for line in (job / "log.txt").read_text().split("\n") if line.startswith('{"train_')
    ]
    return [float(row["train_loss"]) for row in rows]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from lavis_ext.train import main
    from vlext.test_hooks import arm
    from vlext.toyworld import write_cirr

    cwd = tmp_path_factory.mktemp("user")
    write_cirr(cwd / "data" / "cirr_dataset", 32, 12, 6, seed=0, image_size=32)
    shutil.copy(CFG, cwd / "cirr_tiny.yaml")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    # 1. killed run: SIGKILL while it writes its first checkpoint of epoch 1
    log = open(cwd / "killed.log", "w")
    process = subprocess.Popen(
        command(),
        cwd=cwd,
        env={**env, **arm("atomic-write:half-written", "sleep:3")},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        last = wait_for(lambda: next(cwd.glob("runs/*/checkpoint_last.pth"), None), process)
        job = last.parent
        # the hook writes half of the bytes, then pauses: kill once they are on disk
        temp = wait_for(
            lambda: next((p for p in job.glob(".checkpoint_*.pth.*.tmp") if p.stat().st_size), None), process
        )
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    killed = {"job": job, "temp": temp, "log": (cwd / "killed.log").read_text()}

    # a decoy: a newer, truncated checkpoint that "latest" must skip, naming it
    decoy = job / "checkpoint_7.pth"
    decoy.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    os.utime(decoy, (time.time() + 5, time.time() + 5))

    # 2. resume from the newest complete checkpoint; 3. the same config uninterrupted. The process boundary
    # (SIGKILL, a user's working directory) was step 1's; these two runs read and write the same files from
    # the same folder in this process (one thread, as the subprocess had), saving two 20 s imports.
    folders, logs = [], []
    for options in (["run.resume_ckpt_path=latest"], []):
        before = set(cwd.glob("runs/*"))
        logs.append(run_main(main, arguments(*options), cwd=cwd)[1])
        (folder,) = set(cwd.glob("runs/*")) - before
        folders.append(folder)
    (resumed, reference), resumed_log = folders, logs[0]
    return {
        "cwd": cwd,
        "killed": killed,
        "decoy": decoy,
        "resumed": resumed,
        "resumed_log": resumed_log,
        "reference": reference,
    }


def test_files_land_under_the_working_directory_and_the_log_names_the_folder(runs):
    import lavis

    job = runs["killed"]["job"]
    assert job.parent == runs["cwd"] / "runs"
    assert f"Output folder: {job}" in runs["killed"]["log"]
    assert not (Path(lavis.__file__).parent / "runs").exists()


def test_sigkill_during_a_write_leaves_the_earlier_checkpoints_complete(runs):
    from lavis_ext.models.checkpoint_io import CheckpointFormatError, read_state_dict

    killed = runs["killed"]
    # the process died with the write half done
    assert 0 < killed["temp"].stat().st_size < (killed["job"] / "checkpoint_last.pth").stat().st_size
    with pytest.raises(CheckpointFormatError):
        read_state_dict(killed["temp"])
    for name in ("checkpoint_best.pth", "checkpoint_last.pth"):
        state_dict, meta = read_state_dict(killed["job"] / name)
        assert meta["epoch"] == 0 and "gated_fusion.alpha" not in state_dict and len(state_dict) > 50
    # epoch 1 was evaluated, then the kill hit the write of its checkpoint
    assert [row["epoch"] for row in evaluations(killed["job"])] == [0, 1]


def test_optimizer_betas_and_eps_come_from_the_run_config(runs):
    checkpoint = torch.load(
        runs["killed"]["job"] / "checkpoint_last.pth", map_location="cpu", weights_only=True
    )
    for group in checkpoint["optimizer"]["param_groups"]:
        assert group["betas"] == [0.9, 0.98] or tuple(group["betas"]) == (0.9, 0.98)
        assert group["eps"] == 1e-7


def test_resume_latest_skips_the_truncated_file_and_continues_from_the_last_complete_one(runs):
    log = runs["resumed_log"]
    assert f"skipping unreadable checkpoint {runs['decoy']}" in log
    assert f"newest readable checkpoint is {runs['killed']['job'] / 'checkpoint_last.pth'}" in log
    assert "(epoch 0; best agg_metrics so far" in log
    assert [row["epoch"] for row in evaluations(runs["resumed"])] == [1]
    assert runs["resumed"] != runs["killed"]["job"]  # a new run never writes into another run's folder


def test_resumed_epoch_equals_the_uninterrupted_one(runs):
    resumed, reference = runs["resumed"], runs["reference"]
    assert train_losses(resumed) == train_losses(reference)[1:]
    assert evaluations(resumed)[0] == [row for row in evaluations(reference) if row["epoch"] == 1][0]
    a = torch.load(resumed / "checkpoint_last.pth", map_location="cpu", weights_only=True)
    b = torch.load(reference / "checkpoint_last.pth", map_location="cpu", weights_only=True)
    assert a["epoch"] == b["epoch"] == 1
    assert a["model"].keys() == b["model"].keys()
    diff = max((a["model"][k].float() - b["model"][k].float()).abs().max().item() for k in a["model"])
    assert diff == 0.0


def test_best_agg_metric_survives_the_resume(runs):
    resumed = torch.load(runs["resumed"] / "checkpoint_last.pth", map_location="cpu", weights_only=True)
    reference = torch.load(runs["reference"] / "checkpoint_last.pth", map_location="cpu", weights_only=True)
    assert resumed["best_agg_metric"] == reference["best_agg_metric"] > 0
    assert resumed["best_epoch"] == reference["best_epoch"]
    # the resumed run writes a best checkpoint only if its epoch beats the best from before the crash
    first, second = evaluations(runs["killed"]["job"])[0], evaluations(runs["resumed"])[0]
    assert (runs["resumed"] / "checkpoint_best.pth").exists() == (
        second["agg_metrics"] > first["agg_metrics"]
    )
    first = evaluations(runs["killed"]["job"])[0]["agg_metrics"]
    assert reference["best_agg_metric"] == max(first, evaluations(runs["reference"])[1]["agg_metrics"])


def test_evaluation_from_a_checkpoint_reports_the_recalls_training_reported(runs, monkeypatch, caplog):
    import logging

    from lavis_ext.train import main

    torch.set_num_threads(1)
    caplog.set_level(logging.INFO)
    cwd, reference = runs["cwd"], runs["reference"]
    monkeypatch.chdir(cwd)
    checkpoint = (reference / "checkpoint_last.pth").relative_to(cwd)
    trained = [row for row in evaluations(reference) if row["epoch"] == 1][0]
    jobs = []
    for option in (f"run.resume_ckpt_path={checkpoint}", f"model.finetuned={checkpoint}"):
        caplog.clear()
        # the same job id twice: the second run must not write into the first one's folder
        options = [*OPTIONS, "run.evaluate=True", "run.job_id=evaluation", option]
        job = Path(main(["--cfg-path", "cirr_tiny.yaml", "--options", *options]).output_dir)
        jobs.append(job.name)
        (evaluated,) = evaluations(job)
        assert {k: v for k, v in evaluated.items() if k != "epoch"} == {
            k: v for k, v in trained.items() if k != "epoch"
        }
        assert str(cwd / checkpoint) in caplog.text  # the log says which weights were evaluated
        assert not list(job.glob("checkpoint_*.pth"))  # evaluation never saves weights
    assert jobs == ["evaluation", "evaluation_1"]
