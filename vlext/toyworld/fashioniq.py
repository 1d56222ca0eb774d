"""Toy FashionIQ: single-item relative-caption triplets in the FashionIQ on-disk layout.

FashionIQ (Wu et al., CVPR 2021) has three garment categories, one product per image, and two
annotator captions per pair that each describe part of the difference. Here each category is a family
of shapes drawn alone near the centre, and a pair changes one or two of colour, size and shape (shape
within the category's family); the two captions phrase the change differently. ``root`` plays the
part of SPRC's ``base_path / "fashionIQ_dataset"``::

    root/captions/cap.{dress,shirt,toptee}.{train,val,test}.json  # [{candidate, target, captions}]
    root/image_splits/split.{dress,shirt,toptee}.{train,val,test}.json  # [image name, ...]
    root/images/<name>.png
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlext.toyworld._output import check_root, save_png, write_json
from vlext.toyworld._validation import check_count, check_image_size, check_seed
from vlext.toyworld.palette import COLORS, SIZES
from vlext.toyworld.scene import Scene, ToyObject
from vlext.toyworld.world import _side_px

__all__ = ["CATEGORIES", "write_fashioniq"]

# FashionIQ category -> the toy shapes that stand in for its garments.
CATEGORIES: dict[str, tuple[str, ...]] = {
    "dress": ("circle", "diamond"),
    "shirt": ("square", "cross"),
    "toptee": ("triangle", "star"),
}
SPLITS: tuple[str, ...] = ("train", "val", "test")
_ATTRIBUTES = ("color", "size", "shape")


def _item(rng: np.random.Generator, shapes, image_size: int, color=None, size=None, shape=None) -> ToyObject:
    shape = shape or str(rng.choice(shapes))
    color = color or str(rng.choice(list(COLORS)))
    size = size or str(rng.choice(list(SIZES)[1:]))
    side = _side_px(size, image_size)
    # Product photos are centred; a little jitter keeps position from identifying an image.
    jitter = max(1, image_size // 16)
    x = (image_size - side) // 2 + int(rng.integers(-jitter, jitter + 1))
    y = (image_size - side) // 2 + int(rng.integers(-jitter, jitter + 1))
    x = min(max(x, 0), image_size - side)
    y = min(max(y, 0), image_size - side)
    s = image_size
    return ToyObject(shape, color, size, (x / s, y / s, (x + side) / s, (y + side) / s))


def _change(rng, shapes, ref: ToyObject, image_size: int) -> tuple[ToyObject, list[str]]:
    """Target item and the two captions describing how it differs from ``ref``."""
    count = int(rng.integers(1, 3))
    attributes = [_ATTRIBUTES[k] for k in sorted(rng.choice(len(_ATTRIBUTES), size=count, replace=False))]
    new = {"color": ref.color, "size": ref.size, "shape": ref.shape}
    first, second = [], []
    names = list(SIZES)
    for attribute in attributes:
        if attribute == "color":
            new["color"] = str(rng.choice([c for c in COLORS if c != ref.color]))
            first.append(f"is {new['color']}")
            second.append(f"has a {new['color']} colour")
        elif attribute == "size":
            new["size"] = str(rng.choice([n for n in names if n != ref.size]))
            larger = names.index(new["size"]) > names.index(ref.size)
            first.append("is larger" if larger else "is smaller")
            second.append("bigger" if larger else "smaller in size")
        else:
            new["shape"] = next(s for s in shapes if s != ref.shape)
            first.append(f"is a {new['shape']}")
            second.append(f"has a {new['shape']} shape")
    target = _item(rng, shapes, image_size, **new)
    return target, [" and ".join(first), " and ".join(reversed(second))]


def write_fashioniq(root, n_per_category: int = 30, seed: int = 0, image_size: int = 64) -> Path:
    """Write a toy FashionIQ dataset under ``root`` and return ``root``.

    Each category gets ``n_per_category`` triplets in each of train, val and test; every triplet has
    its own candidate and target image, and the split file lists every image of that category/split.
    """
    root = check_root(root)
    check_count("n_per_category", n_per_category, minimum=1)
    check_seed(seed)
    check_image_size(image_size)
    for c, (category, shapes) in enumerate(CATEGORIES.items()):
        for s, split in enumerate(SPLITS):
            rng = np.random.default_rng([seed, c, s])
            triplets, names = [], []
            for k in range(n_per_category):
                ref = _item(rng, shapes, image_size)
                target, captions = _change(rng, shapes, ref, image_size)
                pair = []
                for obj, tag in ((ref, "c"), (target, "t")):
                    name = f"{category}-{split}-{k:05d}{tag}"
                    scene = Scene([obj], "plain", image_size, seed=int(rng.integers(2**31)))
                    save_png(scene.render(), root / "images" / f"{name}.png")
                    pair.append(name)
                names.extend(pair)
                triplets.append({"candidate": pair[0], "target": pair[1], "captions": captions})
            write_json(triplets, root / "captions" / f"cap.{category}.{split}.json")
            write_json(names, root / "image_splits" / f"split.{category}.{split}.json")
    return root
