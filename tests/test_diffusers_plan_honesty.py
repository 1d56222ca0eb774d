"""The rehearsal's step peak agrees with the peak measured on CPU (benchmarks/peak_memory.py) within 15 %:
the same trainer step (bf16 autocast, cached conditioning, the trainer's placement) runs once for real on
CPU and once on the meta device with CPU autocast's op lists, at the tiny size and at a reduced-depth UNet
of SD1.5's real widths."""

from __future__ import annotations

import pytest
import torch

from benchmarks.peak_memory import peak_bytes
from diffusers_ext.training import plan


def _real_width_sd_pipeline():
    """SD1.5's widths (320/640 channels, 768-d text, 8 heads) at reduced depth: two levels, one layer each,
    and a one-layer text encoder; the VAE is tiny (its latents are cached)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffusers_ext.testing.tiny_pipelines import _vae, tiny_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32, block_out_channels=(320, 640), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768, attention_head_dim=8,
    )  # fmt: skip
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=512, num_hidden_layers=1,
                                        num_attention_heads=12, vocab_size=600, max_position_embeddings=77))  # fmt: skip
    return StableDiffusionPipeline(
        vae=_vae(), text_encoder=text, tokenizer=tiny_clip_tokenizer(77), unet=unet,
        scheduler=DDPMScheduler(**plan.SD_SCHEDULE), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip


def _measured_step_rise(pipe, opts) -> int:
    """The trainer's step on CPU in bf16 autocast; the rise of memory in use at its peak (second call)."""
    from diffusers_ext.generation import phrase_dim, pipeline_kind
    from diffusers_ext.training import train_spatial_adapter as trainer
    from diffusers_ext.training.conditioning_cache import _encode_prompts
    from diffusers_ext.training.placement import plan_placement

    targs = trainer.parse_args(plan.trainer_argv(opts))
    kind = pipeline_kind(pipe)
    placement = plan_placement(targs.mixed_precision, "cpu", cache_dir=True, cache_latents=True)
    resolution = targs.resolution or trainer.default_resolution(pipe)
    with torch.no_grad():
        prompt = _encode_prompts(pipe, kind, [plan._caption(0)], "cpu")[0]
        phrase = torch.randn(phrase_dim(pipe))
        side = resolution // pipe.vae_scale_factor
        latent = torch.randn(pipe.unet.config.in_channels, side, side)
    entries = {"prompt": prompt, "phrase": phrase, "latent": (latent, latent.abs())}
    batch = plan.synthetic_batch(kind, targs, resolution, entries)
    batch = {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    width, scaling = phrase_dim(pipe), pipe.vae.config.scaling_factor
    pipe.text_encoder, pipe.vae = None, None
    trainables = trainer.build_trainables(targs, pipe, placement, phrase_width=width)
    state = trainer.RunState(args=targs, pipe=pipe, kind=kind, placement=placement, trainables=trainables,
                             resolution=resolution, empty_prompt=prompt, scaling=scaling)  # fmt: skip
    steps = iter(range(10))
    return peak_bytes(lambda: trainer.training_step(state, batch, next(steps)))


@pytest.mark.parametrize(
    "size, checkpointing",
    [
        ("tiny", False),
        pytest.param("real-width", False, marks=pytest.mark.slow),
        pytest.param("real-width", True, marks=pytest.mark.slow),
    ],
)
def test_rehearsed_step_peak_is_the_measured_one_within_15_percent(size, checkpointing):
    from diffusers_ext.testing.tiny_pipelines import tiny_sd_pipeline

    make = tiny_sd_pipeline if size == "tiny" else _real_width_sd_pipeline
    # the tiny UNet at batch 8: at batch 2 its tensors are a few MB and the heap's fixed costs (autograd's
    # graph nodes, allocation headers), which a tracker of tensors does not see, are a fifth of them
    batch = "8" if size == "tiny" else "2"
    opts = plan._with(
        plan.parse_args(["--model", "sd15", "--cache-dir", "--cache-latents", "--batch-size", batch]),
        autocast_rules="cpu",
        gradient_checkpointing=checkpointing,
    )
    rehearsed = plan.rehearse(opts, pipeline=plan.meta_copy(make())).step_rise
    measured = _measured_step_rise(make(), opts)
    assert abs(rehearsed - measured) <= 0.15 * measured, (rehearsed, measured)
