"""``--mixed-precision bf16`` with ``--gradient-checkpointing`` on a tiny UNet: training runs in bf16 (its
loss differs from fp32's by bf16 rounding only), the gates learn through the recomputed blocks, and a
resumed run continues with exactly the losses of the uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch
from trainer_runs import train_fresh

from diffusers_ext.spatial_adapter import SpatialAdapter
from diffusers_ext.testing.tiny_pipelines import save_tiny_pipeline
from vlext.toyworld import write_grounding_jsonl

torch.set_num_threads(1)


def _losses(out) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def test_bf16_with_gradient_checkpointing_trains_and_resumes_exactly(tmp_path):
    jsonl = write_grounding_jsonl(tmp_path / "data", 8, seed=0, image_size=64)
    model = save_tiny_pipeline(tmp_path / "sd", "sd")
    common = ["--mixed-data", str(jsonl), "--pretrained-model", str(model), "--batch-size", "2", "--hidden-dim",
              "32", "--lr", "1e-3", "--max-train-steps", "4"]  # fmt: skip
    bf16 = ["--mixed-precision", "bf16", "--gradient-checkpointing"]
    full = train_fresh([*common, *bf16, "--output-dir", str(tmp_path / "full"), "--checkpointing-steps", "2"])
    assert full["unet_dtype"] == "torch.bfloat16" and full["gradient_checkpointing"] is True
    fp32 = train_fresh([*common, "--output-dir", str(tmp_path / "fp32"), "--max-train-steps", "1"])
    assert full["losses"][0] != fp32["losses"][0]  # bf16 really ran ...
    assert full["losses"][0] == pytest.approx(fp32["losses"][0], rel=0.05)  # ... and only rounding differs
    gates = torch.stack(
        [f.gates() for f in SpatialAdapter.from_pretrained(tmp_path / "full" / "adapter").fusers]
    )
    assert gates.abs().max() > 0  # gradients reached the gates through the checkpointed blocks

    train_fresh(
        [
            *common,
            *bf16,
            "--output-dir",
            str(tmp_path / "resumed"),
            "--resume",
            str(tmp_path / "full/checkpoint-2"),
        ]
    )
    expected, got = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert sorted(got) == [3, 4]
    assert got[3] == pytest.approx(expected[3], rel=1e-6) and got[4] == pytest.approx(expected[4], rel=1e-6)
