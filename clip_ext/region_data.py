"""Region data for the FG-CLIP-style loss: a JSONL of boxes and captions matched to open_clip's CSV rows.

``--region-data`` is a JSONL file with one line per image::

    {"filepath": "/data/images/000001.png", "regions": [{"box": [x0, y0, x1, y1], "caption": "a red square"}]}

boxes in normalized xyxy (``vlext.toyworld.write_clip_csv`` writes ``<split>_regions.jsonl`` in this form).
A region may carry ``"hard_negatives": ["a blue square", ...]``, captions that differ from its own in one
attribute, for FG-CLIP's hard-negative loss (``--hard-negative-weight``).
Lines are matched to the ``--train-data`` CSV rows by image path; every CSV image needs a line (an empty
``regions`` list is fine). Boxes are checked against the box rule and filtered with :func:`clip_ext.region.filter_boxes`
(``--min-box-area``, ``--min-box-side``) once, when the dataset is built; the counts are kept and logged.

How it reaches open_clip's trainer: ``open_clip_train.train.train_one_epoch`` unpacks every batch as
``images, texts = batch`` and calls ``model(images, texts)``, so a batch cannot carry boxes. The trainer
therefore wraps the host's ``CsvDataset`` in :class:`ClipExtCsvDataset` (which also yields boxes, region
captions and sample ids) and its loader in :class:`SideChannelLoader`: the loader moves the images to the
training device and dtype itself (so the host's ``images.to(...)`` returns the very same tensor), yields
``(images, texts)`` and files the rest in a :class:`BatchSideChannel` keyed by that tensor's identity.
The model's forward looks its batch up there. Identity (not "the latest batch") keeps this right under
``--accum-freq k``, where the host runs k forwards without gradient and then k again on cached images.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from clip_ext.image_check import SKIP_HINT
from clip_ext.region import filter_boxes, kept_box_mask
from vlext.boxes import check_box
from vlext.images import load_image
from vlext.jsonl import read_jsonl_objects

__all__ = ["RegionTable", "load_region_table", "ClipExtCsvDataset", "BatchSideChannel", "SideChannelLoader"]

logger = logging.getLogger(__name__)

FORMAT_HINT = (
    '{"filepath": "<image path as in the CSV>", "regions": [{"box": [x0, y0, x1, y1], "caption": "...", '
    '"hard_negatives": ["...", ...] (optional)}]}'
)


class RegionDataError(ValueError):
    """``--region-data`` is malformed or does not match ``--train-data``."""


@dataclass
class RegionTable:
    """Per CSV row: the kept boxes (n_i, 4) and their captions; plus what filtering dropped."""

    path: str
    boxes: list[torch.Tensor]
    captions: list[list[str]]
    caption_ids: list[list[int]]  # index of the caption text among the distinct captions of the file
    counts: dict[str, int] = field(default_factory=dict)
    hard_negatives: list[list[list[str]]] = field(default_factory=list)  # per row, per kept region

    @property
    def max_regions(self) -> int:
        return max((len(c) for c in self.captions), default=0)

    @property
    def max_hard_negatives(self) -> int:
        return max((len(n) for row in self.hard_negatives for n in row), default=0)

    def hard_negative_summary(self) -> str:
        with_negatives = sum(1 for row in self.hard_negatives for n in row if n)
        return (
            f"hard negatives {self.path}: {with_negatives} of {self.counts['kept']} kept regions carry hard "
            f"negative captions, padded to {self.max_hard_negatives} per region"
        )

    def summary(self) -> str:
        c = self.counts
        return (
            f"region data {self.path}: {c['kept']} boxes kept, {c['dropped_min_side']} dropped by "
            f"--min-box-side, {c['dropped_min_area']} dropped by --min-box-area; {c['images_without_regions']} "
            f"of {len(self.boxes)} images have no box; padded to {self.max_regions} regions per image"
        )


def _norm(path: str) -> str:
    return os.path.normpath(str(path))


REGION_ENTRY_KEYS = ("box", "caption", "hard_negatives")


def _same_caption(a: str, b: str) -> bool:
    """Equal as CLIP's tokenizer sees them (it lowercases and collapses whitespace)."""
    return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()


