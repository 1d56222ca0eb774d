"""Grounded generation on tiny offline SD, SDXL and Kolors pipelines: phrase encoding with each pipeline's
own text encoder, the classifier-free-guidance batch, run-time gate scale and scheduled sampling."""

from __future__ import annotations

import pytest
import torch

from diffusers_ext.generation import (
    encode_phrases,
    generate,
    grounding_cross_attention_kwargs,
    phrase_dim,
)
from diffusers_ext.scheduled_sampling import grounding_schedule
from diffusers_ext.spatial_adapter import SpatialAdapter
from diffusers_ext.testing.tiny_pipelines import tiny_kolors_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline

torch.set_num_threads(1)

PHRASES = ["a red circle", "a blue square"]
BOXES = [[0.1, 0.1, 0.5, 0.5], [0.55, 0.4, 0.95, 0.9]]
STEPS = 3


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    return {
        "sd": tiny_sd_pipeline(),
        "sdxl": tiny_sdxl_pipeline(),
        "kolors": tiny_kolors_pipeline(tmp_path_factory.mktemp("kolors")),
    }


def _run_kwargs(kind: str) -> dict:
    """Grounding on every step (``schedule=None``): GLIGEN's default beta=0.3 of 3 steps grounds none."""
    extra = {"max_sequence_length": 16} if kind == "kolors" else {}
    return {"num_inference_steps": STEPS, "output_type": "latent", **extra}


def _adapter(pipe, gate: float = 0.7) -> SpatialAdapter:
    torch.manual_seed(1)
    adapter = SpatialAdapter.for_unet(pipe.unet, phrase_dim=phrase_dim(pipe), hidden_dim=32)
    with torch.no_grad():
        for fuser in adapter.fusers:
            fuser.alpha_attn.fill_(gate)
            fuser.alpha_dense.fill_(gate)
    return adapter


def _latents(out) -> torch.Tensor:
    return out.images if isinstance(out.images, torch.Tensor) else torch.as_tensor(out.images)


def test_gligen_abc_schedule_is_full_then_linear_decay_then_off():
    assert grounding_schedule(10, abc=[0.3, 0.4, 0.3]) == [1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0, 0.0, 0.0]


def test_beta_schedule_equals_abc_form_beta_0_one_minus_beta():
    assert grounding_schedule(10, beta=0.3) == [1.0] * 3 + [0.0] * 7
    assert grounding_schedule(50, beta=0.3) == grounding_schedule(50, abc=[0.3, 0.0, 0.7])


def test_no_schedule_keeps_full_scale_every_step():
    assert grounding_schedule(4) == [1.0] * 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"abc": [0.5, 0.2, 0.2]}, "sum to 1"),
        ({"abc": [0.5, 0.5]}, "three fractions"),
        ({"abc": [1.2, -0.2, 0.0]}, r"in \[0, 1\]"),
        ({"beta": 1.5}, r"in \[0, 1\]"),
        ({"beta": 0.3, "abc": [0.3, 0.0, 0.7]}, "not both"),
    ],
)
def test_bad_schedules_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        grounding_schedule(10, **kwargs)


@pytest.mark.parametrize("kind, dim", [("sd", 32), ("sdxl", 64), ("kolors", 32)])
def test_phrase_features_come_from_the_pipelines_own_text_encoder(pipes, kind, dim):
    pipe = pipes[kind]
    feats = encode_phrases(pipe, PHRASES + [PHRASES[0]])
    assert phrase_dim(pipe) == dim
    assert feats.shape == (3, dim)
    assert torch.isfinite(feats).all()
    assert torch.equal(feats[0], feats[2])  # deterministic, independent of the batch it is in
    assert not torch.allclose(feats[0], feats[1])


