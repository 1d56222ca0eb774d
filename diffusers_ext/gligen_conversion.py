"""Exact GLIGEN weight compatibility: diffusers' gated UNet and official GLIGEN checkpoints <-> SpatialAdapter.

GLIGEN's weights exist in two namings. diffusers' ``UNet2DConditionModel(attention_type="gated")`` keeps a
``GatedSelfAttentionDense`` as ``<block>.fuser`` inside every ``BasicTransformerBlock`` and the grounding
MLP as ``position_net``; the official repository (gligen/GLIGEN) uses the same module names inside LDM's
``input_blocks.K.1`` / ``middle_block.1`` / ``output_blocks.K.1`` layout. Both store ``attn.to_q``,
``attn.to_out.0``, ``ff.net.0.proj`` and ``ff.net.2`` inside the fuser; our processor keeps flat names
(``to_q``, ``to_out``, ``ff_in``, ``ff_out``). The diffusers GLIGEN pipeline is deprecated, so converting
the weights into processor form is how GLIGEN keeps running on current diffusers.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from diffusers_ext.spatial_adapter import SpatialAdapter, transformer_blocks
from vlext.atomic_files import atomic_torch_save

__all__ = [
    "adapter_from_gated_state_dict",
    "adapter_from_gated_unet",
    "adapter_from_gligen_checkpoint",
    "adapter_to_gated_state_dict",
    "adapter_to_gligen_checkpoint",
    "diffusers_to_ldm_block_name",
    "gated_state_dict_from_gligen_checkpoint",
    "gligen_checkpoint",
    "save_gligen_checkpoint",
    "unet_key_to_ldm",
]

# processor parameter suffix -> GLIGEN fuser parameter suffix (same in diffusers and the official repo)
_FUSER_KEYS = {
    "linear": "linear",
    "norm1": "norm1",
    "norm2": "norm2",
    "to_q": "attn.to_q",
    "to_k": "attn.to_k",
    "to_v": "attn.to_v",
    "to_out": "attn.to_out.0",
    "ff_in": "ff.net.0.proj",
    "ff_out": "ff.net.2",
    "alpha_attn": "alpha_attn",
    "alpha_dense": "alpha_dense",
}
_OFFICIAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "module.")


def _to_gligen_suffix(param: str) -> str:
    head, _, tail = param.partition(".")
    if head not in _FUSER_KEYS:
        raise KeyError(f"unexpected fuser parameter {param!r}")
    return f"{_FUSER_KEYS[head]}.{tail}" if tail else _FUSER_KEYS[head]


def _adapter_state_dict_from(fuser_sd: dict[str, dict], position_sd: dict, adapter: SpatialAdapter) -> dict:
    out = {f"position_net.{k}": v for k, v in position_sd.items()}
    for i, name in enumerate(adapter.layer_names):
        if name not in fuser_sd:
            raise KeyError(f"the GLIGEN weights have no fuser for block {name}")
        src = fuser_sd[name]
        for param in adapter.fusers[i].state_dict():
            key = _to_gligen_suffix(param)
            if key not in src:
                raise KeyError(f"GLIGEN fuser of block {name} lacks {key!r}; found {sorted(src)[:6]}...")
            out[f"fusers.{i}.{param}"] = src[key]
    return out


def _build(unet, fuser_sd: dict[str, dict], position_sd: dict) -> SpatialAdapter:
    if "linears.0.weight" not in position_sd:
        raise KeyError(
            "GLIGEN position_net weights not found (expected 'position_net.linears.0.weight'; only the "
            "text-only 'gated' position net is supported, not 'gated-text-image')"
        )
    first = position_sd["linears.0.weight"]
    position_dim = position_sd["null_position_feature"].numel()
    phrase_dim = first.shape[1] - position_dim
    adapter = SpatialAdapter.for_unet(
        unet,
        phrase_dim=phrase_dim,
        layers=sorted(fuser_sd),
        token_dim=position_sd["linears.4.weight"].shape[0],
        hidden_dim=first.shape[0],
        fourier_freqs=position_dim // 8,
        phrase_norm=False,
    )
    sd = _adapter_state_dict_from(fuser_sd, position_sd, adapter)
    adapter.load_state_dict(sd, strict=True)
    return adapter


def adapter_from_gated_unet(gated_unet) -> SpatialAdapter:
    """A SpatialAdapter holding the fusers and position net of a ``attention_type="gated"`` UNet.

    Install it on a plain UNet with the gated UNet's other weights and the outputs match diffusers'
    native GLIGEN path (tests/test_diffusers_gligen_compat.py, 1e-5).
    """
    if getattr(gated_unet.config, "attention_type", None) != "gated":
        raise ValueError(
            f"expected a UNet2DConditionModel with attention_type='gated', got "
            f"attention_type={getattr(gated_unet.config, 'attention_type', None)!r}"
        )
    fuser_sd = {
        name: block.fuser.state_dict()
        for name, block in transformer_blocks(gated_unet).items()
        if getattr(block, "fuser", None) is not None
    }
    return _build(gated_unet, fuser_sd, gated_unet.position_net.state_dict())


def adapter_to_gated_state_dict(adapter: SpatialAdapter) -> dict[str, torch.Tensor]:
    """The adapter's weights under diffusers' gated-UNet keys (``<block>.fuser.*``, ``position_net.*``), for
    ``gated_unet.load_state_dict(..., strict=False)``."""
    if adapter.config.phrase_norm:
        raise ValueError(
            "this adapter has phrase_norm=True: a LayerNorm on the phrase features that GLIGEN's position net "
            "does not have (we add it for ChatGLM's large-scale features), so GLIGEN and diffusers' gated UNet "
            "could not run it and the weights would mean something else there. Only adapters built with "
            "phrase_norm=False (GLIGEN's own, and every converted GLIGEN checkpoint) export to GLIGEN format."
        )
    out = {f"position_net.{k}": v for k, v in adapter.position_net.state_dict().items()}
    for name, fuser in zip(adapter.layer_names, adapter.fusers, strict=True):
        for param, value in fuser.state_dict().items():
            out[f"{name}.fuser.{_to_gligen_suffix(param)}"] = value
    return out


def diffusers_to_ldm_block_name(name: str, layers_per_block: int) -> str:
    """``down_blocks.1.attentions.0.transformer_blocks.0`` -> ``input_blocks.4.1.transformer_blocks.0`` (LDM's
    UNet numbers its input blocks after conv_in, with one downsampler per level; output levels hold
    ``layers_per_block + 1`` blocks)."""
    step = layers_per_block + 1
    m = re.fullmatch(
        r"(down_blocks|up_blocks|mid_block)\.(?:(\d+)\.)?attentions\.(\d+)\.(transformer_blocks\.\d+)", name
    )
    if m is None:
        raise ValueError(f"{name!r} is not a UNet2DConditionModel transformer block name")
    kind, level, j, rest = m.group(1), m.group(2), int(m.group(3)), m.group(4)
    if kind == "mid_block":
        return f"middle_block.1.{rest}"
    if kind == "down_blocks":
        return f"input_blocks.{1 + int(level) * step + j}.1.{rest}"
    return f"output_blocks.{int(level) * step + j}.1.{rest}"


def _layers_per_block(unet) -> int:
    lpb = unet.config.layers_per_block
    if not isinstance(lpb, int):
        raise ValueError(f"LDM block numbering needs one layers_per_block for all levels, got {lpb}")
    return lpb


def adapter_from_gligen_checkpoint(state_dict: dict, unet) -> SpatialAdapter:
    """A SpatialAdapter from an official GLIGEN checkpoint's ``model`` state dict (or the whole checkpoint).

    ``unet`` is the diffusers UNet the adapter is for; it fixes the block layout. Keys may carry the
    ``model.diffusion_model.`` prefix; everything that is not a fuser or the position net is ignored.
    """
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    clean = {}
    for key, value in state_dict.items():
        for prefix in _OFFICIAL_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        clean[key] = value
    lpb = _layers_per_block(unet)
    ldm_to_diffusers = {diffusers_to_ldm_block_name(n, lpb): n for n in transformer_blocks(unet)}
    fuser_sd: dict[str, dict] = {}
    for key, value in clean.items():
        block, sep, param = key.partition(".fuser.")
        if not sep:
            continue
        if block not in ldm_to_diffusers:
            raise KeyError(
                f"checkpoint fuser {block!r} has no matching block in this UNet ({len(ldm_to_diffusers)} blocks)"
            )
        fuser_sd.setdefault(ldm_to_diffusers[block], {})[param] = value
    if not fuser_sd:
        raise KeyError("no '.fuser.' keys found: this is not a GLIGEN checkpoint")
    position_sd = {k[len("position_net.") :]: v for k, v in clean.items() if k.startswith("position_net.")}
    return _build(unet, fuser_sd, position_sd)


def adapter_to_gligen_checkpoint(adapter: SpatialAdapter, unet) -> dict[str, torch.Tensor]:
    """The adapter's weights under the official GLIGEN key names (LDM block numbering, no prefix)."""
    lpb = _layers_per_block(unet)
    out = {}
    for key, value in adapter_to_gated_state_dict(adapter).items():
        block, sep, param = key.partition(".fuser.")
        out[f"{diffusers_to_ldm_block_name(block, lpb)}.fuser.{param}" if sep else key] = value
    return out


