"""diffusers_ext: a GLIGEN-style gated spatial adapter as diffusers attention processors.

``load_spatial_adapter(pipe, path_or_repo_or_state_dict)`` loads our adapters, official GLIGEN checkpoints
and diffusers' gated UNets onto a pipeline (``set_spatial_adapter_scale``, ``unload_spatial_adapter``);
``SpatialAdapter.for_unet(unet, phrase_dim).install(unet_or_pipeline)`` builds a new one; pass
``cross_attention_kwargs=adapter.cross_attention_kwargs(boxes, phrase_embeds, masks, gate_scale)``.
Importing this package imports diffusers and torch only (no LAVIS, no open_clip).
"""

from importlib import import_module

# Exports load on first use (PEP 562), so that `python -m diffusers_ext.<cli> --help` answers before torch
# and diffusers are imported; `from diffusers_ext import SpatialAdapter` works as before.
_EXPORTS = {
    "GatedSelfAttnProcessor": "diffusers_ext.gated_self_attention",
    "GroundingTokenizer": "diffusers_ext.grounding_tokenizer",
    "SpatialAdapter": "diffusers_ext.spatial_adapter",
    "load_spatial_adapter": "diffusers_ext.loaders",
    "set_spatial_adapter_scale": "diffusers_ext.loaders",
    "unload_spatial_adapter": "diffusers_ext.loaders",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffusers_ext' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
