"""The trainer's step in bf16 on CPU, through the real CLI entry, for each cache / cached-latents / LoRA / EMA
combination (issue 26): the suite used to run fp32 only, so ``--cache-dir`` without ``--cache-latents``
(the VAE never placed: ``Input type (c10::BFloat16) and bias type (float) should be the same``) passed every
test and failed at step 1 of every real run."""

from __future__ import annotations

import math

import pytest
import torch
from trainer_runs import train_fresh

from diffusers_ext.testing.tiny_pipelines import save_tiny_pipeline
from vlext.toyworld import write_grounding_jsonl

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    return {"jsonl": write_grounding_jsonl(root / "data", 2, seed=0, image_size=64),
            "sd": save_tiny_pipeline(root / "sd", "sd"), "root": root}  # fmt: skip


COMBINATIONS = [
    (cache, lora, ema)
    for cache in ("none", "text", "text+latents")
    for lora in (False, True)
    for ema in (False, True)
]


def _param(cache, lora, ema):
    # the configuration that crashed (the VAE left behind) runs in the quick loop; the rest in CI's full run
    quick = (cache, lora, ema) == ("text", False, False)
    return pytest.param(cache, lora, ema, id=f"cache={cache}-lora={lora}-ema={ema}",
                        marks=() if quick else pytest.mark.slow)  # fmt: skip


@pytest.mark.parametrize("cache, lora, ema", [_param(*c) for c in COMBINATIONS])
def test_one_bf16_step_trains_and_every_component_is_where_the_placement_says(
    toy, tmp_path, cache, lora, ema
):
    out = tmp_path / "out"
    argv = ["--mixed-data", str(toy["jsonl"]), "--pretrained-model", str(toy["sd"]), "--output-dir", str(out),
            "--batch-size", "2", "--hidden-dim", "16", "--max-objs", "4", "--max-train-steps", "1",
            "--mixed-precision", "bf16", "--caption-dropout", "0"]  # fmt: skip
    if cache != "none":
        argv += ["--cache-dir", str(tmp_path / "cache")]
    if cache == "text+latents":
        argv += ["--cache-latents"]
    if lora:
        argv += ["--lora-rank", "2"]
    if ema:
        argv += ["--ema"]
    result = train_fresh(argv)
    assert result["steps"] == 1 and math.isfinite(result["losses"][0]) and 0 < result["losses"][0] < 10
    assert result["unet_dtype"] == "torch.bfloat16"
    table = result["placement"].table()
    assert ("vae" in table) == (cache != "text+latents") and ("text_encoder" in table) == (cache == "none")
    expected_on_device = {"none": 3, "text": 2, "text+latents": 1}[cache]  # UNet (+ VAE) (+ text encoder)
    assert len(result["on_device"]) == expected_on_device
    assert any("lora_" in n for n in result["trainable"]) == lora
    assert (out / "adapter_ema").is_dir() == ema and (out / "unet_lora.safetensors").is_file() == lora