def parse_region_list(regions: list, where: str, error: type[Exception], *, box_rule: bool = True):
    """(boxes, captions, hard negatives) of one image's ``regions`` list, each entry's JSON shape checked and,
    with ``box_rule``, each box against the box rule; errors are ``error`` naming ``where`` and the region.
    The CSV path's JSONL and the webdataset path's shard members both read regions through this.

    An entry with a key other than ``box``, ``caption`` and ``hard_negatives`` is refused (a misspelt
    ``hard_negative`` would otherwise train without negatives, noticed only by the warning after epoch 0),
    and so is a hard-negative list holding the region's own caption (the loss would push the region away
    from its own caption: a contradiction in the annotation, issue 27)."""
    boxes, captions, negatives = [], [], []
    for k, region in enumerate(regions):
        if not isinstance(region, dict) or "box" not in region or "caption" not in region:
            raise error(f"{where}: region {k} must be an object with 'box' and 'caption'")
        unknown = [key for key in region if key not in REGION_ENTRY_KEYS]
        if unknown:
            close = difflib.get_close_matches(unknown[0], REGION_ENTRY_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise error(f"{where}: region {k} has unknown key {unknown[0]!r}{hint}; a region accepts only "
                        f"{', '.join(map(repr, REGION_ENTRY_KEYS))}")  # fmt: skip
        box, caption, hard = region["box"], region["caption"], region.get("hard_negatives", [])
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise error(f"{where}: region {k} box must be 4 numbers [x0, y0, x1, y1] normalized to [0, 1], "
                        f"got {box!r}")  # fmt: skip
        if box_rule:
            check_box(box, where, k, error)
        if not isinstance(caption, str) or not caption.strip():
            raise error(f"{where}: region {k} caption must be a non-empty string, got {caption!r}")
        if not (isinstance(hard, list) and all(isinstance(h, str) and h.strip() for h in hard)):
            raise error(f"{where}: region {k} hard_negatives must be a list of non-empty caption strings, "
                        f"got {hard!r}")  # fmt: skip
        own = next((h for h in hard if _same_caption(h, caption)), None)
        if own is not None:
            raise error(f"{where}: region {k} lists its own caption {caption!r} among its hard_negatives "
                        f"({own!r}); a hard negative must differ from the caption (e.g. another colour word)")  # fmt: skip
        boxes.append(box)
        captions.append(caption)
        negatives.append(hard)
    return boxes, captions, negatives


def load_region_table(path, image_paths: list[str], min_area: float, min_side: float) -> RegionTable:
    """Read and check ``path``, filter its boxes, and order it like ``image_paths`` (the CSV rows)."""
    path = Path(path)
    if not path.is_file():
        raise RegionDataError(f"--region-data {path}: no such file")
    if min_area < 0 or min_side < 0:
        raise RegionDataError(f"--min-box-area and --min-box-side must be >= 0, got {min_area}, {min_side}")
    by_image: dict[str, tuple[torch.Tensor, list[str], dict[str, int], str]] = {}
    for where, row in read_jsonl_objects(path, FORMAT_HINT, RegionDataError):
        if not isinstance(row.get("filepath"), str) or not isinstance(row.get("regions"), list):
            raise RegionDataError(f"{where}: expected an object with 'filepath' (string) and 'regions' "
                                  f"(list), i.e. {FORMAT_HINT}")  # fmt: skip
        boxes, captions, negatives = parse_region_list(row["regions"], where, RegionDataError)
        key = _norm(row["filepath"])
        if key in by_image:
            raise RegionDataError(f"{where}: image {row['filepath']} is already listed at {by_image[key][3]}")
        tensor = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        try:
            kept, c = filter_boxes(tensor, min_area, min_side, where=where)
        except ValueError as e:
            raise RegionDataError(str(e)) from None
        keep = kept_box_mask(tensor, min_area, min_side).tolist()
        by_image[key] = (kept, [cap for cap, k in zip(captions, keep) if k], c, where,
                         [neg for neg, k in zip(negatives, keep) if k])  # fmt: skip

    counts = {"kept": 0, "dropped_min_side": 0, "dropped_min_area": 0, "images_without_regions": 0}
    table_boxes, table_captions, table_negatives = [], [], []
    for i, image in enumerate(image_paths):
        entry = by_image.get(_norm(image))
        if entry is None:
            matched = sum(_norm(p) in by_image for p in image_paths)
            raise RegionDataError(
                f"--region-data {path} does not match --train-data: no line for image {image} (CSV row {i + 1}); "
                f"{matched} of {len(image_paths)} CSV images have a line. Every CSV image needs one, matched "
                f"by its path as written in the CSV (an empty 'regions' list is fine)"
            )
        kept, captions, c, _, negatives = entry
        for key in ("kept", "dropped_min_side", "dropped_min_area"):
            counts[key] += c[key]
        counts["images_without_regions"] += int(kept.shape[0] == 0)
        table_boxes.append(kept)
        table_captions.append(captions)
        table_negatives.append(negatives)
    in_csv = {_norm(p) for p in image_paths}
    unused = [(entry[3], key) for key, entry in by_image.items() if key not in in_csv]
    if unused:
        # a region file of another split or dataset matches only partly; say how much of it goes unused
        logger.warning(
            "region data %s: %d of its %d lines name images that are not in --train-data and are not used "
            "(e.g. %s)", path, len(unused), len(by_image), ", ".join(f"{w} {k}" for w, k in unused[:3]),
        )  # fmt: skip
    vocab = {cap: j for j, cap in enumerate(sorted({c for caps in table_captions for c in caps}))}
    table = RegionTable(str(path), table_boxes, table_captions,
                        [[vocab[c] for c in caps] for caps in table_captions], counts, table_negatives)  # fmt: skip
    if table.max_regions == 0:
        raise RegionDataError(f"{table.summary()}: no box survived filtering; lower --min-box-area / "
                              "--min-box-side or check that boxes are normalized xyxy")  # fmt: skip
    return table


def sample_ids_for(image_paths: list[str]) -> torch.Tensor:
    """One id per distinct image: the CSV row where the image first appears (rows of the same image with
    other captions share it, so the bank does not use that image as its own negative)."""
    first: dict[str, int] = {}
    return torch.tensor([first.setdefault(_norm(p), i) for i, p in enumerate(image_paths)], dtype=torch.long)


class ClipExtCsvDataset(Dataset):
    """open_clip's ``CsvDataset`` rows as ``(image, text, extras)``.

    ``extras`` holds ``sample_ids`` (see :func:`sample_ids_for`) and, with a :class:`RegionTable`,
    ``region_boxes`` (R, 4), ``region_valid`` (R,), ``region_text`` (R, L) tokens and
    ``region_caption_ids`` (R,), padded to the table's ``max_regions`` R (padding: zero box, no tokens,
    id -1, valid False). With ``hard_negatives``, also ``region_hard_negative_text`` (R, M, L) and
    ``region_hard_negative_valid`` (R, M), padded to the table's ``max_hard_negatives`` M.
    ``rows`` selects CSV rows (``--skip-bad-images`` leaves unreadable images out); all rows by default.
    """

    def __init__(self, base, transform=None, regions: RegionTable | None = None, hard_negatives: bool = False,
                 rows: list[int] | None = None):  # fmt: skip
        self.base = base
        self.transform = transform if transform is not None else base.transforms
        self.regions = regions
        self.hard_negatives = hard_negatives and regions is not None and regions.max_hard_negatives > 0
        self.sample_ids = sample_ids_for(base.images)
        self.rows = list(range(len(base.images))) if rows is None else list(rows)
        if regions is not None and len(regions.boxes) != len(base.images):
            raise RegionDataError(
                f"{regions.path}: {len(regions.boxes)} rows for {len(base.images)} CSV rows"
            )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        idx = self.rows[index]
        image = self.transform(load_image(str(self.base.images[idx]), hint=SKIP_HINT))
        text = self.base.tokenize([str(self.base.captions[idx])])[0]
        extras = {"sample_ids": self.sample_ids[idx]}
        if self.regions is not None:
            r = self.regions.max_regions
            boxes, captions = self.regions.boxes[idx], self.regions.captions[idx]
            n = len(captions)
            padded = torch.zeros(r, 4)
            padded[:n] = boxes
            tokens = torch.zeros(r, text.shape[-1], dtype=text.dtype)
            if n:
                tokens[:n] = self.base.tokenize(captions)
            ids = torch.full((r,), -1, dtype=torch.long)
            ids[:n] = torch.tensor(self.regions.caption_ids[idx], dtype=torch.long)
            extras.update(region_boxes=padded, region_valid=torch.arange(r) < n, region_text=tokens,
                          region_caption_ids=ids)  # fmt: skip
            if self.hard_negatives:
                m = self.regions.max_hard_negatives
                hn_tokens = torch.zeros(r, m, text.shape[-1], dtype=text.dtype)
                hn_valid = torch.zeros(r, m, dtype=torch.bool)
                for k, negatives in enumerate(self.regions.hard_negatives[idx]):
                    if negatives:
                        hn_tokens[k, : len(negatives)] = self.base.tokenize(negatives)
                        hn_valid[k, : len(negatives)] = True
                extras.update(region_hard_negative_text=hn_tokens, region_hard_negative_valid=hn_valid)
        return image, text, extras


class BatchSideChannel:
    """The extras of the last few batches, looked up by the identity of their image tensor."""

    def __init__(self, keep: int):
        self._entries: deque = deque(maxlen=keep)

    def put(self, images: torch.Tensor, extras: dict[str, torch.Tensor]) -> None:
        self._entries.append((images, extras))

    def get(self, images: torch.Tensor) -> dict[str, torch.Tensor] | None:
        for stored, extras in reversed(self._entries):
            if stored is images:
                return extras
        return None


class SideChannelLoader:
    """Yields ``(images, texts)`` as the host expects and files each batch's extras in ``channel``.

    Images are moved to ``device``/``dtype`` here so that the host's own ``.to(device, dtype)`` is a no-op
    returning the same tensor, which is the key of the side channel.
    """

    def __init__(self, loader, channel: BatchSideChannel, device, dtype):
        self.loader, self.channel, self.device, self.dtype = loader, channel, torch.device(device), dtype
        # what the host's train_one_epoch reads off its loader (set by clip_ext.train.get_data)
        self.num_samples = getattr(loader, "num_samples", None)
        self.num_batches = getattr(loader, "num_batches", len(loader))

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def dataset(self):
        return self.loader.dataset

    def __iter__(self):
        for images, texts, extras in self.loader:
            images = images.to(device=self.device, dtype=self.dtype, non_blocking=True)
            extras = {k: v.to(self.device, non_blocking=True) for k, v in extras.items()}
            self.channel.put(images, extras)
            yield images, texts
