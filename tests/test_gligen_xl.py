"""GLIGEN-XL (jiuntian/gligen-xl-512, -1024): a diffusers gated SDXL UNet loads through load_spatial_adapter,
gives diffusers' own gated forward, trains on with the all-blocks preset, and at real SDXL width its keys map
onto our adapter with nothing left over."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from diffusers_ext import load_spatial_adapter, unload_spatial_adapter
from diffusers_ext.fuser_presets import resolve_layers
from diffusers_ext.generation import phrase_dim
from diffusers_ext.gligen_conversion import adapter_from_gated_state_dict, adapter_to_gated_state_dict
from diffusers_ext.spatial_adapter import transformer_blocks
from diffusers_ext.testing.published_unets import SDXL
from diffusers_ext.testing.tiny_pipelines import tiny_sdxl_pipeline
from diffusers_ext.testing.tiny_unet import open_gated_unet
from diffusers_ext.training.optimizers import build_optimizer

torch.set_num_threads(1)
# SDXL's stacks are deeper at the deeper level; the tiny UNet keeps that shape (1 then 2 blocks per module)
DEPTHS = (1, 2)


def _sdxl_pipeline_and_gated_unet():
    pipe = tiny_sdxl_pipeline(seed=0)
    # without the private keys: diffusers' from_config resets every key named in _use_default_values
    config = {k: v for k, v in pipe.unet.config.items() if not k.startswith("_")}
    config["transformer_layers_per_block"] = DEPTHS
    pipe.unet = UNet2DConditionModel.from_config(config).eval()
    return pipe, open_gated_unet(config)  # gates open, null features moved: the fusers change the output


def _inputs(pipe, batch=2):
    g = torch.Generator().manual_seed(1)
    width = pipe.unet.config.cross_attention_dim
    x = torch.randn(batch, 4, 8, 8, generator=g)
    ehs = torch.randn(batch, 5, width, generator=g)
    added = {
        "text_embeds": torch.randn(batch, pipe.text_encoder_2.config.projection_dim, generator=g),
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]).repeat(batch, 1),
    }
    boxes = torch.zeros(batch, 30, 4)
    boxes[:, :2] = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.4, 0.2, 0.9, 0.8]])
    masks = torch.zeros(batch, 30)
    masks[:, :2] = 1
    masks[1:, 1] = 0
    phrases = torch.randn(batch, 30, phrase_dim(pipe), generator=g)
    return x, torch.tensor([10, 500][:batch]), ehs, added, boxes, phrases, masks


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    pipe, gated = _sdxl_pipeline_and_gated_unet()
    folder = tmp_path_factory.mktemp("gligen-xl")
    gated.save_pretrained(folder / "unet")  # the hub layout: <repo>/unet/config.json
    adapter = load_spatial_adapter(pipe, folder, subfolder="unet")
    return pipe, gated, adapter


def test_a_diffusers_gated_sdxl_unet_equals_its_native_forward_once_loaded(loaded):
    pipe, gated, adapter = loaded
    assert pipe.unet.config.attention_type == "default"
    assert phrase_dim(pipe) == gated.config.cross_attention_dim  # GLIGEN-XL: phrase width = cross-attn width
    x, t, ehs, added, boxes, phrases, masks = _inputs(pipe)
    gligen = {"boxes": boxes, "positive_embeddings": phrases, "masks": masks}
    with torch.no_grad():
        native = gated(x, t, ehs, added_cond_kwargs=added, cross_attention_kwargs={"gligen": gligen}).sample
        ours = pipe.unet(
            x,
            t,
            ehs,
            added_cond_kwargs=added,
            cross_attention_kwargs=adapter.cross_attention_kwargs(boxes, phrases, masks),
        ).sample
        plain = pipe.unet(x, t, ehs, added_cond_kwargs=added).sample
    assert (native - plain).abs().max() > 1e-2  # the fusers matter, so agreement means something
    assert (ours - native).abs().max() < 1e-5


def test_the_loaded_adapter_is_the_all_blocks_preset(loaded):
    pipe, gated, adapter = loaded
    blocks = list(transformer_blocks(pipe.unet))
    # down 1x1 + 1x2, mid 1x2, up 2x2 + 2x1 (one attention module per level down, two up; depth per level)
    assert len(blocks) == 11 and sum(n.endswith("transformer_blocks.1") for n in blocks) == 4
    assert sorted(adapter.layer_names) == sorted(resolve_layers(blocks, "all"))


def test_gligen_xl_trains_on_from_the_loaded_weights(loaded):
    pipe, gated, adapter = loaded
    x, t, ehs, added, boxes, phrases, masks = _inputs(pipe)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))  # a noise-prediction target
    gates_before = torch.tensor([g for pair in adapter.gate_stats()["per_layer"].values() for g in pair])
    opt = build_optimizer(adapter.parameters(), name="adamw8bit", lr=1e-3)
    losses = []
    try:
        for _ in range(8):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                cka = adapter.cross_attention_kwargs(boxes, phrases, masks)
                out = pipe.unet(x, t, ehs, added_cond_kwargs=added, cross_attention_kwargs=cka).sample
            loss = (out.float() - target).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        unload_spatial_adapter(pipe)
    gates_after = torch.tensor([g for pair in adapter.gate_stats()["per_layer"].values() for g in pair])
    assert losses[-1] < 0.9 * losses[0], losses
    assert (gates_after - gates_before).abs().min() > 0  # every gate of every block moved
    assert all(p.grad is not None for p in adapter.parameters() if p.requires_grad)


def test_published_gligen_xl_keys_map_onto_the_adapter_with_nothing_left_over():
    """At SDXL's published width on the meta device: the keys and shapes of a diffusers gated SDXL UNet (the
    format of jiuntian/gligen-xl-1024) split into our 70-fuser adapter and the plain SDXL UNet, and the
    adapter writes back exactly the published fuser and position-net keys."""
    with torch.device("meta"):
        gated = UNet2DConditionModel(**SDXL, attention_type="gated")
        plain = UNet2DConditionModel(**SDXL)
    published = gated.state_dict()
    with torch.device("meta"):
        adapter, base = adapter_from_gated_state_dict(published, plain)
    assert len(adapter.layer_names) == 70
    assert adapter.config.phrase_dim == 2048  # CLIP-L pooled 768 + OpenCLIP-bigG projected 1280
    assert adapter.config.token_dim == 2048 and adapter.config.max_objs == 30
    assert set(base) == set(plain.state_dict())
    back = adapter_to_gated_state_dict(adapter)
    grounding = {k: v for k, v in published.items() if ".fuser." in k or k.startswith("position_net.")}
    assert set(back) == set(grounding)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in grounding.items()}
    assert len(grounding) + len(base) == len(published)
    n = sum(v.numel() for v in grounding.values())
    assert n == sum(p.numel() for p in adapter.parameters()) == 1_812_438_988


def test_a_half_precision_pipeline_reads_the_gated_unet_in_its_own_dtype(tmp_path, monkeypatch):
    """GLIGEN-XL's gated UNet is 4.4 B parameters: read in fp32 it takes 17.5 GB of host memory before
    anything is cast to the pipeline's fp16."""
    pipe, gated = _sdxl_pipeline_and_gated_unet()
    pipe.unet.to(torch.float16)
    gated.save_pretrained(tmp_path / "unet")
    dtypes = []
    original = UNet2DConditionModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        model = original(cls, *args, **kwargs)
        dtypes.append(model.dtype)
        return model

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", classmethod(spy))
    adapter = load_spatial_adapter(pipe, tmp_path, subfolder="unet")
    assert dtypes == [torch.float16]
    assert next(adapter.parameters()).dtype == torch.float16
    reference = gated.state_dict()
    base = {k: v for k, v in pipe.unet.state_dict().items() if ".processor." not in k}
    assert all(torch.equal(v, reference[k].to(torch.float16)) for k, v in base.items())
    unload_spatial_adapter(pipe)
