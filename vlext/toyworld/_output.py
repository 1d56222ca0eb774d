"""Deterministic file output for the dataset writers: same data, same bytes."""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image


def check_root(root, name: str = "root") -> Path:
    if not isinstance(root, str | os.PathLike) or not str(root):
        raise ValueError(f"{name} must be a directory path (str or os.PathLike), got {root!r}")
    path = Path(root)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} {str(path)!r} exists and is not a directory")
    return path


def save_png(image: Image.Image, path: Path) -> None:
    # Pillow writes no timestamp into PNGs, so equal pixels give equal files.
    path.parent.mkdir(parents=True, exist_ok=True)
    # Level 1: the images are small and synthetic; encoding time, not size, is what matters here.
    image.save(path, format="PNG", compress_level=1)


def write_json(data, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def write_jsonl(rows, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
