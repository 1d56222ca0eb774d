"""The trainer as named steps: the placement rule, and ``build_trainables`` + ``training_step`` called on
their own (no accelerator, no files) with a hand-built batch, as the meta-device rehearsal calls them."""

from __future__ import annotations

import pytest
import torch

from diffusers_ext.generation import pipeline_kind
from diffusers_ext.testing.tiny_pipelines import tiny_sd_pipeline
from diffusers_ext.training.placement import (
    check_placement,
    encoders_on_device,
    plan_placement,
)
from diffusers_ext.training.train_spatial_adapter import (
    RunState,
    build_trainables,
    parse_args,
    training_step,
)

torch.set_num_threads(1)


def _args(*extra):
    return parse_args(["--mixed-data", "rows.jsonl", "--pretrained-model", "model", "--output-dir", "out",
                       "--hidden-dim", "32", "--lr", "1e-3", "--box-dropout", "0", "--caption-dropout", "0",
                       *extra])  # fmt: skip


def _batch():
    return {
        "caption": ["a red circle", "a blue square"],
        "boxes": [[[0.1, 0.1, 0.5, 0.5]], [[0.2, 0.3, 0.9, 0.8], [0.0, 0.0, 0.3, 0.3]]],
        "phrases": [["a red circle"], ["a blue square", "a green star"]],
        "pixels": torch.randint(
            0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
        ),
        "original_size": [(64, 64), (64, 64)],
        "crop_top_left": [(0, 0), (0, 0)],
    }


@pytest.mark.parametrize(
    "precision, cache_dir, cache_latents, expected",
    [
        ("no", False, False, {"unet": "float32", "vae": "float32", "text_encoder": "float32"}),
        # diffusers' SDXL scripts keep a force_upcast VAE in fp32 under fp16 (fp16 latents overflow to NaN)
        ("fp16", False, False, {"unet": "float16", "vae": "float32", "text_encoder": "float16"}),
        ("bf16", False, False, {"unet": "bfloat16", "vae": "bfloat16", "text_encoder": "bfloat16"}),
        # --cache-dir alone: the text encoders serve only the cache pass, the VAE still encodes every step
        ("bf16", True, False, {"unet": "bfloat16", "vae": "bfloat16"}),
        ("fp16", True, True, {"unet": "float16"}),
    ],
)
def test_the_placement_table_gives_every_component_its_device_and_dtype(
    precision, cache_dir, cache_latents, expected
):
    placement = plan_placement(precision, "cpu", cache_dir=cache_dir, cache_latents=cache_latents)
    table = placement.table(components=("unet", "vae", "text_encoder", "adapter", "lora", "ema"))
    assert {
        k: str(v[1]).removeprefix("torch.") for k, v in table.items() if k not in ("adapter", "lora", "ema")
    } == expected
    assert all(table[k] == (torch.device("cpu"), torch.float32) for k in ("adapter", "lora", "ema"))


def test_a_vae_without_force_upcast_encodes_in_fp16_under_fp16():
    placement = plan_placement("fp16", "cpu", cache_dir=False, cache_latents=False, vae_force_upcast=False)
    assert placement.vae_dtype == torch.float16


def test_build_trainables_and_training_step_run_alone_in_bf16_with_lora_and_ema():
    pipe = tiny_sd_pipeline()
    args = _args("--mixed-precision", "bf16", "--lora-rank", "2", "--ema")
    placement = plan_placement("bf16", "cpu", cache_dir=False, cache_latents=False)
    trainables = build_trainables(args, pipe, placement)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in trainables.params)  # fp32 master weights
    assert any("lora_" in n for n in trainables.names)
    state = RunState(args=args, pipe=pipe, kind=pipeline_kind(pipe), placement=placement, trainables=trainables,
                     resolution=64)  # fmt: skip
    before = [p.detach().clone() for p in trainables.params]
    losses = [training_step(state, _batch(), step).item() for step in range(2)]
    assert all(0 < loss < 10 for loss in losses)
    moved = sum(not torch.equal(a, p.detach()) for a, p in zip(before, trainables.params, strict=True))
    assert moved > len(before) // 2  # the optimizer stepped
    assert trainables.ema.optimization_step == 2
    check_placement(pipe, placement, adapter=trainables.adapter, ema=trainables.ema)  # still where it belongs


def test_lora_and_adapter_start_equal_for_one_seed():
    """Issue 26 finding 7: LoRA was initialised before torch.manual_seed(--seed), so two runs differed."""
    starts = []
    for _ in range(2):
        torch.manual_seed(1234 + len(starts))  # whatever the process's random state was before
        pipe = tiny_sd_pipeline()
        placement = plan_placement("no", "cpu", cache_dir=False, cache_latents=False)
        trainables = build_trainables(_args("--lora-rank", "2", "--init-mode", "zero_out"), pipe, placement)
        starts.append([p.detach().clone() for p in trainables.params])
    assert all(torch.equal(a, b) for a, b in zip(*starts, strict=True))


def test_a_component_away_from_its_place_is_named():
    pipe = tiny_sd_pipeline()
    placement = plan_placement("no", "cpu", cache_dir=False, cache_latents=False)
    trainables = build_trainables(_args(), pipe, placement)
    pipe.vae.to(torch.float64)
    with pytest.raises(RuntimeError, match=r"vae: expected cpu torch.float32, found dtype torch.float64"):
        check_placement(pipe, placement, adapter=trainables.adapter)


def test_the_cache_pass_holds_only_the_encoder_it_uses_on_the_device(monkeypatch):
    pipe = tiny_sd_pipeline()
    moves = []
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(pipe, name)
        real = module.to
        monkeypatch.setattr(
            module, "to", lambda *a, _n=name, _to=real: moves.append((_n, *map(str, a))) or _to(*a)
        )
    placement = plan_placement("bf16", "cpu", cache_dir=True, cache_latents=True)
    with encoders_on_device(pipe, placement, ["text_encoder"]):
        assert moves == [("text_encoder", "cpu", "torch.bfloat16")]
    assert moves == [("text_encoder", "cpu", "torch.bfloat16"), ("text_encoder", "cpu")]  # back where it was


def test_under_fp16_the_vae_encodes_in_fp32(monkeypatch):
    """Issue 26 finding 2: the VAE encoded in the weight dtype; an SDXL/Kolors VAE (``force_upcast``) overflows
    to NaN latents in fp16. The placement keeps it in fp32 and the step feeds it fp32 pixels."""
    from diffusers_ext.training.train_spatial_adapter import batch_latents, sample_generators

    pipe = tiny_sd_pipeline()
    args = _args("--mixed-precision", "fp16")
    placement = plan_placement("fp16", "cpu", cache_dir=False, cache_latents=False)
    trainables = build_trainables(args, pipe, placement)
    assert pipe.unet.dtype == torch.float16 and pipe.vae.dtype == torch.float32
    seen = []
    real = pipe.vae.encode
    monkeypatch.setattr(pipe.vae, "encode", lambda x, *a, **k: seen.append(x.dtype) or real(x, *a, **k))
    state = RunState(
        args=args, pipe=pipe, kind="sd", placement=placement, trainables=trainables, resolution=64
    )
    latents = batch_latents(state, _batch(), sample_generators(0, 0, range(2)))
    assert seen == [torch.float32] and latents.dtype == torch.float32 and torch.isfinite(latents).all()