# --- whole checkpoints: base UNet + fusers + position net -------------------------------------------------

_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_DIRECT_TO_LDM = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _resnet_to_ldm(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET_TO_LDM[head]}.{tail}"


def _check_sd_layout(unet) -> None:
    cfg = unet.config
    extra = [k for k in ("addition_embed_type", "class_embed_type", "encoder_hid_dim_type") if cfg.get(k)]
    if extra or cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise ValueError(
            f"GLIGEN checkpoints hold SD1.x-layout UNets; this UNet has {extra or cfg.get('mid_block_type')} "
            "(SDXL/Kolors-style conditioning or another mid block), which LDM's GLIGEN UNet cannot express"
        )
    _layers_per_block(unet)


def unet_key_to_ldm(key: str, unet) -> str:
    """A diffusers ``UNet2DConditionModel`` (gated or plain) state-dict key -> its name in LDM's UNet, the
    naming of GLIGEN's checkpoints; the inverse of diffusers' ``convert_ldm_unet_checkpoint``."""
    lpb, step = unet.config.layers_per_block, unet.config.layers_per_block + 1
    head, _, param = key.rpartition(".")
    if head in _DIRECT_TO_LDM:
        return f"{_DIRECT_TO_LDM[head]}.{param}"
    if key.startswith("position_net."):
        return key
    m = re.fullmatch(
        r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", key
    )
    if m:
        kind, level, part, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if part == "downsamplers":
            return f"input_blocks.{(level + 1) * step}.0.op.{rest.removeprefix('conv.')}"
        if part == "upsamplers":
            has_attn = unet.config.up_block_types[level].startswith("CrossAttn")
            return f"output_blocks.{level * step + lpb}.{2 if has_attn else 1}.{rest}"
        idx = 1 + level * step + j if kind == "down" else level * step + j
        prefix = "input_blocks" if kind == "down" else "output_blocks"
        return f"{prefix}.{idx}.0.{_resnet_to_ldm(rest)}" if part == "resnets" else f"{prefix}.{idx}.1.{rest}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        part, j, rest = m.group(1), int(m.group(2)), m.group(3)
        return (
            f"middle_block.{2 * j}.{_resnet_to_ldm(rest)}" if part == "resnets" else f"middle_block.1.{rest}"
        )
    raise KeyError(f"{key!r} has no place in LDM's SD1.x UNet layout")


