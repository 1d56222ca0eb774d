"""diffusers_ext: a GLIGEN-style gated spatial adapter as diffusers attention processors.

``SpatialAdapter.for_unet(unet, phrase_dim).install(unet_or_pipeline)`` adds grounding to a UNet; pass
``cross_attention_kwargs=adapter.cross_attention_kwargs(boxes, phrase_embeds, masks, gate_scale)``.
Importing this package imports diffusers and torch only (no LAVIS, no open_clip).
"""

from diffusers_ext.gated_self_attention import GatedSelfAttnProcessor
from diffusers_ext.grounding import GroundingTokenizer
from diffusers_ext.spatial_adapter import SpatialAdapter

__all__ = ["GatedSelfAttnProcessor", "GroundingTokenizer", "SpatialAdapter"]