def test_sdxl_phrase_feature_is_both_pooled_clip_features_concatenated(pipes):
    pipe = pipes["sdxl"]
    ids = pipe.tokenizer(PHRASES, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        first = pipe.text_encoder(ids.input_ids).pooler_output
        second = pipe.text_encoder_2(ids.input_ids).text_embeds
    assert torch.allclose(encode_phrases(pipe, PHRASES), torch.cat([first, second], -1), atol=1e-6)


def test_cfg_batch_unconditional_half_holds_only_null_tokens(pipes):
    pipe = pipes["sd"]
    adapter = _adapter(pipe)
    adapter.install(pipe)
    try:
        layouts_p = [PHRASES, PHRASES[:1]]
        layouts_b = [BOXES, BOXES[:1]]
        kw = grounding_cross_attention_kwargs(
            pipe, adapter, layouts_p, layouts_b, n_prompts=2, num_images_per_prompt=2, gate_scale=0.5
        )
        tokens = kw["grounding_tokens"]
        assert kw["grounding_scale"] == 0.5
        assert tokens.shape == (8, 30, adapter.config.token_dim)  # always max_objs slots, as in GLIGEN
        null = adapter.position_net.null_tokens(4)
        assert torch.allclose(tokens[:4], null, atol=1e-6)
        assert torch.equal(tokens[4], tokens[5]) and torch.equal(tokens[6], tokens[7])  # per-prompt repeats
        assert not torch.allclose(tokens[4, 1], tokens[6, 1])  # prompt 2's second slot is padding
        assert torch.allclose(tokens[6, 1:], null[0, 1:], atol=1e-6)
        assert torch.allclose(tokens[4, 2:], null[0, 2:], atol=1e-6)
    finally:
        adapter.remove()


@pytest.mark.parametrize("kind", ["sd", "sdxl", "kolors"])
def test_pipeline_unet_sees_null_then_layout_tokens_and_gate_scale_changes_output(pipes, kind):
    pipe = pipes[kind]
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain = _latents(pipe("two shapes", generator=gen(), **_run_kwargs(kind)))
    run = {**_run_kwargs(kind), "schedule": None}
    adapter = _adapter(pipe)
    adapter.install(pipe)
    seen = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["cross_attention_kwargs"]["grounding_tokens"].clone()), with_kwargs=True
    )
    try:
        off = _latents(
            generate(
                pipe,
                adapter,
                "two shapes",
                PHRASES,
                BOXES,
                gate_scale=0.0,
                generator=gen(),
                **run,
            )
        )
        on = _latents(generate(pipe, adapter, "two shapes", PHRASES, BOXES, generator=gen(), **run))
        double = _latents(
            generate(
                pipe,
                adapter,
                "two shapes",
                PHRASES,
                BOXES,
                gate_scale=2.0,
                generator=gen(),
                **run,
            )
        )
    finally:
        hook.remove()
        adapter.remove()
    assert torch.equal(off, plain)  # gate_scale 0 is exactly the base pipeline
    assert (on - plain).abs().max() > 1e-4
    assert (double - on).abs().max() > 1e-4
    assert len(seen) == 3 * STEPS and seen[0].shape[0] == 2
    assert seen[0].shape[1] == adapter.config.max_objs
    null = adapter.position_net.null_tokens(1).to(seen[0].dtype)
    assert torch.allclose(seen[0][:1], null, atol=1e-6)
    assert not torch.allclose(seen[0][1:], null, atol=1e-3)


def test_scheduled_sampling_sets_the_scale_of_each_denoising_step(pipes):
    pipe = pipes["sd"]
    adapter = _adapter(pipe)
    adapter.install(pipe)
    try:
        kw = {
            "num_inference_steps": 4,
            "output_type": "latent",
            "generator": torch.Generator().manual_seed(0),
        }
        _, abc_scales = generate(
            pipe,
            adapter,
            "x",
            PHRASES,
            BOXES,
            gate_scale=2.0,
            schedule=[0.5, 0.5, 0.0],
            return_scales=True,
            **kw,
        )
        kw["generator"] = torch.Generator().manual_seed(0)
        _, beta_scales = generate(pipe, adapter, "x", PHRASES, BOXES, beta=0.25, return_scales=True, **kw)
    finally:
        adapter.remove()
    assert abc_scales == [2.0, 2.0, 1.0, 0.0]
    assert beta_scales == [1.0, 0.0, 0.0, 0.0]


def test_no_guidance_batch_has_no_null_half(pipes):
    pipe = pipes["sd"]
    adapter = _adapter(pipe)
    adapter.install(pipe)
    try:
        kw = grounding_cross_attention_kwargs(pipe, adapter, PHRASES, BOXES, classifier_free_guidance=False)
        out = generate(
            pipe,
            adapter,
            "x",
            PHRASES,
            BOXES,
            guidance_scale=1.0,
            num_inference_steps=1,
            output_type="latent",
        )
    finally:
        adapter.remove()
    assert kw["grounding_tokens"].shape[0] == 1
    assert torch.isfinite(_latents(out)).all()


