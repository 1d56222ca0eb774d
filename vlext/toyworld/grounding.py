"""Toy grounding data: captions with per-object phrases and boxes, as JSONL.

One row per image, the shape box-conditioned generators (GLIGEN, Li et al., CVPR 2023) train on::

    {"image": "images/000000.png", "caption": str, "boxes": [[x0, y0, x1, y1], ...], "phrases": [str, ...]}

Boxes are xyxy normalized to [0, 1], one per phrase, in the same order. ``lang="zh"`` writes the
Chinese captions and phrases (for Kolors, whose text encoder is ChatGLM3); the images are the same for
both languages under the same seed, so the two files can share one ``root``.
"""

from __future__ import annotations

from pathlib import Path

from vlext.toyworld._output import check_root, save_png, write_jsonl
from vlext.toyworld._validation import check_count, check_image_size, check_lang, check_seed
from vlext.toyworld.world import ToyWorld

__all__ = ["write_grounding_jsonl"]


def write_grounding_jsonl(
    root, n: int, seed: int = 0, image_size: int = 64, lang: str = "en", max_objects: int = 3
) -> Path:
    """Write ``n`` images under ``root/images`` and return the path of ``root/grounding.<lang>.jsonl``."""
    root = check_root(root)
    check_count("n", n, minimum=1)
    check_lang(lang)
    world = ToyWorld(check_seed(seed), check_image_size(image_size), max_objects=max_objects)
    rows = []
    for i, scene in enumerate(world.scenes(n)):
        relpath = f"images/{i:06d}.png"
        save_png(scene.render(), root / relpath)
        rows.append(
            {
                "image": relpath,
                "caption": scene.caption(lang),
                "boxes": [list(box) for box in scene.boxes],
                "phrases": scene.phrases(lang),
            }
        )
    path = root / f"grounding.{lang}.jsonl"
    write_jsonl(rows, path)
    return path
