"""Tiny, offline diffusers models built from configs: the UNets tests, benchmarks and the demo use.

Nothing here downloads weights; every model is randomly initialised from a config small enough to run
a forward pass on CPU in milliseconds.
"""

from __future__ import annotations

from diffusers import UNet2DConditionModel

__all__ = ["TINY_UNET_CONFIG", "tiny_unet"]

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