@pytest.mark.parametrize(
    "phrases, boxes, match",
    [
        (PHRASES, BOXES[:1], "2 phrases but 1 boxes"),
        (PHRASES, [[0.1, 0.1, 0.5], BOXES[1]], "4 numbers"),
        (PHRASES, [[0.1, 0.1, 1.5, 0.5], BOXES[1]], r"outside \[0, 1\]"),
        (PHRASES, [[0.5, 0.1, 0.1, 0.5], BOXES[1]], "x1 <= x0"),
        (PHRASES, [[0.1, 0.1, 0.1, 0.5], BOXES[1]], "empty or flipped"),
        (PHRASES, [[float("nan"), 0.1, 0.5, 0.5], BOXES[1]], "NaN"),
        (["a"] * 31, [[0.0, 0.0, 0.1, 0.1]] * 31, "max_objs=30"),
        (["", "b"], BOXES, "non-empty strings"),
    ],
)
def test_bad_layouts_are_refused_before_generation(pipes, phrases, boxes, match):
    pipe = pipes["sd"]
    adapter = _adapter(pipe)
    adapter.install(pipe)
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=match):
            generate(pipe, adapter, "x", phrases, boxes, num_inference_steps=1, output_type="latent")
    finally:
        hook.remove()
        adapter.remove()
    assert calls == []


def test_adapter_not_installed_or_built_for_another_text_encoder_is_refused(pipes):
    pipe = pipes["sd"]
    adapter = _adapter(pipe)
    with pytest.raises(RuntimeError, match="not installed"):
        generate(pipe, adapter, "x", PHRASES, BOXES, num_inference_steps=1)
    wrong = SpatialAdapter.for_unet(pipe.unet, phrase_dim=48, hidden_dim=32)
    wrong.install(pipe)
    try:
        with pytest.raises(ValueError, match="48-d phrase features"):
            generate(pipe, wrong, "x", PHRASES, BOXES, num_inference_steps=1)
    finally:
        wrong.remove()


def test_non_finite_gate_scale_is_refused(pipes):
    pipe = pipes["sd"]
    adapter = _adapter(pipe)
    adapter.install(pipe)
    try:
        with pytest.raises(ValueError, match="finite"):
            grounding_cross_attention_kwargs(pipe, adapter, PHRASES, BOXES, gate_scale=float("inf"))
        for bad in (float("nan"), "2", None):
            with pytest.raises(ValueError, match=f"finite real number.*{bad}"):
                generate(pipe, adapter, "x", PHRASES, BOXES, gate_scale=bad, num_inference_steps=1)
    finally:
        adapter.remove()


def test_boxes_as_tensors_lists_or_tuples_give_the_same_tokens(pipes):
    pipe = pipes["sd"]
    adapter = _adapter(pipe)
    adapter.install(pipe)
    try:
        as_lists = grounding_cross_attention_kwargs(pipe, adapter, PHRASES, BOXES)["grounding_tokens"]
        as_tuples = grounding_cross_attention_kwargs(pipe, adapter, tuple(PHRASES), tuple(map(tuple, BOXES)))
        as_tensor = grounding_cross_attention_kwargs(pipe, adapter, PHRASES, torch.tensor(BOXES))
    finally:
        adapter.remove()
    assert torch.equal(as_lists, as_tuples["grounding_tokens"])
    assert torch.equal(as_lists, as_tensor["grounding_tokens"])


def test_unknown_schedule_name_is_refused(pipes):
    pipe = pipes["sd"]
    adapter = _adapter(pipe)
    adapter.install(pipe)
    try:
        with pytest.raises(ValueError, match="schedule must be 'gligen'"):
            generate(pipe, adapter, "x", PHRASES, BOXES, schedule="glide", num_inference_steps=1)
    finally:
        adapter.remove()


def test_unsupported_pipeline_type_is_named_in_the_error():
    with pytest.raises(TypeError, match="StableDiffusionPipeline, StableDiffusionXLPipeline, KolorsPipeline"):
        phrase_dim(object())
