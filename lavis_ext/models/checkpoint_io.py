"""Read every published checkpoint layout of SPRC / BLIP-2 as one ``(state_dict, meta)`` pair.

Three layouts are in circulation and LAVIS's loader knows only the second:

- SPRC's releases (``src/utils.py``, ``save_model``): ``{"epoch": n, "Blip2QformerCirAlignPrompt": state_dict}``,
  the state dict stored under the model's class name;
- LAVIS checkpoints (runner and published BLIP-2 weights): ``{"model": state_dict, "optimizer", "config",
  "scaler", "epoch"}`` (only ``model`` required);
- a bare state dict (every value a tensor), as ``torch.save(model.state_dict())`` or safetensors write it.

Anything else is refused naming the file and the top-level keys it holds, so a wrong file never loads as
"no matching keys". A truncated or corrupt file is named too, never half-used.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["CheckpointFormatError", "read_state_dict", "ACCEPTED_FORMATS"]

ACCEPTED_FORMATS = (
    "SPRC {'epoch': n, 'Blip2QformerCirAlignPrompt': state_dict}; "
    "LAVIS {'model': state_dict, 'optimizer', 'config', 'scaler', 'epoch'}; "
    "a bare state dict (every value a tensor)"
)
# SPRC names the entry after the saved module's class; under DDP that class is the wrapper.
_SPRC_NAMES = ("Blip2QformerCirAlignPrompt", "DistributedDataParallel")


class CheckpointFormatError(ValueError):
    """A checkpoint file that cannot be read, or whose layout is none of :data:`ACCEPTED_FORMATS`."""


def _is_state_dict(value) -> bool:
    return (
        isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())
    )


def _load_file(path: str):
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as err:  # safetensors raises its own error types for truncated headers
            raise CheckpointFormatError(
                f"checkpoint {path} cannot be read as safetensors (truncated or corrupt?): {err}"
            ) from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if "Weights only load failed" in str(err):
            raise CheckpointFormatError(
                f"checkpoint {path} holds Python objects other than tensors and plain containers, which are "
                f"not loaded (unpickling runs code); accepted: {ACCEPTED_FORMATS}"
            ) from err
        raise CheckpointFormatError(
            f"checkpoint {path} cannot be read (truncated or corrupt?): {type(err).__name__}: {err}"
        ) from err


def resolve_checkpoint_path(url_or_filename: str | os.PathLike) -> str:
    """A local file path for ``url_or_filename``: URLs go through LAVIS's download cache, as LAVIS loads them."""
    name = str(url_or_filename)
    if name.startswith(("http://", "https://")):
        from lavis.common.dist_utils import download_cached_file

        return download_cached_file(name, check_hash=False, progress=True)
    if not Path(name).is_file():
        raise FileNotFoundError(f"checkpoint {name} does not exist (absolute: {Path(name).resolve()})")
    return name


def read_state_dict(url_or_filename: str | os.PathLike) -> tuple[dict, dict]:
    """``(state_dict, meta)`` from an SPRC, LAVIS or bare-state-dict checkpoint (path or URL).

    ``meta`` has ``format`` ("sprc", "lavis" or "state_dict"), ``path``, and the file's other top-level
    entries (``epoch``, LAVIS's ``optimizer``, ``config``, ``scaler``) for whoever resumes from it.
    """
    path = resolve_checkpoint_path(url_or_filename)
    checkpoint = _load_file(path)
    if not isinstance(checkpoint, dict):
        raise CheckpointFormatError(
            f"checkpoint {path} holds a {type(checkpoint).__name__}, not a dict; accepted: {ACCEPTED_FORMATS}"
        )
    if _is_state_dict(checkpoint):
        return dict(checkpoint), {"format": "state_dict", "path": path}
    if _is_state_dict(checkpoint.get("model")):
        meta = {k: v for k, v in checkpoint.items() if k != "model"}
        return dict(checkpoint["model"]), {**meta, "format": "lavis", "path": path}
    sprc = [name for name in _SPRC_NAMES if _is_state_dict(checkpoint.get(name))]
    others = set(checkpoint) - {*sprc, "epoch"}
    if len(sprc) == 1 and not others:
        state_dict = dict(checkpoint[sprc[0]])
        if sprc[0] == "DistributedDataParallel":
            state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
        return state_dict, {"format": "sprc", "path": path, "epoch": checkpoint.get("epoch")}
    found = sorted(map(str, checkpoint))
    if len(found) > 12:
        found = [*found[:12], f"... ({len(checkpoint)} in all)"]
    raise CheckpointFormatError(
        f"checkpoint {path} has an unknown layout, top-level keys {found}; accepted: {ACCEPTED_FORMATS}"
    )
