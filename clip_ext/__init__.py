"""open_clip extensions: a memory bank of past embeddings with warmup, FG-CLIP's region losses and diagnostics.

Importing the package registers its tiny model configs with ``open_clip.add_model_config``: at once when
open_clip is already imported, otherwise the moment it is. Importing open_clip (and torch) here eagerly
would make ``python -m clip_ext.train --help`` take as long as a torch import; the same goes for
``MemoryBank`` and ``MemoryBankClipLoss``, which load on first use.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"

__all__ = ["MemoryBank", "MemoryBankClipLoss", "MODEL_CONFIG_DIR"]


def _register(open_clip) -> None:
    open_clip.add_model_config(MODEL_CONFIG_DIR)


class _RegisterWhenImported:
    """A one-shot meta-path finder: lets open_clip load as usual, then registers our configs with it."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "open_clip":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            _register(module)

        loader.exec_module = exec_and_register
        return spec


if "open_clip" in sys.modules:
    _register(sys.modules["open_clip"])
elif not any(isinstance(f, _RegisterWhenImported) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenImported())


def __getattr__(name):
    if name == "MemoryBank":
        from clip_ext.memory_bank import MemoryBank

        return MemoryBank
    if name == "MemoryBankClipLoss":
        from clip_ext.loss import MemoryBankClipLoss

        return MemoryBankClipLoss
    raise AttributeError(f"module 'clip_ext' has no attribute {name!r}")