def gligen_checkpoint(adapter: SpatialAdapter, unet) -> dict:
    """A complete official-format GLIGEN checkpoint ``{"model": state_dict}``: ``unet``'s base weights and the
    adapter's fusers and position net, all in LDM naming (what gligen/GLIGEN saves, and what diffusers'
    ``scripts/convert_gligen_to_diffusers.py`` reads back into a gated UNet). Refuses ``phrase_norm=True``."""
    _check_sd_layout(unet)
    state = {k: v for k, v in unet.state_dict().items() if ".processor." not in k}
    state.update(adapter_to_gated_state_dict(adapter))
    return {"model": {unet_key_to_ldm(k, unet): v.detach().cpu().clone() for k, v in state.items()}}


def save_gligen_checkpoint(adapter: SpatialAdapter, unet, path: str | os.PathLike) -> Path:
    """Write ``adapter`` on ``unet`` as an official GLIGEN checkpoint (:func:`gligen_checkpoint`: the whole
    grounded UNet in GLIGEN's ldm key names, ``{"model": ...}``), atomically with ``torch.save``
    (:func:`vlext.atomic_files.atomic_torch_save`: temporary name, fsync, rename).

    Args:
        adapter: a :class:`~diffusers_ext.SpatialAdapter` shaped for ``unet`` (every SD1.x block).
        unet: the SD1.x UNet the adapter was trained on.
        path: the file to write, e.g. ``gligen_ours.pth``.

    Returns:
        ``path`` as a ``Path``; GLIGEN's own code and :func:`diffusers_ext.load_spatial_adapter` load it.

    Example:
        >>> from diffusers_ext import SpatialAdapter, save_gligen_checkpoint  # doctest: +SKIP
        >>> save_gligen_checkpoint(adapter, pipe.unet, "gligen_ours.pth")  # doctest: +SKIP
    """
    path = Path(path)
    checkpoint = gligen_checkpoint(adapter, unet)
    return atomic_torch_save(checkpoint, path, torch.save)


