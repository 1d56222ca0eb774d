"""open_clip extensions: a memory bank of past embeddings with warmup, FG-CLIP's region losses and diagnostics.

Importing the package registers its tiny model configs with ``open_clip.add_model_config``: at once when
open_clip is already imported, otherwise the moment it is. Importing open_clip (and torch) here eagerly
would make ``python -m clip_ext.train --help`` take as long as a torch import; the same goes for
``MemoryBank`` and ``MemoryBankClipLoss``, which load on first use (:mod:`vlext.lazy_exports`).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from vlext.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from clip_ext.loss import MemoryBankClipLoss as MemoryBankClipLoss
    from clip_ext.memory_bank import MemoryBank as MemoryBank

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"

_EXPORTS = {"MemoryBank": "clip_ext.memory_bank", "MemoryBankClipLoss": "clip_ext.loss"}


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


__getattr__, __dir__, _LAZY = lazy_exports(__name__, _EXPORTS)
__all__ = [*_LAZY, "MODEL_CONFIG_DIR"]
