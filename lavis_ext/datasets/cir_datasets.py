"""CIRR and FashionIQ in their official on-disk layouts, as LAVIS datasets.

Training items are (reference image, target image, caption) triplets. Evaluation datasets yield the queries
(reference image, caption) and carry the gallery separately (:attr:`CirEvalDataset.gallery`), so the task
encodes each gallery image once instead of once per query.

Every image path is checked when the dataset is built, and an unreadable image raises
:class:`vlext.images.BadImageError` naming the file (:func:`vlext.images.load_image`): SPRC silently drops a missing image and then fails much later, in validation, with an index error.
Every annotation row is checked when the dataset is built (:class:`AnnotationError` names the file and the
row index); none is dropped silently.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch.utils.data import Dataset, default_collate

from vlext.images import load_image

__all__ = [
    "AnnotationError",
    "CirEvalDataset",
    "CirGallery",
    "CirTrainDataset",
    "read_cirr",
    "read_fashioniq",
    "read_fashioniq_galleries",
]

FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee")


class AnnotationError(ValueError):
    """A malformed annotation file or row; the message names the file and the row index."""


def _read_json(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise AnnotationError(f"{path} is not valid JSON: {error}") from error


def _read_rows(path: Path, split: str) -> list[dict]:
    rows = _read_json(path)
    if not isinstance(rows, list):
        raise AnnotationError(f"{path} must hold a JSON list of rows, got a {type(rows).__name__}")
    if not rows:
        # an empty val split used to train a whole epoch and then stop at its evaluation, with no checkpoint
        raise AnnotationError(
            f"{path} holds no rows: the {split!r} split is empty. Give a captions file with at least one "
            "row, or leave the split out of build_info.splits and run.train_splits/valid_splits/test_splits"
        )
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise AnnotationError(f"{path} row {index}: expected an object, got {row!r}")
    return rows


def _field(row: dict, key: str, path: Path, index: int, kinds=(str,), where: set | None = None):
    """``row[key]``, which must exist, have one of ``kinds`` (a string must not be blank) and, when
    ``where`` is given, name an image of the split; else an error naming file, row and key."""
    if key not in row or row[key] is None:
        raise AnnotationError(f"{path} row {index}: '{key}' is missing or null (row keys: {sorted(row)})")
    value = row[key]
    if (
        not isinstance(value, kinds)
        or isinstance(value, bool)
        or (isinstance(value, str) and not value.strip())
    ):
        accepted = " or ".join(kind.__name__ for kind in kinds)
        raise AnnotationError(f"{path} row {index}: '{key}' must be a non-empty {accepted}, got {value!r}")
    if where is not None and value not in where:
        raise AnnotationError(f"{path} row {index}: '{key}' image {value!r} is not in the split's image list")
    return value


def _check_files(paths: dict[str, Path], where: Path) -> None:
    missing = [f"{name} -> {path}" for name, path in paths.items() if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) listed in {where} are missing, e.g. {missing[:3]}")


def read_cirr(root: str | Path, split: str) -> tuple[list[dict], dict[str, Path]]:
    """CIRR triplets and {image name: path}; ``root`` is SPRC's ``base_path / "cirr_dataset"``.

    Every row must have reference, caption, img_set.members and pairid, and (except on test1, whose
    targets are hidden) target_hard: a row without one is an error naming the file and row, never dropped.
    """
    if split not in ("train", "val", "test1"):
        raise ValueError(f"CIRR split must be train, val or test1, got {split!r}")
    root = Path(root)
    split_file = root / "cirr" / "image_splits" / f"split.rc2.{split}.json"
    image_list = _read_json(split_file)
    if not isinstance(image_list, dict) or not image_list:
        raise AnnotationError(
            f"{split_file} must hold a non-empty JSON object {{image name: relative path}}, got {image_list!r:.80}"
        )
    paths = {name: root / rel for name, rel in image_list.items()}
    _check_files(paths, split_file)
    captions = root / "cirr" / "captions" / f"cap.rc2.{split}.json"
    triplets, first_row_of = [], {}
    for index, row in enumerate(_read_rows(captions, split)):
        img_set = _field(row, "img_set", captions, index, kinds=(dict,))
        members = _field(img_set, "members", captions, index, kinds=(list,))
        for member in members:
            if member not in paths:
                raise AnnotationError(
                    f"{captions} row {index}: img_set member {member!r} is not in the split's image list"
                )
        has_target = split != "test1"
        pairid = _field(row, "pairid", captions, index, kinds=(int, str))
        if str(pairid) in first_row_of:  # the submission's keys are str(pairid): 1 and "1" collide
            # the submission files are keyed by pairid: a second row would overwrite the first's rankings
            raise AnnotationError(
                f"{captions} row {index}: pairid {pairid!r} repeats row {first_row_of[str(pairid)]}'s; every "
                "row needs its own pairid (the CIRR submission files are keyed by it)"
            )
        first_row_of[str(pairid)] = index
        triplet = {
            "reference": _field(row, "reference", captions, index, where=paths),
            "target": _field(row, "target_hard", captions, index, where=paths) if has_target else None,
            "caption": _field(row, "caption", captions, index),
            "members": list(members),
            "pairid": pairid,
        }
        _check_cirr_row(triplet, captions, index, split)
        triplets.append(triplet)
    return triplets, paths


def _check_cirr_row(row: dict, captions: Path, index: int, split: str) -> None:
    """Refuse a row that contradicts itself: each case used to be ranked without a word, and wrongly.

    - ``target_hard`` equal to ``reference``: CIRR removes the reference from the ranking, so the target
      can never be found, yet on a gallery of 51 or fewer it counted as an R@50 hit;
    - ``target_hard`` not among ``img_set.members`` (val, where the subset recall ranks the members): it
      was ranked as a member (Rs@1 0 -> 16.7 on the case found);
    - ``reference`` not among the members (CIRR's sets always hold the reference; the subset ranking
      removes it as a member), or a member listed twice (it would count twice above the target).
    """
    where = f"{captions} row {index} (pairid {row['pairid']!r})"
    members = row["members"]
    repeated = sorted({m for m in members if members.count(m) > 1})
    if repeated:
        raise AnnotationError(f"{where}: img_set.members lists {repeated} more than once; each image once")
    if row["target"] is not None and row["target"] == row["reference"]:
        raise AnnotationError(
            f"{where}: target_hard {row['target']!r} is the reference image itself; CIRR never ranks the "
            "reference, so the target must be another image of the set"
        )
    if split == "train":
        return  # training reads neither the members nor their order
    if row["reference"] not in members:
        raise AnnotationError(
            f"{where}: reference {row['reference']!r} is not in img_set.members {members}; CIRR's image "
            "sets hold the reference and the candidates it is compared with"
        )
    if row["target"] is not None and row["target"] not in members:
        raise AnnotationError(
            f"{where}: target_hard {row['target']!r} is not in img_set.members {members}; the subset "
            "recall (Rs@K) ranks the target among the set's members, so it must be one of them"
        )


def read_fashioniq(root: str | Path, split: str, categories=FASHIONIQ_CATEGORIES):
    """FashionIQ triplets (both captions joined as SPRC does) and {image name: path}.

    Every row must have candidate, a list of two caption strings and (except on test) target; a malformed
    row is an error naming the file and row.
    """
    triplets, paths, _ = read_fashioniq_galleries(root, split, categories)
    return triplets, paths


def read_fashioniq_galleries(root: str | Path, split: str, categories=FASHIONIQ_CATEGORIES):
    """:func:`read_fashioniq` plus {category: its image names}, the gallery each category's queries are
    ranked against (SPRC's blip_validate.py and CLIP4Cir build one ``classic`` dataset per category: dress
    3.8k, shirt 6.3k, toptee 5.4k images on val, never their 15.5k union)."""
    root = Path(root)
    triplets, paths, galleries = [], {}, {}
    for category in categories:
        if category not in FASHIONIQ_CATEGORIES:
            raise ValueError(f"FashionIQ category must be one of {FASHIONIQ_CATEGORIES}, got {category!r}")
        split_file = root / "image_splits" / f"split.{category}.{split}.json"
        names = _read_json(split_file)
        if not isinstance(names, list) or not names:
            raise AnnotationError(
                f"{split_file} must hold a non-empty JSON list of image names, got {names!r:.80}"
            )
        category_paths = {name: root / "images" / f"{name}.png" for name in names}
        _check_files(category_paths, split_file)
        paths.update(category_paths)
        galleries[category] = list(category_paths)
        captions = root / "captions" / f"cap.{category}.{split}.json"
        for index, row in enumerate(_read_rows(captions, f"{category} {split}")):
            texts = _field(row, "captions", captions, index, kinds=(list,))
            if len(texts) < 2 or not all(isinstance(t, str) and t.strip(".?, ") for t in texts[:2]):
                raise AnnotationError(
                    f"{captions} row {index}: 'captions' must hold two non-empty strings, got {texts!r}"
                )
            first, second = (c.strip(".?, ") for c in texts[:2])
            if (
                split != "test"
                and row.get("target") is not None
                and row.get("target") == row.get("candidate")
            ):
                raise AnnotationError(
                    f"{captions} row {index}: target {row['target']!r} is the candidate image itself; a "
                    "FashionIQ triplet describes a change from the candidate to another image"
                )
            triplets.append(
                {
                    "reference": _field(row, "candidate", captions, index, where=category_paths),
                    "target": _field(row, "target", captions, index, where=category_paths)
                    if split != "test"
                    else row.get("target"),
                    "caption": f"{first} and {second}",
                    "category": category,
                }
            )
    return triplets, paths, galleries


class _CirDataset(Dataset):
    def collater(self, samples):
        """LAVIS's runner asks every dataset for ``collater``; our items are plain dicts."""
        return default_collate(samples)


