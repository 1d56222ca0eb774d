"""A training run killed with SIGKILL in the middle of writing a checkpoint loses nothing: the earlier
checkpoints are intact, ``--resume latest`` skips what is incomplete (naming it) and continues from the
last complete checkpoint with the losses of a run that was never interrupted.

The kill is injected at the trainer's test hook point (``vlext.test_hooks``,
``VLEXT_TEST_HOOKS=diffusers-train:checkpoint-first-file@checkpoint-<step>=kill``): the process SIGKILLs
itself after writing the first file of ``checkpoint-<step>``, deterministically, where a preempted job
would die.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from diffusers_ext.testing.tiny_pipelines import save_tiny_pipeline
from diffusers_ext.training.run_folder import MARKER, checkpoint_problem
from diffusers_ext.training.train_spatial_adapter import CHECKPOINT_HOOK, train
from vlext.test_hooks import arm
from vlext.toyworld import write_grounding_jsonl

torch.set_num_threads(1)


def _cli(cwd, args, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env}
    cmd = [sys.executable, "-m", "diffusers_ext.training.train_spatial_adapter", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _losses(out) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows]


@pytest.mark.slow
def test_sigkill_while_writing_a_checkpoint_then_resume_latest_continues_exactly(
    tmp_path, monkeypatch, capsys
):
    write_grounding_jsonl(tmp_path / "data", 4, seed=0, image_size=64)
    save_tiny_pipeline(tmp_path / "sd", "sd")
    # relative paths from the run's working directory, as a user types them
    common = ["--mixed-data", "data/grounding.en.jsonl", "--pretrained-model", "sd", "--batch-size", "1",
              "--hidden-dim", "32", "--lr", "1e-3", "--max-train-steps", "4", "--checkpointing-steps", "1"]  # fmt: skip
    killed = _cli(tmp_path, [*common, "--output-dir", "run"], **arm(CHECKPOINT_HOOK, "kill", "checkpoint-3"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == [
        ".checkpoint-3.tmp",  # what the kill left: trainable weights written, nothing else, no marker
        "checkpoint-1",
        "checkpoint-2",
    ]
    assert [p.name for p in (run / ".checkpoint-3.tmp").iterdir()] == ["trainable.safetensors"]
    assert (
        checkpoint_problem(run / "checkpoint-1") is None and checkpoint_problem(run / "checkpoint-2") is None
    )

    reference = tmp_path / "uninterrupted"
    train(["--mixed-data", str(tmp_path / "data/grounding.en.jsonl"), "--pretrained-model", str(tmp_path / "sd"),
           *common[4:], "--output-dir", str(reference)])  # fmt: skip
    for name in ("trainable.safetensors", "optimizer.bin"):  # the surviving checkpoint is the real one
        assert (run / "checkpoint-2" / name).read_bytes() == (reference / "checkpoint-2" / name).read_bytes()

    # what else a user's folder may hold: a folder that is not checkpoint-<int>, a copy without a marker,
    # and one whose weights were truncated after it was sealed
    (run / "checkpoint-final").mkdir()
    shutil.copytree(run / ".checkpoint-3.tmp", run / "checkpoint-5")
    shutil.copytree(run / "checkpoint-2", run / "checkpoint-4")
    marker = json.loads((run / "checkpoint-4" / MARKER).read_text())
    (run / "checkpoint-4" / MARKER).write_text(json.dumps({**marker, "global_step": 4}))
    weights = run / "checkpoint-4" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])

    # the resume runs in this process (the kill above is what needs a process of its own), from the run's
    # working directory with the same relative paths
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert train([*common, "--output-dir", "run", "--resume", "latest"])["steps"] == 4
    resumed = capsys.readouterr()
    err = resumed.err
    assert f"skipping incomplete checkpoint run/checkpoint-5: no {MARKER}" in err
    assert "skipping incomplete checkpoint run/checkpoint-4: trainable.safetensors has 100 bytes" in err
    assert "checkpoint-final" not in err
    assert "resumed from run/checkpoint-2 at step 2" in resumed.out
    assert "removed 1 rows after step 2" in err  # step 3 was logged before the kill; it is trained again
    got, expected = _losses(run), _losses(reference)
    assert [s for s, _ in got] == [1, 2, 3, 4]  # no duplicate steps
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in expected], rel=1e-6)
    assert checkpoint_problem(run / "checkpoint-4") is None  # the damaged copy was replaced by a real save
    assert not (run / ".checkpoint-3.tmp").exists()