def gated_state_dict_from_gligen_checkpoint(checkpoint: dict, unet) -> dict[str, torch.Tensor]:
    """An official GLIGEN checkpoint (``{"model": ...}`` or its ``model`` dict, keys with or without
    ``model.diffusion_model.``) -> the state dict of diffusers' gated UNet with ``unet``'s config. The base
    UNet goes through diffusers' own ``convert_ldm_unet_checkpoint``; fusers ride along inside the attention
    blocks and the position net keeps its names, as in diffusers' GLIGEN conversion script."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    _check_sd_layout(unet)
    model = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(model, dict) or not model:
        raise ValueError("a GLIGEN checkpoint is a dict whose 'model' entry holds the UNet state dict")
    clean = {}
    for key, value in model.items():
        for prefix in _OFFICIAL_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        clean[key] = value
    if not any(".fuser." in k for k in clean):
        raise KeyError("no '.fuser.' keys found: this is not a GLIGEN checkpoint")
    converted = convert_ldm_unet_checkpoint(
        {f"model.diffusion_model.{k}": v for k, v in clean.items()}, dict(unet.config)
    )
    converted.update({k: v for k, v in clean.items() if k.startswith("position_net.")})
    return converted


def adapter_from_gated_state_dict(state_dict: dict, unet) -> tuple[SpatialAdapter, dict]:
    """Split a gated-UNet state dict into ``(adapter, base_state_dict)``: the fusers and position net as a
    SpatialAdapter for ``unet``, and the remaining keys (the base UNet's weights)."""
    fuser_sd: dict[str, dict] = {}
    base = {}
    blocks = transformer_blocks(unet)
    for key, value in state_dict.items():
        block, sep, param = key.partition(".fuser.")
        if sep:
            if block not in blocks:
                raise KeyError(f"fuser {block!r} has no matching transformer block in this UNet")
            fuser_sd.setdefault(block, {})[param] = value
        elif not key.startswith("position_net."):
            base[key] = value
    if not fuser_sd:
        raise KeyError("no '.fuser.' keys found: these are not GLIGEN (gated UNet) weights")
    position_sd = {
        k[len("position_net.") :]: v for k, v in state_dict.items() if k.startswith("position_net.")
    }
    return _build(unet, fuser_sd, position_sd), base
