"""The trainer's optimizer flags (issue 28 levers, ``training/optimizers.py``): ``--use-8bit-adam`` /
``--optimizer adamw8bit`` and ``--bf16-adapter`` train through the CLI in bf16 on CPU, the placement puts the
adapter in bf16 and keeps the EMA in fp32, and a resume with another optimizer is refused."""

from __future__ import annotations

import json
import math

import pytest
import torch
from trainer_runs import train_fresh

from diffusers_ext.testing.tiny_pipelines import save_tiny_pipeline
from diffusers_ext.training.placement import plan_placement
from vlext.toyworld import write_grounding_jsonl

torch.set_num_threads(1)
pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("optim")
    return {"jsonl": write_grounding_jsonl(root / "data", 4, seed=0, image_size=64),
            "sd": save_tiny_pipeline(root / "sd", "sd"), "root": root}  # fmt: skip


def _argv(toy, out, *extra):
    return ["--mixed-data", str(toy["jsonl"]), "--pretrained-model", str(toy["sd"]), "--output-dir", str(out),
            "--batch-size", "2", "--hidden-dim", "16", "--max-objs", "4", "--lr", "1e-3", *extra]  # fmt: skip


def test_8bit_adam_with_a_bf16_adapter_trains_and_keeps_the_ema_in_fp32(toy, tmp_path):
    out = tmp_path / "run"
    result = train_fresh(_argv(toy, out, "--mixed-precision", "bf16", "--use-8bit-adam", "--bf16-adapter", "--ema",
                          "--max-train-steps", "2", "--checkpointing-steps", "1"))  # fmt: skip
    assert result["steps"] == 2 and all(math.isfinite(x) for x in result["losses"])
    table = result["placement"].table()
    assert table["adapter"][1] == torch.bfloat16 and table["ema"][1] == torch.float32
    stats = result["gate_stats"]
    assert max(abs(stats["min"]), abs(stats["max"])) > 0  # stochastic rounding let the gates move
    flags = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["flags"]
    assert (flags["optimizer"], flags["bf16_adapter"]) == ("adamw8bit", True)
    with pytest.raises(SystemExit, match=r"--optimizer 'adamw8bit' in the checkpoint, 'adamw' now"):
        train_fresh(_argv(toy, tmp_path / "resumed", "--mixed-precision", "bf16", "--bf16-adapter", "--ema",
                     "--max-train-steps", "2", "--resume", str(out / "checkpoint-1")))  # fmt: skip


def test_a_bf16_adapter_needs_bf16_mixed_precision(toy, tmp_path):
    with pytest.raises(SystemExit, match=r"--bf16-adapter needs --mixed-precision bf16 \(got no\)"):
        train_fresh(_argv(toy, tmp_path / "out", "--bf16-adapter"))
    with pytest.raises(ValueError, match="bf16_adapter needs mixed_precision 'bf16'"):
        plan_placement("fp16", "cpu", cache_dir=False, cache_latents=False, bf16_adapter=True)
