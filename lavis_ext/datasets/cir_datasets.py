"""CIRR and FashionIQ in their official on-disk layouts, as LAVIS datasets.

Training items are (reference image, target image, caption) triplets. Evaluation datasets yield the queries
(reference image, caption) and carry the gallery separately (:attr:`CirEvalDataset.gallery`), so the task
encodes each gallery image once instead of once per query.

Every image path is checked when the dataset is built, and an unreadable image raises an error naming the
file: SPRC silently drops a missing image and then fails much later, in validation, with an index error.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, default_collate

__all__ = ["CirEvalDataset", "CirGallery", "CirTrainDataset", "read_cirr", "read_fashioniq"]

FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee")


def load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError as error:
        raise FileNotFoundError(f"image file not found: {path}") from error
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"image file is not a readable image: {path} ({error})") from error


def _read_json(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    return json.loads(path.read_text())


def _check_files(paths: dict[str, Path], where: Path) -> None:
    missing = [f"{name} -> {path}" for name, path in paths.items() if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) listed in {where} are missing, e.g. {missing[:3]}")


def read_cirr(root: str | Path, split: str) -> tuple[list[dict], dict[str, Path]]:
    """CIRR triplets and {image name: path}; ``root`` is SPRC's ``base_path / "cirr_dataset"``."""
    if split not in ("train", "val", "test1"):
        raise ValueError(f"CIRR split must be train, val or test1, got {split!r}")
    root = Path(root)
    split_file = root / "cirr" / "image_splits" / f"split.rc2.{split}.json"
    paths = {name: root / rel for name, rel in _read_json(split_file).items()}
    _check_files(paths, split_file)
    triplets = [
        {
            "reference": row["reference"],
            "target": row.get("target_hard"),
            "caption": row["caption"],
            "members": list(row["img_set"]["members"]),
            "pairid": row["pairid"],
        }
        for row in _read_json(root / "cirr" / "captions" / f"cap.rc2.{split}.json")
    ]
    return triplets, paths


def read_fashioniq(root: str | Path, split: str, categories=FASHIONIQ_CATEGORIES):
    """FashionIQ triplets (both captions joined as SPRC does) and {image name: path}."""
    root = Path(root)
    triplets, paths = [], {}
    for category in categories:
        if category not in FASHIONIQ_CATEGORIES:
            raise ValueError(f"FashionIQ category must be one of {FASHIONIQ_CATEGORIES}, got {category!r}")
        split_file = root / "image_splits" / f"split.{category}.{split}.json"
        names = _read_json(split_file)
        category_paths = {name: root / "images" / f"{name}.png" for name in names}
        _check_files(category_paths, split_file)
        paths.update(category_paths)
        for row in _read_json(root / "captions" / f"cap.{category}.{split}.json"):
            first, second = (c.strip(".?, ") for c in row["captions"][:2])
            triplets.append(
                {
                    "reference": row["candidate"],
                    "target": row.get("target"),
                    "caption": f"{first} and {second}",
                    "category": category,
                }
            )
    return triplets, paths


class _CirDataset(Dataset):
    def collater(self, samples):
        """LAVIS's runner asks every dataset for ``collater``; our items are plain dicts."""
        return default_collate(samples)


class CirTrainDataset(_CirDataset):
    def __init__(self, triplets, paths, vis_processor, text_processor):
        self.triplets = [t for t in triplets if t["target"] is not None]
        if not self.triplets:
            raise ValueError("training split has no triplets with a target")
        self.paths, self.vis_processor, self.text_processor = paths, vis_processor, text_processor

    def __len__(self):
        return len(self.triplets)

    def __getitem__(self, index):
        row = self.triplets[index]
        return {
            "image": self.vis_processor(load_image(self.paths[row["reference"]])),
            "target": self.vis_processor(load_image(self.paths[row["target"]])),
            "text_input": self.text_processor(row["caption"]),
        }


class CirGallery(_CirDataset):
    def __init__(self, names, paths, vis_processor):
        self.names, self.paths, self.vis_processor = list(names), paths, vis_processor

    def __len__(self):
        return len(self.names)

    def __getitem__(self, index):
        return {"image": self.vis_processor(load_image(self.paths[self.names[index]])), "index": index}


class CirEvalDataset(_CirDataset):
    """Queries over one gallery; ``kind`` is "cirr" or "fashioniq" (it picks the metrics)."""

    def __init__(self, triplets, paths, vis_processor, text_processor, kind: str):
        self.kind = kind
        self.triplets = list(triplets)
        self.paths, self.vis_processor, self.text_processor = paths, vis_processor, text_processor
        self.gallery = CirGallery(sorted(paths), paths, vis_processor)
        position = {name: i for i, name in enumerate(self.gallery.names)}
        for row in self.triplets:
            for key in ("reference", "target"):
                if row[key] is not None and row[key] not in position:
                    raise KeyError(
                        f"{key} image {row[key]!r} of a {kind} query is not in the split's image list"
                    )
        self.gallery_index = position
        self.has_targets = all(row["target"] is not None for row in self.triplets)

    def __len__(self):
        return len(self.triplets)

    def __getitem__(self, index):
        row = self.triplets[index]
        return {
            "image": self.vis_processor(load_image(self.paths[row["reference"]])),
            "text_input": self.text_processor(row["caption"]),
            "index": index,
        }
