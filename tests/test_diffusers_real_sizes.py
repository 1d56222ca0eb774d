"""The spatial adapter on SD1.5, SDXL and Kolors UNets at their published widths, random weights, no downloads.

Whole UNets are built on the meta device (no memory): processor counts, the adapter's parameter count (equal
to what diffusers' own ``attention_type="gated"`` UNet adds, the GLIGEN reference) and its fp32/fp16 size.
Forwards run on CPU at real widths (channels 320/640, heads, 768/2048-d cross-attention, Kolors' 4096-d
``encoder_hid_proj``) but with the first two levels only, since a whole SDXL UNet is 10 GB in fp32.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from diffusers_ext.spatial_adapter import SpatialAdapter
from diffusers_ext.testing.published_unets import KOLORS, SD15, SDXL

torch.set_num_threads(1)

MODELS = {"sd15": (SD15, 768), "sdxl": (SDXL, 2048), "kolors": (KOLORS, 4096)}


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "name, processors, unet_params",
    [("sd15", 32, 859_520_964), ("sdxl", 140, 2_567_463_684), ("kolors", 140, 2_579_458_820)],
)
def test_real_width_unets_on_meta_processor_counts_and_adapter_size(name, processors, unet_params):
    config, phrase_dim = MODELS[name]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
        gated = UNet2DConditionModel(**config, attention_type="gated")
        adapter = SpatialAdapter.for_unet(unet, phrase_dim=phrase_dim, phrase_norm=False)
    assert len(unet.attn_processors) == processors
    assert _params(unet) == unet_params  # 859.5M is SD1.5's published UNet size, 2.567B SDXL's
    assert len(adapter.fusers) == processors // 2  # one fuser per BasicTransformerBlock
    native_extra = _params(gated) - _params(unet)  # what diffusers' GLIGEN UNet adds
    # diffusers' position net reads cross_attention_dim-wide phrases; Kolors' are 4096-wide (ChatGLM3)
    wider = (phrase_dim - config["cross_attention_dim"]) * (adapter.config.hidden_dim + 1)
    n = _params(adapter)
    assert n == native_extra + wider
    assert sum(p.numel() * p.element_size() for p in adapter.parameters()) == 4 * n
    assert sum(p.numel() * p.element_size() for p in adapter.half().parameters()) == 2 * n


def _two_levels(config: dict) -> dict:
    """The first two levels of a real config: real channels, heads, transformer depth and conditioning."""
    cut = dict(config, block_out_channels=config["block_out_channels"][:2], layers_per_block=1)
    if config is SD15:
        cut.update(down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2)
    else:
        cut.update(
            down_block_types=config["down_block_types"][:2],
            up_block_types=config["up_block_types"][1:],
            transformer_layers_per_block=config["transformer_layers_per_block"][:2],
            attention_head_dim=config["attention_head_dim"][:2],
        )
    return cut


def _forward_inputs(config: dict, phrase_dim: int, latent: int = 8):
    g = torch.Generator().manual_seed(0)
    text_dim = config.get("encoder_hid_dim") or config["cross_attention_dim"]
    x = torch.randn(1, 4, latent, latent, generator=g)
    ehs = torch.randn(1, 8, text_dim, generator=g)
    added = None
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        added = {
            "text_embeds": torch.randn(1, pooled, generator=g),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]),
        }
    boxes = torch.tensor([[[0.1, 0.1, 0.6, 0.5], [0.4, 0.3, 0.9, 0.95]]])
    phrases = torch.randn(1, 2, phrase_dim, generator=g)
    return x, torch.tensor([500]), ehs, added, boxes, phrases


@pytest.mark.parametrize("name", sorted(MODELS))
def test_real_width_forward_with_adapter_at_init_equals_plain_unet(name):
    config, phrase_dim = MODELS[name]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**_two_levels(config)).eval()
    adapter = SpatialAdapter.for_unet(unet, phrase_dim=phrase_dim)
    x, t, ehs, added, boxes, phrases = _forward_inputs(config, phrase_dim)
    with torch.no_grad():
        plain = unet(x, t, ehs, added_cond_kwargs=added).sample
        adapter.install(unet)
        grounded = unet(
            x,
            t,
            ehs,
            added_cond_kwargs=added,
            cross_attention_kwargs=adapter.cross_attention_kwargs(boxes, phrases),
        ).sample
    assert plain.abs().max() > 0.1
    assert (grounded - plain).abs().max().item() <= 1e-5


@pytest.mark.slow  # fp16 matmuls on CPU are emulated: about 20 s on an idle 2-core machine
def test_real_width_autocast_forward_with_open_gates_stays_finite():
    config, phrase_dim = MODELS["sd15"]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**_two_levels(config)).eval()
    adapter = SpatialAdapter.for_unet(unet, phrase_dim=phrase_dim)
    with torch.no_grad():
        for fuser in adapter.fusers:
            fuser.alpha_attn.fill_(1.0)
            fuser.alpha_dense.fill_(1.0)
    adapter.install(unet)
    x, t, ehs, added, boxes, phrases = _forward_inputs(config, phrase_dim)
    for dtype in (torch.bfloat16, torch.float16):
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            kw = adapter.cross_attention_kwargs(
                boxes, phrases * 30
            )  # large phrase features, as ChatGLM's are
            out = unet(x, t, ehs, cross_attention_kwargs=kw).sample
            plain = unet(x, t, ehs).sample
        assert out.dtype == dtype
        assert torch.isfinite(out).all(), dtype
        assert (out.float() - plain.float()).abs().max() > 1e-2, dtype  # the open gates act under autocast
