"""Checkpoints that any open_clip user can load, written as databases write files.

Format. open_clip_train saves ``{"epoch", "name", "state_dict", "optimizer"[, "scaler"]}``. Our extra state
(the memory bank's buffers, the region and hard-negative temperatures, the global RNG state) would make
``open_clip.create_model(..., pretrained=ckpt)`` and ``--pretrained ckpt`` fail on unexpected keys, so it
lives under a separate key, ``checkpoint["clip_ext"]``, that open_clip never reads::

    {"epoch": 3, "name": ..., "state_dict": <plain open_clip weights>, "optimizer": ..., "scaler": ...,
     "clip_ext": {"format": 1, "state_dict": {"memory_bank.image_queue": ..., ...}, "rng": {...}}}

``--resume`` with ``clip_ext.train`` merges it back (:func:`merge_extra_state`); checkpoints of an older
clip_ext, with the extras inside ``state_dict``, still resume, and ``python -m clip_ext.export`` turns either
kind into a plain open_clip state dict.

Atomic writes. open_clip writes ``epoch_N.pt`` in place, so a crash during ``torch.save`` leaves a truncated
file under the final name and ``--resume latest`` picks it. :func:`atomic_save` writes a temporary name in
the same folder, flushes and fsyncs it, then renames it over the old one and fsyncs the folder, with
:func:`vlext.atomic_files.atomic_torch_save`; :func:`latest_complete_checkpoint` skips ``epoch_N.pt`` files
that do not open as complete archives, naming them.
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path

from vlext.atomic_files import atomic_torch_save, newest_complete, torch_file_problem

__all__ = [
    "EXTRA_KEY",
    "EXTRA_PREFIXES",
    "atomic_save",
    "split_extra_state",
    "merge_extra_state",
    "latest_complete_checkpoint",
    "plain_state_dict",
]

EXTRA_KEY = "clip_ext"
FORMAT = 1
# submodules clip_ext adds to an open_clip model; their state is ours, not open_clip's
EXTRA_PREFIXES = ("memory_bank.", "clip_ext_region.")
EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")

logger = logging.getLogger(__name__)


def _is_extra(key: str) -> bool:
    key = key[len("module.") :] if key.startswith("module.") else key
    return key.startswith(EXTRA_PREFIXES)


def _rng_state() -> dict:
    """Global RNG states as tensors and ints (loadable with ``torch.load(weights_only=True)``): open_clip's
    CSV loader shuffles and crops from the global generators, so a resume without them sees other batches."""
    import numpy as np
    import torch

    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(mt, dtype=torch.int64),
        "python_version": version,
        "python_gauss": gauss,
        "numpy": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_gauss": float(np_gauss),
        "numpy_name": np_name,
    }


def restore_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(int(v) for v in state["python"]), state["python_gauss"]))
    np.random.set_state((state["numpy_name"], state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))  # fmt: skip


def split_extra_state(checkpoint, with_rng: bool = True):
    """A training checkpoint dict with our keys moved from ``state_dict`` to ``checkpoint["clip_ext"]``.

    Anything that is not an open_clip training checkpoint (no ``state_dict``) is returned unchanged.
    """
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        return checkpoint
    state = checkpoint["state_dict"]
    extra = {k: v for k, v in state.items() if _is_extra(k)}
    out = dict(checkpoint)
    out["state_dict"] = {k: v for k, v in state.items() if not _is_extra(k)}
    out[EXTRA_KEY] = {"format": FORMAT, "state_dict": extra}
    if with_rng:
        out[EXTRA_KEY]["rng"] = _rng_state()
    return out


def merge_extra_state(checkpoint):
    """The inverse of :func:`split_extra_state`, for ``--resume``: our keys back into ``state_dict``, with
    the ``module.`` prefix of the weights when they carry one (a DDP run's checkpoint)."""
    if not isinstance(checkpoint, dict) or EXTRA_KEY not in checkpoint:
        return checkpoint
    extra = checkpoint[EXTRA_KEY]
    state = dict(checkpoint["state_dict"])
    prefix = "module." if state and next(iter(state)).startswith("module.") else ""
    for key, value in extra.get("state_dict", {}).items():
        key = key[len("module.") :] if key.startswith("module.") else key
        state[prefix + key] = value
    out = dict(checkpoint)
    out["state_dict"] = state
    return out


def plain_state_dict(checkpoint) -> dict:
    """open_clip weights only: a training checkpoint's ``state_dict`` (either format) or a bare state dict,
    without our keys and without DDP's ``module.`` prefix."""
    state = (
        checkpoint["state_dict"]
        if isinstance(checkpoint, dict) and "state_dict" in checkpoint
        else checkpoint
    )
    if not isinstance(state, dict) or not state:
        raise ValueError(
            "not an open_clip checkpoint: expected a state dict or a dict with a 'state_dict' entry"
        )
    strip = next(iter(state)).startswith("module.")
    return {(k[len("module.") :] if strip else k): v for k, v in state.items() if not _is_extra(k)}


def atomic_save(obj, path) -> None:
    """``torch.save`` to a temporary name, flush, fsync, an atomic rename onto ``path``: a reader sees the old
    file or the complete new one, never half of it.

    Args:
        obj: what ``torch.save`` writes (an open_clip training checkpoint dict, a state dict).
        path: the final file name, e.g. ``checkpoints/epoch_3.pt``.

    Example:
        >>> import tempfile, pathlib, torch
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "epoch_1.pt"
        >>> atomic_save({"epoch": 1}, path)
        >>> torch.load(path)["epoch"]
        1
    """
    import torch

    atomic_torch_save(obj, path, torch.save)


def checkpoint_problem(path) -> str | None:
    """Why ``path`` is not a complete torch checkpoint, or None when it is: every member of the archive is
    read and its CRC checked, without unpickling anything."""
    return torch_file_problem(path)


def latest_complete_checkpoint(folder) -> str | None:
    """The ``epoch_N.pt`` with the highest N in ``folder`` that is complete; incomplete ones are skipped with
    a warning naming them. Other files (``epoch_latest.pt``, ``tmp.pt``, our temporary names) are ignored:
    open_clip's own search globs every ``*.pt`` and sorts by name, so a stray ``tmp.pt`` wins there."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    for leftover in sorted(folder.glob(".*.pt.*.tmp")):  # vlext.atomic_files.temp_name of any process
        logger.warning("--resume latest: %s was left by an interrupted save; it is not used (safe to delete)",
                       leftover)  # fmt: skip
    epochs = [p for p in folder.iterdir() if EPOCH_FILE.match(p.name)]
    found, skipped = newest_complete(
        epochs, checkpoint_problem, key=lambda p: int(EPOCH_FILE.match(p.name).group(1))
    )
    for path, problem in skipped:
        logger.warning("--resume latest: skipping %s, it is not a complete checkpoint (%s)", path, problem)
    return None if found is None else str(found)
