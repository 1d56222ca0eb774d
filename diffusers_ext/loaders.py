"""Load, scale and unload the spatial adapter on a pipeline the way diffusers loads its own adapters.

``load_spatial_adapter(pipe, pretrained_model_name_or_path_or_dict, subfolder=None, weight_name=None)``
follows diffusers' ``load_ip_adapter``: a hub id, a local folder or file, or a state dict. Three formats
are recognised, so published GLIGEN weights load in one call:

- an official GLIGEN checkpoint (gligen/GLIGEN: a ``.pth`` whose ``model`` holds the base UNet, the fusers
  and the position net in LDM naming), converted with diffusers' own ``convert_ldm_unet_checkpoint``;
- a diffusers-format gated UNet (``unet/config.json`` with ``attention_type: "gated"``, the layout of the
  diffusers-converted GLIGEN models on the hub);
- our own ``SpatialAdapter.save_pretrained`` folder (or its safetensors state dict).

GLIGEN trained its fusers against the UNet stored beside them, so for the first two the base UNet weights
are loaded into ``pipe.unet`` too (``load_base_unet=False`` keeps the pipeline's UNet and adds only the
grounding). ``set_spatial_adapter_scale`` and ``unload_spatial_adapter`` mirror ``set_ip_adapter_scale``
and ``unload_ip_adapter``; IP-Adapter can be loaded before or after (see ``SpatialAdapter.install``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffusers_ext.gligen_conversion import (
    adapter_from_gated_state_dict,
    gated_state_dict_from_gligen_checkpoint,
)
from diffusers_ext.spatial_adapter import SpatialAdapter, installed_adapter

__all__ = ["load_spatial_adapter", "set_spatial_adapter_scale", "unload_spatial_adapter"]

_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")
_OUR_WEIGHTS = "diffusion_pytorch_model.safetensors"


def _read_weights(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"spatial adapter weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: name it, never use it
        raise ValueError(
            f"could not read {path} as a torch checkpoint ({type(err).__name__}: {err})"
        ) from err


def _hub_folder(repo_id: str, subfolder: str | None, weight_name: str | None, hub: dict) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        if weight_name is not None:
            return Path(hf_hub_download(repo_id, weight_name, subfolder=subfolder, **hub)).parent
        patterns = [f"{subfolder}/*"] if subfolder else None
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns, **hub))
        return folder / subfolder if subfolder else folder
    except Exception as err:
        raise OSError(
            f"{repo_id!r} is neither a local file or folder nor reachable on the Hugging Face hub "
            f"({type(err).__name__}: {err}); pass a local path, a state dict, or a hub id when online"
        ) from err


def _is_gated_unet_config(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("attention_type") == "gated"
    except (OSError, ValueError):
        return False


def _from_folder(pipe, folder: Path, weight_name: str | None):
    """-> ("ours", adapter) | ("gated", state_dict) | ("official", checkpoint)."""
    if weight_name is not None:
        return _classify(_read_weights(folder / weight_name), pipe, folder / weight_name)
    config = folder / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("_class_name") == SpatialAdapter.__name__:
        adapter, info = SpatialAdapter.from_pretrained(folder, output_loading_info=True)
        # diffusers leaves a missing tensor on the meta device (or random) and only warns; refuse it here
        wrong = {k: v for k, v in info.items() if v}
        if wrong:
            details = "; ".join(f"{k}: {len(v)}, first {list(v)[:3]}" for k, v in wrong.items())
            raise ValueError(
                f"{folder}: its weights do not match its config.json ({details}); the folder is incomplete "
                "or from another adapter. Save it again with SpatialAdapter.save_pretrained"
            )
        return "ours", adapter
    for unet_config in (folder / "config.json", folder / "unet" / "config.json"):
        if _is_gated_unet_config(unet_config):
            from diffusers import UNet2DConditionModel

            # in the pipeline's dtype: GLIGEN-XL's gated UNet is 4.4 B parameters, 17.5 GB of host memory in
            # fp32 against 8.7 GB in fp16, and both halves end in pipe.unet's dtype anyway
            gated = UNet2DConditionModel.from_pretrained(unet_config.parent, torch_dtype=pipe.unet.dtype)
            return "gated", gated.state_dict()
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise ValueError(
        f"{folder} holds no spatial adapter: expected our save_pretrained folder (config.json with "
        f"_class_name SpatialAdapter), a diffusers gated UNet (config.json or unet/config.json with "
        f"attention_type 'gated'), or weight_name= naming a GLIGEN .pth in it; found {found[:8]}"
    )


def _classify(state: dict, pipe, where) -> tuple[str, object]:
    if not isinstance(state, dict):
        raise ValueError(f"{where}: expected a state dict, got {type(state).__name__}")
    inner = state.get("model") if isinstance(state.get("model"), dict) else state
    keys = list(inner)
    if any(
        ".fuser." in k and ("input_blocks" in k or "middle_block" in k or "output_blocks" in k) for k in keys
    ):
        return "official", state
    if any(".fuser." in k for k in keys):
        return "gated", inner
    if any(k.startswith("fusers.") for k in keys) and any(k.startswith("position_net.") for k in keys):
        return "ours", _adapter_from_our_state_dict(inner, pipe)
    raise ValueError(
        f"{where}: not spatial-adapter weights: no GLIGEN '.fuser.' keys and no 'fusers.'/'position_net.' keys "
        f"(first keys: {keys[:4]})"
    )


def _adapter_from_our_state_dict(state: dict, pipe) -> SpatialAdapter:
    """Our safetensors without its config.json: shape an adapter for every block of ``pipe.unet`` from the
    tensors' shapes (the layout ``SpatialAdapter.for_unet`` builds by default)."""
    first = state["position_net.linears.0.weight"]
    position_dim = state["position_net.null_position_feature"].numel()
    adapter = SpatialAdapter.for_unet(
        pipe.unet,
        phrase_dim=first.shape[1] - position_dim,
        token_dim=state["position_net.linears.4.weight"].shape[0],
        hidden_dim=first.shape[0],
        fourier_freqs=position_dim // 8,
        phrase_norm="position_net.phrase_ln.weight" in state,
    )
    adapter.load_state_dict(state, strict=True)
    return adapter


