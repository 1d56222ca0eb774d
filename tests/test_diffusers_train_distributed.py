"""The training CLI under ``accelerate launch`` with 2 CPU processes (gloo), and exact resume there.

``accelerate launch --cpu --num_processes 2`` starts a single process unless MPI is installed (accelerate's
simple launcher hands multi-process CPU runs to mpirun). The torchrun-based launcher is used instead:
``--multi_gpu --num_processes 2`` with ``ACCELERATE_USE_CPU=true``, which accelerate turns into a
MULTI_CPU (gloo) process group.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from diffusers_ext.testing.tiny_pipelines import save_tiny_pipeline
from vlext.toyworld import write_grounding_jsonl


def _launch(args: list[str], port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
        "-m", "diffusers_ext.training.train_spatial_adapter", *args,
    ]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _losses(out) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def test_two_process_training_and_resume_continue_exactly(tmp_path):
    jsonl = write_grounding_jsonl(tmp_path / "data", 4, seed=0, image_size=64)
    model = save_tiny_pipeline(tmp_path / "sd", "sd")
    common = ["--mixed-data", str(jsonl), "--pretrained-model", str(model), "--batch-size", "1", "--epochs", "2",
              "--hidden-dim", "32", "--lr", "1e-3"]  # fmt: skip
    full = tmp_path / "full"
    _launch([*common, "--output-dir", str(full), "--checkpointing-steps", "2"], port=29531)
    resumed = tmp_path / "resumed"
    # the resumed run also reads through 1 loader worker per process and a conditioning cache that the two
    # processes fill in shares (prompt, phrase and latent entries): the same losses still
    fast = ["--dataloader-num-workers", "1", "--cache-dir", str(tmp_path / "cache"), "--cache-latents"]
    _launch(
        [*common, "--output-dir", str(resumed), "--resume", str(full / "checkpoint-2"), *fast], port=29532
    )
    expected, got = _losses(full), _losses(resumed)
    # 4 rows / (1 per process x 2 processes) x 2 epochs = 4 steps: two ranks ran; the resume starts epoch 2
    assert sorted(expected) == [1, 2, 3, 4]
    assert (full / "checkpoint-2" / "random_states_1.pkl").is_file()
    assert sorted(got) == [3, 4]
    assert got[3] == pytest.approx(expected[3], rel=1e-6) and got[4] == pytest.approx(expected[4], rel=1e-6)
