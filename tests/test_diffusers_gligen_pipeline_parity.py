"""GLIGEN on current diffusers: our ``generate`` on a plain StableDiffusionPipeline with the converted adapter
gives the images of diffusers' own (deprecated) ``StableDiffusionGLIGENPipeline`` with the gated UNet.

Both pipelines share the VAE, text encoder, tokenizer and one scheduler config (``steps_offset=1``, which
StableDiffusionPipeline would force anyway); the GLIGEN pipeline runs ``UNet2DConditionModel(attention_type=
"gated")`` and ours the plain UNet with the same base weights plus ``adapter_from_gated_unet``. Layouts of 1, 2,
5 and 30 objects, with diffusers' default scheduled sampling (beta 0.3) and with grounding on every step.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from diffusers_ext.generation import generate
from diffusers_ext.gligen_conversion import adapter_from_gated_unet
from diffusers_ext.testing.tiny_pipelines import TINY_PIPELINE_CONFIG, tiny_sd_pipeline

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from diffusers.pipelines.deprecated.stable_diffusion_gligen.pipeline_stable_diffusion_gligen import (
        StableDiffusionGLIGENPipeline,
    )

torch.set_num_threads(1)
STEPS = 4  # int(0.3 * 4) = 1 grounded step, then 3 without: the schedule matters


def _layout(n: int) -> tuple[list[str], list[list[float]]]:
    g = torch.Generator().manual_seed(n)
    lo = torch.rand(n, 2, generator=g) * 0.5
    hi = lo + 0.1 + torch.rand(n, 2, generator=g) * 0.4
    words = ["red", "blue", "green", "small", "large", "round"]
    phrases = [f"a {words[i % 6]} {words[(i // 6) % 6]} thing {i}" for i in range(n)]
    return phrases, torch.cat([lo, hi], 1).tolist()


@pytest.fixture(scope="module")
def pipes():
    ours = tiny_sd_pipeline(seed=0)
    torch.manual_seed(3)
    gated = UNet2DConditionModel(
        **TINY_PIPELINE_CONFIG["unet"],
        cross_attention_dim=TINY_PIPELINE_CONFIG["text_width"],
        attention_type="gated",
    ).eval()
    missing, _ = gated.load_state_dict(ours.unet.state_dict(), strict=False)
    assert all(".fuser." in k or k.startswith("position_net.") for k in missing)
    with torch.no_grad():  # open the gates and move the null features: a closed gate would compare nothing
        for name, p in gated.named_parameters():
            if "alpha_" in name:
                p.uniform_(0.5, 1.0)
            if "null_" in name:
                p.normal_()
    scheduler = DDIMScheduler.from_config(ours.scheduler.config)
    assert scheduler.config.steps_offset == 1
    reference = StableDiffusionGLIGENPipeline(
        vae=ours.vae,
        text_encoder=ours.text_encoder,
        tokenizer=ours.tokenizer,
        unet=gated,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    for p in (ours, reference):
        p.set_progress_bar_config(disable=True)
    adapter = adapter_from_gated_unet(gated)
    adapter.install(ours)
    return ours, reference, adapter


def _images(pipe_call) -> np.ndarray:
    return pipe_call(generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("beta", [0.3, 1.0])
@pytest.mark.parametrize("n_objs", [1, 2, 5, 30])
def test_generate_matches_diffusers_gligen_pipeline_images(pipes, n_objs, beta):
    ours, reference, adapter = pipes
    phrases, boxes = _layout(n_objs)
    prompt = "some shapes on a table"
    common = {"num_inference_steps": STEPS, "output_type": "np"}
    with torch.no_grad():
        ref = _images(
            lambda **kw: reference(
                prompt,
                gligen_phrases=phrases,
                gligen_boxes=boxes,
                gligen_scheduled_sampling_beta=beta,
                **common,
                **kw,
            )
        )
        got = _images(lambda **kw: generate(ours, adapter, prompt, phrases, boxes, beta=beta, **common, **kw))
        plain = _images(
            lambda **kw: generate(ours, adapter, prompt, phrases, boxes, gate_scale=0.0, **common, **kw)
        )
    assert np.abs(ref - plain).max() > 1e-3  # the grounding changes the image, so agreement means something
    assert np.abs(got - ref).max() < 1e-4


def test_generate_defaults_to_diffusers_gligen_beta(pipes):
    ours, reference, adapter = pipes
    phrases, boxes = _layout(2)
    common = {"num_inference_steps": 10, "output_type": "latent"}
    with torch.no_grad():
        _, scales = generate(ours, adapter, "x", phrases, boxes, return_scales=True, **common)
        _, always = generate(ours, adapter, "x", phrases, boxes, schedule=None, return_scales=True, **common)
    assert scales == [1.0] * 3 + [0.0] * 7  # diffusers' gligen_scheduled_sampling_beta=0.3
    assert always == [1.0] * 10