def _load_base(unet, base: dict, where) -> None:
    own = {k for k in unet.state_dict() if ".processor." not in k}
    missing, unexpected = sorted(own - set(base)), sorted(set(base) - own)
    if missing or unexpected:
        raise ValueError(
            f"{where}: its base UNet does not fit pipe.unet ({len(missing)} weights missing, first {missing[:2]}; "
            f"{len(unexpected)} unexpected, first {unexpected[:2]}); pass load_base_unet=False to keep pipe.unet "
            "and load only the grounding"
        )
    for key, value in unet.state_dict().items():
        if key in base and tuple(base[key].shape) != tuple(value.shape):
            raise ValueError(
                f"{where}: base weight {key} has shape {tuple(base[key].shape)}, pipe.unet {tuple(value.shape)}"
            )
    unet.load_state_dict(base, strict=False)


def load_spatial_adapter(
    pipe,
    pretrained_model_name_or_path_or_dict,
    subfolder: str | None = None,
    weight_name: str | None = None,
    *,
    load_base_unet: bool = True,
    **kwargs,
) -> SpatialAdapter:
    """Load a spatial adapter and install it on ``pipe``, the way ``load_ip_adapter`` loads an IP-Adapter.

    Three formats are recognised from their keys: our ``save_pretrained`` folder, an official GLIGEN
    checkpoint (``{"model": ...}``) and a diffusers gated UNet (``StableDiffusionGLIGENPipeline``'s
    ``unet``). The last two carry a whole UNet; its base weights are loaded too unless
    ``load_base_unet=False``.

    Args:
        pipe: a diffusers pipeline with a ``unet`` (SD 1.x/2.x, SDXL, Kolors).
        pretrained_model_name_or_path_or_dict: a local folder or file, a hub repo id, or a state dict.
        subfolder: the folder inside the repo or folder that holds the weights.
        weight_name: the weights file's name inside the folder.
        load_base_unet: for GLIGEN checkpoints and gated UNets, load their base UNet weights as well.
        **kwargs: the hub options of ``load_ip_adapter`` (``cache_dir``, ``force_download``, ``proxies``,
            ``local_files_only``, ``token``, ``revision``); any other key is refused.

    Returns:
        The installed :class:`~diffusers_ext.SpatialAdapter`.

    Example:
        >>> from diffusers_ext import SpatialAdapter, load_spatial_adapter, unload_spatial_adapter
        >>> from diffusers_ext.testing.tiny_pipelines import tiny_sd_pipeline
        >>> import tempfile
        >>> pipe = tiny_sd_pipeline()
        >>> folder = tempfile.mkdtemp()
        >>> SpatialAdapter.for_unet(pipe.unet, 32, hidden_dim=32).save_pretrained(folder)
        >>> adapter = load_spatial_adapter(pipe, folder)
        >>> unload_spatial_adapter(pipe)
    """
    unknown = sorted(set(kwargs) - set(_HUB_KWARGS))
    if unknown:
        raise TypeError(
            f"load_spatial_adapter got unknown arguments {unknown}; accepted: {list(_HUB_KWARGS)}"
        )
    if not hasattr(pipe, "unet"):
        raise TypeError(f"load_spatial_adapter needs a pipeline with a .unet, got {type(pipe).__name__}")
    if installed_adapter(pipe) is not None:
        raise RuntimeError(
            "this pipeline already carries a spatial adapter; call unload_spatial_adapter(pipe) first"
        )
    source = pretrained_model_name_or_path_or_dict
    if isinstance(source, dict):
        kind, loaded = _classify(source, pipe, "the given state dict")
        where = "the given state dict"
    else:
        path = Path(source)
        where = str(path)
        if path.is_file():
            kind, loaded = _classify(_read_weights(path), pipe, path)
        else:
            folder = path / subfolder if subfolder and path.is_dir() else path
            if not folder.is_dir():
                folder = _hub_folder(str(source), subfolder, weight_name, kwargs)
            kind, loaded = _from_folder(pipe, folder, weight_name)
    unet = pipe.unet
    if kind == "ours":
        adapter = loaded
    else:
        gated = gated_state_dict_from_gligen_checkpoint(loaded, unet) if kind == "official" else loaded
        adapter, base = adapter_from_gated_state_dict(gated, unet)
        if load_base_unet:
            _load_base(unet, base, where)
    if next(adapter.parameters()).dtype != unet.dtype:
        adapter.to(dtype=unet.dtype)
    adapter.install(pipe)  # moves the adapter to the UNet's device
    return adapter


def _require(pipe) -> SpatialAdapter:
    adapter = installed_adapter(pipe)
    if adapter is None:
        raise RuntimeError(
            "no spatial adapter is installed on this pipeline; call load_spatial_adapter(pipe, ...)"
        )
    return adapter


def set_spatial_adapter_scale(pipe, scale: float) -> None:
    """Scale every gate of the installed adapter, like ``set_ip_adapter_scale``.

    Args:
        pipe: a pipeline carrying an adapter (:func:`load_spatial_adapter`).
        scale: 0 turns the adapter off, 1 is as trained; values above 1 push layouts harder.

    Example:
        >>> set_spatial_adapter_scale(pipe, 0.5)  # doctest: +SKIP
    """
    _require(pipe).set_scale(scale)


def unload_spatial_adapter(pipe) -> None:
    """Remove the installed adapter, like ``unload_ip_adapter``: the processors it replaced come back;
    IP-Adapter and LoRA stay.

    Args:
        pipe: a pipeline carrying an adapter (:func:`load_spatial_adapter`).

    Example:
        >>> unload_spatial_adapter(pipe)  # doctest: +SKIP
    """
    _require(pipe).remove()
