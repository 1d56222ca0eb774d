"""``--gradient-accumulation-steps N`` (issue 28 lever): N micro-batches of B give the update of one batch of
N x B (the same samples, the same per-sample random draws, the loss averaged over all N x B), and the LR
schedule, ``--max-train-steps`` and the metrics count optimizer steps."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from trainer_runs import train_fresh

from diffusers_ext.testing.tiny_pipelines import save_tiny_pipeline
from vlext.toyworld import write_grounding_jsonl

torch.set_num_threads(1)


def test_n_micro_batches_of_b_give_the_update_of_one_batch_of_n_times_b(tmp_path):
    jsonl = write_grounding_jsonl(tmp_path / "data", 8, seed=0, image_size=64)
    model = save_tiny_pipeline(tmp_path / "sd", "sd")
    common = ["--mixed-data", str(jsonl), "--pretrained-model", str(model), "--hidden-dim", "16", "--max-objs", "4",
              "--lr", "1e-3", "--lr-scheduler", "linear", "--lr-warmup-steps", "1", "--phrase-dropout", "0.3",
              "--max-train-steps", "2", "--max-grad-norm", "0.5"]  # fmt: skip
    whole = train_fresh([*common, "--output-dir", str(tmp_path / "whole"), "--batch-size", "4"])
    accumulated = train_fresh([*common, "--output-dir", str(tmp_path / "acc"), "--batch-size", "2",
                          "--gradient-accumulation-steps", "2"])  # fmt: skip
    assert whole["steps"] == accumulated["steps"] == 2
    assert accumulated["losses"] == pytest.approx(whole["losses"], rel=1e-5)
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("whole", "acc")}  # fmt: skip
    assert [r["lr"] for r in rows["acc"]] == pytest.approx(
        [r["lr"] for r in rows["whole"]]
    )  # optimizer steps
    assert [r["lr"] for r in rows["acc"]] == pytest.approx(
        [1e-3, 0.0]
    )  # warmup 1 of 2 updates, then linear decay
    a = load_file(tmp_path / "whole" / "adapter" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "acc" / "adapter" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6  # the same update ...
    stats = whole["gate_stats"]
    assert max(abs(stats["min"]), abs(stats["max"])) > 1e-4  # ... and a real one (the gates start at 0)


def test_accumulation_needs_whole_global_batches_and_is_fixed_on_resume(tmp_path):
    from diffusers_ext.training.resume_check import FIXED

    assert "gradient_accumulation_steps" in FIXED
    jsonl = write_grounding_jsonl(tmp_path / "data", 4, seed=0, image_size=64)
    argv = ["--mixed-data", str(jsonl), "--pretrained-model", str(save_tiny_pipeline(tmp_path / "sd", "sd")),
            "--output-dir", str(tmp_path / "out"), "--batch-size", "2", "--gradient-accumulation-steps", "3"]  # fmt: skip
    with pytest.raises(
        SystemExit,
        match=r"4 rows after cleaning is fewer than one global batch \(2 x 1 processes x 3 accumulated micro-batches\)",
    ):
        train_fresh(argv)  # fmt: skip
