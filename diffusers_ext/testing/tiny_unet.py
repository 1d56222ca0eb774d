"""Tiny, offline diffusers models built from configs: the UNets tests, benchmarks and the demo use.

Nothing here downloads weights; every model is randomly initialised from a config small enough to run
a forward pass on CPU in milliseconds.
"""

from __future__ import annotations

from diffusers import UNet2DConditionModel

__all__ = ["TINY_UNET_CONFIG", "open_gated_unet", "tiny_unet"]

TINY_UNET_CONFIG = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}


def tiny_unet(**overrides) -> UNet2DConditionModel:
    """A 2-level cross-attention UNet (5 transformer blocks); ``overrides`` change config keys."""
    return UNet2DConditionModel(**{**TINY_UNET_CONFIG, **overrides})


def open_gated_unet(config: dict, seed: int = 3, lowest_gate: float = 0.3) -> UNet2DConditionModel:
    """diffusers' gated UNet (GLIGEN's and GLIGEN-XL's format) for ``config``, randomly initialised after
    ``torch.manual_seed(seed)``, with every gate ``alpha`` drawn from ``[lowest_gate, 1)`` and the null
    features moved from 0, so that its fusers change the output (at init they are an identity).
    ``config`` is a UNet config; private keys (``_class_name``, ...) are dropped, since diffusers'
    ``from_config`` resets every key named in ``_use_default_values``."""
    import torch

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    torch.manual_seed(seed)
    gated = UNet2DConditionModel.from_config({**config, "attention_type": "gated"}).eval()
    with torch.no_grad():
        for name, p in gated.named_parameters():
            if "alpha_" in name:
                p.uniform_(lowest_gate, 1.0)
            if "null_" in name:
                p.normal_()
    return gated
