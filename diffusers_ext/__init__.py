"""diffusers_ext: a GLIGEN-style gated spatial adapter as diffusers attention processors.

``load_spatial_adapter(pipe, path_or_repo_or_state_dict)`` loads our adapters, official GLIGEN checkpoints
and diffusers' gated UNets onto a pipeline (``set_spatial_adapter_scale``, ``unload_spatial_adapter``);
``SpatialAdapter.for_unet(unet, phrase_dim).install(unet_or_pipeline)`` builds a new one; pass
``cross_attention_kwargs=adapter.cross_attention_kwargs(boxes, phrase_embeds, masks, gate_scale)``.
Importing this package imports diffusers and torch only (no LAVIS, no open_clip).
"""

from diffusers_ext.gated_self_attention import GatedSelfAttnProcessor
from diffusers_ext.grounding import GroundingTokenizer
from diffusers_ext.loaders import load_spatial_adapter, set_spatial_adapter_scale, unload_spatial_adapter
from diffusers_ext.spatial_adapter import SpatialAdapter

__all__ = [
    "GatedSelfAttnProcessor",
    "GroundingTokenizer",
    "SpatialAdapter",
    "load_spatial_adapter",
    "set_spatial_adapter_scale",
    "unload_spatial_adapter",
]
