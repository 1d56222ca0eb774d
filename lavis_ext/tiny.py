"""Offline building blocks for the ``tiny`` model type: a toy-world BERT vocabulary and a tiny BertConfig.

LAVIS builds BLIP-2 from ``bert-base-uncased`` and EVA ViT-g downloaded from the network; tests, CI and the
demo run with no network, so the ``tiny`` type reads a vocabulary made from the toy world's words and a
small BertConfig written here into a cache folder. Sizes come from the model YAML (``tiny_bert``), not
from this file. The tokenizer is loaded with ``BertTokenizer.from_pretrained(folder)``: in transformers 5
``BertTokenizer(vocab_file=...)`` silently ignores the file and maps every word to [UNK].
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

__all__ = ["CACHE_ENV", "tiny_bert_folder", "toy_vocabulary"]

CACHE_ENV = "LAVIS_EXT_TINY_DIR"
_SPECIAL = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_EXTRA_WORDS = (
    "a an the of to in on and with is it this that make be more less than image picture same".split()
)
_REQUIRED_BERT_KEYS = {
    "hidden_size": int,
    "num_hidden_layers": int,
    "num_attention_heads": int,
    "intermediate_size": int,
    "max_position_embeddings": int,
}


def toy_vocabulary(n_scenes: int = 200, seed: int = 0) -> list[str]:
    """Special tokens, then every word and punctuation mark of toy-world scene and edit captions (sorted)."""
    import numpy as np

    from vlext.toyworld import ToyWorld

    world = ToyWorld(seed=seed, image_size=32)
    rng = np.random.default_rng(seed)
    texts = []
    for scene in world.scenes(n_scenes):
        texts.append(scene.caption_en)
        texts.extend(world.edit(scene, rng).caption_en for _ in range(3))
    words = set(_EXTRA_WORDS)
    for text in texts:
        words.update(re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower()))
    return _SPECIAL + sorted(words)


def _check_bert_config(config: dict) -> None:
    for key, kind in _REQUIRED_BERT_KEYS.items():
        value = config.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or value <= 0:
            raise ValueError(
                f"tiny_bert.{key} must be a positive {kind.__name__}, got {value!r} "
                f"(required keys: {sorted(_REQUIRED_BERT_KEYS)})"
            )
    if config["hidden_size"] % config["num_attention_heads"]:
        raise ValueError(
            f"tiny_bert.hidden_size ({config['hidden_size']}) must be divisible by num_attention_heads "
            f"({config['num_attention_heads']})"
        )


def tiny_bert_folder(config: dict, cache_dir: str | os.PathLike | None = None) -> Path:
    """A folder with ``vocab.txt`` and ``config.json`` for a tiny BERT; written once, keyed by its content."""
    config = dict(config)
    _check_bert_config(config)
    from transformers import BertConfig

    vocab = toy_vocabulary()
    bert_config = BertConfig(vocab_size=len(vocab), **config)
    payload = json.dumps({"vocab": vocab, "config": config}, sort_keys=True).encode()
    key = hashlib.sha256(payload).hexdigest()[:16]
    root = Path(
        cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "vl-extensions" / "lavis_tiny"
    )
    folder = root / f"bert-{key}"
    if (folder / "vocab.txt").is_file() and (folder / "config.json").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".bert-"))
    (staging / "vocab.txt").write_text("\n".join(vocab) + "\n")
    bert_config.save_pretrained(staging)
    from vlext.atomic_files import publish_folder_once

    return publish_folder_once(staging, folder)  # another process may finish first: same content
