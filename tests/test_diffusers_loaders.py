"""load_spatial_adapter / set_spatial_adapter_scale / unload_spatial_adapter: the three published formats, the
export to an official GLIGEN checkpoint that diffusers' own converter turns back into the same gated UNet,
and IP-Adapter beside the spatial adapter in either load order."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from safetensors.torch import load_file

from diffusers_ext import (
    SpatialAdapter,
    load_spatial_adapter,
    set_spatial_adapter_scale,
    unload_spatial_adapter,
)
from diffusers_ext.generation import generate, phrase_dim
from diffusers_ext.gligen_conversion import adapter_from_gated_unet, gligen_checkpoint, save_gligen_checkpoint
from diffusers_ext.testing.tiny_pipelines import TINY_PIPELINE_CONFIG, tiny_sd_pipeline
from diffusers_ext.testing.tiny_unet import open_gated_unet

torch.set_num_threads(1)
PHRASES = ["a red circle", "a blue square"]
BOXES = [[0.1, 0.1, 0.5, 0.5], [0.55, 0.4, 0.95, 0.9]]


def _gated(seed: int = 3) -> UNet2DConditionModel:
    config = {**TINY_PIPELINE_CONFIG["unet"], "cross_attention_dim": TINY_PIPELINE_CONFIG["text_width"]}
    return open_gated_unet(config, seed, lowest_gate=0.5)


def _unet_inputs():
    g = torch.Generator().manual_seed(1)
    x, ehs = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    boxes = torch.zeros(2, 30, 4)
    boxes[:, :2] = torch.tensor(BOXES)
    masks = torch.zeros(2, 30)
    masks[:, :2] = 1
    return x, torch.tensor([10, 500]), ehs, boxes, torch.randn(2, 30, 32, generator=g), masks


def _native_and_ours(gated, pipe, adapter):
    x, t, ehs, boxes, phrases, masks = _unet_inputs()
    gligen = {"boxes": boxes, "positive_embeddings": phrases, "masks": masks}
    with torch.no_grad():
        native = gated(x, t, ehs, cross_attention_kwargs={"gligen": gligen}).sample
        ours = pipe.unet(
            x, t, ehs, cross_attention_kwargs=adapter.cross_attention_kwargs(boxes, phrases, masks)
        ).sample
    return native, ours


def test_official_gligen_checkpoint_loads_base_unet_and_grounding(tmp_path):
    gated = _gated()
    plain = tiny_sd_pipeline(seed=7).unet
    plain.load_state_dict(gated.state_dict(), strict=False)
    path = save_gligen_checkpoint(adapter_from_gated_unet(gated), plain, tmp_path / "gligen.pth")
    pipe = tiny_sd_pipeline(seed=0)  # another base UNet: the checkpoint's base must replace it
    adapter = load_spatial_adapter(pipe, path)
    native, ours = _native_and_ours(gated, pipe, adapter)
    assert (ours - native).abs().max() < 1e-5
    again = tiny_sd_pipeline(seed=0)
    load_spatial_adapter(again, tmp_path, weight_name="gligen.pth", load_base_unet=False)
    assert torch.equal(again.unet.conv_in.weight, tiny_sd_pipeline(seed=0).unet.conv_in.weight)


def test_exported_checkpoint_converts_back_with_diffusers_into_the_same_gated_unet():
    gated = _gated()
    plain = tiny_sd_pipeline().unet
    plain.load_state_dict(gated.state_dict(), strict=False)
    model = gligen_checkpoint(adapter_from_gated_unet(gated), plain)["model"]
    assert "input_blocks.1.1.transformer_blocks.0.fuser.attn.to_q.weight" in model
    assert "input_blocks.2.0.op.weight" in model and "output_blocks.1.2.conv.weight" in model
    # what diffusers' scripts/convert_gligen_to_diffusers.py does: LDM -> diffusers for the UNet (fusers
    # travel inside the attention blocks), position_net keys copied as they are
    converted = convert_ldm_unet_checkpoint(
        {f"model.diffusion_model.{k}": v for k, v in model.items()}, dict(gated.config)
    )
    converted.update({k: v for k, v in model.items() if k.startswith("position_net.")})
    reference = gated.state_dict()
    assert set(converted) == set(reference)
    assert all(torch.equal(converted[k], reference[k]) for k in reference)


@pytest.mark.parametrize("subfolder", [None, "unet"])
def test_diffusers_gated_unet_folder_loads_as_plain_unet_plus_adapter(tmp_path, subfolder):
    gated = _gated()
    gated.save_pretrained(tmp_path / "unet")
    pipe = tiny_sd_pipeline(seed=0)
    adapter = load_spatial_adapter(pipe, tmp_path, subfolder=subfolder)
    assert pipe.unet.config.attention_type == "default"
    native, ours = _native_and_ours(gated, pipe, adapter)
    assert (ours - native).abs().max() < 1e-5


def test_our_save_pretrained_folder_and_its_state_dict_load(tmp_path):
    pipe = tiny_sd_pipeline()
    torch.manual_seed(0)
    saved = SpatialAdapter.for_unet(
        pipe.unet, phrase_dim=phrase_dim(pipe), hidden_dim=32, init_mode="zero_out"
    )
    with torch.no_grad():
        for p in saved.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    saved.save_pretrained(tmp_path / "adapter")
    for source in (
        tmp_path / "adapter",
        load_file(tmp_path / "adapter" / "diffusion_pytorch_model.safetensors"),
    ):
        adapter = load_spatial_adapter(pipe, source)
        a, b = saved.state_dict(), adapter.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        unload_spatial_adapter(pipe)


def test_phrase_norm_adapter_refuses_gligen_export():
    pipe = tiny_sd_pipeline()
    adapter = SpatialAdapter.for_unet(pipe.unet, phrase_dim=32, hidden_dim=32, phrase_norm=True)
    with pytest.raises(ValueError, match="phrase_norm=True: a LayerNorm on the phrase features that GLIGEN"):
        gligen_checkpoint(adapter, pipe.unet)


def test_loader_refusals_name_the_problem(tmp_path):
    pipe = tiny_sd_pipeline()
    with pytest.raises(TypeError, match="unknown arguments \\['adapter_name'\\]"):
        load_spatial_adapter(pipe, tmp_path, adapter_name="x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no spatial adapter"):
        load_spatial_adapter(pipe, tmp_path / "empty")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pth"):
        load_spatial_adapter(pipe, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match="no spatial adapter is installed"):
        set_spatial_adapter_scale(pipe, 0.5)
    load_spatial_adapter(pipe, adapter_to_dict(pipe))
    with pytest.raises(RuntimeError, match="already carries a spatial adapter"):
        load_spatial_adapter(pipe, adapter_to_dict(pipe))
    for bad in (float("nan"), float("inf"), "1.0", None):
        with pytest.raises(ValueError, match="finite real number"):
            set_spatial_adapter_scale(pipe, bad)


def adapter_to_dict(pipe) -> dict:
    torch.manual_seed(0)
    return SpatialAdapter.for_unet(pipe.unet, phrase_dim=phrase_dim(pipe), hidden_dim=32).state_dict()


# --- IP-Adapter beside the spatial adapter -------------------------------------------------------------------

IMAGE_DIM = 16


def _tiny_ip_adapter(unet) -> dict:
    """An IP-Adapter state dict in diffusers' layout (image_proj + to_k_ip/to_v_ip numbered 1, 3, 5, ... over
    the cross-attention processors), random but deterministic."""
    g = torch.Generator().manual_seed(5)
    cross = unet.config.cross_attention_dim
    ip, key_id = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            hidden = unet.get_submodule(name[: -len(".processor")]).to_k.out_features
            ip[f"{key_id}.to_k_ip.weight"] = torch.randn(hidden, cross, generator=g) * 0.3
            ip[f"{key_id}.to_v_ip.weight"] = torch.randn(hidden, cross, generator=g) * 0.3
            key_id += 2
    proj = {
        "proj.weight": torch.randn(4 * cross, IMAGE_DIM, generator=g) * 0.3,
        "proj.bias": torch.zeros(4 * cross),
        "norm.weight": torch.ones(cross),
        "norm.bias": torch.zeros(cross),
    }
    return {"image_proj": proj, "ip_adapter": ip}


def _spatial_state(pipe) -> dict:
    torch.manual_seed(1)
    adapter = SpatialAdapter.for_unet(
        pipe.unet, phrase_dim=phrase_dim(pipe), hidden_dim=32, phrase_norm=False
    )
    with torch.no_grad():
        for fuser in adapter.fusers:
            fuser.alpha_attn.fill_(0.7)
            fuser.alpha_dense.fill_(0.7)
    return adapter.state_dict()


def _run(pipe, *, spatial: bool, ip: bool) -> torch.Tensor:
    kw = {"num_inference_steps": 2, "output_type": "latent", "generator": torch.Generator().manual_seed(0)}
    if ip:
        kw["ip_adapter_image_embeds"] = [
            torch.randn(2, 1, IMAGE_DIM, generator=torch.Generator().manual_seed(2))
        ]
    with torch.no_grad():
        if spatial:
            from diffusers_ext.spatial_adapter import installed_adapter

            return generate(pipe, installed_adapter(pipe), "x", PHRASES, BOXES, schedule=None, **kw).images
        return pipe("x", **kw).images


def _load_ip(pipe) -> None:
    pipe.load_ip_adapter(
        _tiny_ip_adapter(pipe.unet), subfolder=None, weight_name=None, image_encoder_folder=None
    )


@pytest.mark.parametrize("spatial_first", [True, False])
def test_ip_adapter_and_spatial_adapter_both_act_and_unload_independently(spatial_first):
    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    spatial_state = _spatial_state(pipe)
    load_spatial_adapter(pipe, spatial_state)
    spatial_only = _run(pipe, spatial=True, ip=False)
    unload_spatial_adapter(pipe)
    _load_ip(pipe)
    ip_only = _run(pipe, spatial=False, ip=True)
    pipe.unload_ip_adapter()

    if spatial_first:
        load_spatial_adapter(pipe, spatial_state)
        _load_ip(pipe)
    else:
        _load_ip(pipe)
        load_spatial_adapter(pipe, spatial_state)
    both = _run(pipe, spatial=True, ip=True)
    assert (both - spatial_only).abs().max() > 1e-3  # IP-Adapter acts
    assert (both - ip_only).abs().max() > 1e-3  # the spatial adapter acts
    pipe.set_ip_adapter_scale(0.0)  # diffusers still finds its IP processors beside ours
    assert torch.equal(_run(pipe, spatial=True, ip=True), spatial_only)
    pipe.set_ip_adapter_scale(1.0)
    if spatial_first:
        unload_spatial_adapter(pipe)
        assert torch.equal(_run(pipe, spatial=False, ip=True), ip_only)
    else:
        pipe.unload_ip_adapter()
        assert torch.equal(_run(pipe, spatial=True, ip=False), spatial_only)


def test_set_spatial_adapter_scale_zero_is_the_plain_pipeline():
    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    plain = _run(pipe, spatial=False, ip=False)
    load_spatial_adapter(pipe, _spatial_state(pipe))
    grounded = _run(pipe, spatial=True, ip=False)
    set_spatial_adapter_scale(pipe, 0.0)
    off = _run(pipe, spatial=True, ip=False)
    assert (grounded - plain).abs().max() > 1e-3
    assert torch.equal(off, plain)
