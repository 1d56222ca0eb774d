"""open_clip extensions: a memory bank of past embeddings with warmup, logit-scale init and diagnostics.

Importing the package registers its tiny model configs with ``open_clip.add_model_config``;
``python -m clip_ext.train`` is open_clip's own trainer with our flags added.
"""

from pathlib import Path

import open_clip

from clip_ext.loss import MemoryBankClipLoss
from clip_ext.memory_bank import MemoryBank

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

__all__ = ["MemoryBank", "MemoryBankClipLoss", "MODEL_CONFIG_DIR"]