class CirTrainDataset(_CirDataset):
    def __init__(self, triplets, paths, vis_processor, text_processor):
        self.triplets = list(triplets)
        if not self.triplets or any(t["target"] is None for t in self.triplets):
            raise ValueError("a training split needs triplets, each with a target")
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
    """Queries over one gallery; ``kind`` is "cirr" or "fashioniq" (it picks the metrics).

    ``galleries`` ({group: image names}, FashionIQ's categories) ranks each query whose ``category`` is a
    group against that group's images only; the images are encoded once, as one gallery of their union.
    """

    def __init__(self, triplets, paths, vis_processor, text_processor, kind: str, galleries=None):
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
        self.galleries = None
        if galleries is not None:
            self.galleries = {group: [position[name] for name in names] for group, names in galleries.items()}
            for row in self.triplets:
                group = row.get("category")
                if group not in self.galleries:
                    raise KeyError(
                        f"a {kind} query's category {group!r} has no gallery ({sorted(galleries)})"
                    )
                for key in ("reference", "target"):
                    if row[key] is not None and row[key] not in galleries[group]:
                        raise KeyError(f"{key} image {row[key]!r} is not in the {group!r} gallery")

    def __len__(self):
        return len(self.triplets)

    def __getitem__(self, index):
        row = self.triplets[index]
        return {
            "image": self.vis_processor(load_image(self.paths[row["reference"]])),
            "text_input": self.text_processor(row["caption"]),
            "index": index,
        }
