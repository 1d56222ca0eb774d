"""Toy image-text pairs for open_clip training, with region captions for fine-grained losses.

Writes what ``open_clip_train`` reads with its defaults (``--dataset-type auto`` picks the CSV reader
from the ``.csv`` suffix; ``--csv-separator`` is a tab, ``--csv-img-key filepath``,
``--csv-caption-key title``). ``CsvDataset`` opens ``filepath`` as given, relative to the working
directory of the training run, so paths are written absolute (the file is still byte-identical for the
same ``root`` and seed). Next to it, ``<split>_regions.jsonl`` holds per-object boxes and phrases in
the form region-level objectives (FG-CLIP's box-caption InfoNCE) consume::

    {"filepath": same string as in the CSV, "regions": [{"box": [x0, y0, x1, y1], "caption": phrase,
                                                         "hard_negatives": [phrase, ...]}, ...]}

``hard_negatives`` are FG-CLIP-style negative captions for the region: its phrase with the colour word swapped
for each other palette colour, then with the shape word swapped ("a small red circle" -> "a small blue
circle", "a small red square"), the first :data:`HARD_NEGATIVES` of them, in palette order.
"""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

from vlext.toyworld._output import check_root, save_png, write_jsonl
from vlext.toyworld._validation import check_choice, check_count, check_image_size, check_lang, check_seed
from vlext.toyworld.palette import COLORS, SHAPES
from vlext.toyworld.world import ToyWorld

__all__ = ["write_clip_csv", "clip_samples", "hard_negative_phrases"]

SPLITS: tuple[str, ...] = ("train", "val", "test")
# Splits draw disjoint scene indices: split k uses k * _SPLIT_STRIDE + i.
_SPLIT_STRIDE = 10**7
CSV_SEPARATOR = "\t"
HARD_NEGATIVES = 10  # FG-CLIP's count per region


def hard_negative_phrases(obj, lang: str = "en", count: int = HARD_NEGATIVES) -> list[str]:
    """``obj``'s phrase with one attribute changed: every other colour, then every other shape."""
    swaps = [replace(obj, color=c) for c in COLORS if c != obj.color]
    swaps += [replace(obj, shape=s) for s in SHAPES if s != obj.shape]
    return [o.phrase_en if lang == "en" else o.phrase_zh for o in swaps[:count]]


def clip_samples(n: int, seed: int = 0, image_size: int = 64, split: str = "train", lang: str = "en",
                 max_objects: int = 3):  # fmt: skip
    """``(index, image, caption, regions)`` of the ``n`` toy samples of ``split``: what :func:`write_clip_csv`
    writes as CSV + JSONL and :func:`vlext.toyworld.clip_shards.write_clip_shards` as tar shards."""
    check_count("n", n, minimum=1)
    if n >= _SPLIT_STRIDE:
        raise ValueError(f"n must be below {_SPLIT_STRIDE}, got {n}")
    check_choice("split", split, SPLITS)
    check_lang(lang)
    world = ToyWorld(check_seed(seed), check_image_size(image_size), max_objects=max_objects)
    start = SPLITS.index(split) * _SPLIT_STRIDE
    for i, scene in enumerate(world.scenes(n, start=start)):
        regions = [
            {"box": list(obj.box), "caption": phrase, "hard_negatives": hard_negative_phrases(obj, lang)}
            for obj, phrase in zip(scene.objects, scene.phrases(lang))
        ]
        yield i, scene.render(), scene.caption(lang), regions


def write_clip_csv(
    root,
    n: int,
    seed: int = 0,
    image_size: int = 64,
    split: str = "train",
    lang: str = "en",
    max_objects: int = 3,
) -> Path:
    """Write ``n`` images under ``root/images/<split>`` and return the path of ``root/<split>.csv``."""
    root = check_root(root).resolve()
    table, regions = [], []
    for i, image, caption, objects in clip_samples(n, seed, image_size, split, lang, max_objects):
        path = root / "images" / split / f"{i:06d}.png"
        save_png(image, path)
        table.append((str(path), caption))
        regions.append({"filepath": str(path), "regions": objects})
    csv_path = root / f"{split}.csv"
    with csv_path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter=CSV_SEPARATOR, lineterminator="\n")
        writer.writerow(("filepath", "title"))
        writer.writerows(table)
    write_jsonl(regions, root / f"{split}_regions.jsonl")
    return csv_path
