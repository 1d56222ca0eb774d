"""diffusers_ext: a GLIGEN-style gated spatial adapter as diffusers attention processors.

``load_spatial_adapter(pipe, path_or_repo_or_state_dict)`` loads our adapters, official GLIGEN checkpoints
and diffusers' gated UNets onto a pipeline (``set_spatial_adapter_scale``, ``unload_spatial_adapter``);
``SpatialAdapter.for_unet(unet, phrase_dim(pipe)).install(pipe)`` builds a new one; ``generate(pipe, adapter,
prompts, phrases, boxes)`` generates with it (``encode_phrases`` gives the phrase features it uses), and
``save_gligen_checkpoint`` writes it as an official GLIGEN checkpoint. Importing this package imports
neither torch nor diffusers: each name loads on first use (:mod:`vlext.lazy_exports`), so
``python -m diffusers_ext.<cli> --help`` answers at once.
"""

from typing import TYPE_CHECKING

from diffusers_ext._quiet import quiet_4bit_notice
from vlext.lazy_exports import lazy_exports

quiet_4bit_notice()  # before diffusers imports bitsandbytes (diffusers_ext/_quiet.py says why)

if TYPE_CHECKING:
    from diffusers_ext.gated_self_attention import GatedSelfAttnProcessor as GatedSelfAttnProcessor
    from diffusers_ext.generation import encode_phrases as encode_phrases
    from diffusers_ext.generation import generate as generate
    from diffusers_ext.generation import phrase_dim as phrase_dim
    from diffusers_ext.gligen_conversion import save_gligen_checkpoint as save_gligen_checkpoint
    from diffusers_ext.loaders import load_spatial_adapter as load_spatial_adapter
    from diffusers_ext.loaders import set_spatial_adapter_scale as set_spatial_adapter_scale
    from diffusers_ext.loaders import unload_spatial_adapter as unload_spatial_adapter
    from diffusers_ext.spatial_adapter import SpatialAdapter as SpatialAdapter

_EXPORTS = {
    "GatedSelfAttnProcessor": "diffusers_ext.gated_self_attention",
    "SpatialAdapter": "diffusers_ext.spatial_adapter",
    "encode_phrases": "diffusers_ext.generation",
    "generate": "diffusers_ext.generation",
    "load_spatial_adapter": "diffusers_ext.loaders",
    "phrase_dim": "diffusers_ext.generation",
    "save_gligen_checkpoint": "diffusers_ext.gligen_conversion",
    "set_spatial_adapter_scale": "diffusers_ext.loaders",
    "unload_spatial_adapter": "diffusers_ext.loaders",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
