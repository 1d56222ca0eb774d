"""GLIGEN-style grounding rows: reading, box cleaning and the training dataset.

A row is ``{"image": path, "caption": str, "boxes": [[x0, y0, x1, y1], ...], "phrases": [str, ...]}`` with
boxes normalized to [0, 1] (``vlext.toyworld.write_grounding_jsonl`` writes exactly this). Cleaning follows
GLIGEN's data recipe (Li et al., CVPR 2023): boxes under a minimum area (1% by default) or side are dropped,
and only the ``max_objs`` largest boxes are kept. Every dropped box and row is counted in a
``CleaningReport`` so the user sees what the data lost. Malformed rows are errors naming the file and line,
never silently skipped or repaired: a phrase/box count mismatch, NaN, and any box that breaks the project's
box rule, 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 (a box outside [0, 1] is usually pixel coordinates or
a wrong normalization, which clamping would hide).

Images are decoded fully before training starts (``verify_images``) and at every read, with PIL's
``LOAD_TRUNCATED_IMAGES`` forced off for our reads: LAVIS switches it on process-wide when imported, which
would let a half-written PNG train as a partly grey image without a word.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlext.images import truncated_images_refused
from vlext.jsonl import read_jsonl_objects

__all__ = [
    "BadImageError",
    "CleaningReport",
    "GroundingRows",
    "clean_layout",
    "load_image_strict",
    "read_grounding_rows",
    "verify_images",
]

ROW_HINT = '{"image": "<path>", "caption": "...", "boxes": [[x0, y0, x1, y1], ...], "phrases": ["...", ...]}'


@dataclass
class CleaningReport:
    rows_read: int = 0
    rows_kept: int = 0
    rows_dropped_no_boxes: int = 0
    boxes_read: int = 0
    boxes_dropped_small: int = 0
    boxes_dropped_over_max_objs: int = 0
    rows_skipped_bad_image: int = 0
    boxes_left_crop: int = 0  # training crop (diffusers_ext.training.dataset): nothing of the box inside it
    boxes_small_after_crop: int = 0  # large enough in the image, under --min-area / --min-side in the crop

    def summary(self) -> str:
        d = asdict(self)
        return ", ".join(f"{k}={v}" for k, v in d.items())


def clean_layout(
    boxes: list[list[float]],
    phrases: list[str],
    *,
    min_area: float,
    min_side: float,
    max_objs: int,
    report: CleaningReport,
    where: str = "layout",
) -> tuple[list[list[float]], list[str]]:
    """Check the box rule, drop small boxes, keep the ``max_objs`` largest (ties keep the earlier box);
    counts go to ``report``. Order of the kept objects is the input order."""
    if len(boxes) != len(phrases):
        raise ValueError(f"{where}: {len(phrases)} phrases but {len(boxes)} boxes; each phrase needs one box")
    kept = []
    for i, (box, phrase) in enumerate(zip(boxes, phrases, strict=True)):
        report.boxes_read += 1
        if len(box) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box):
            raise ValueError(f"{where}: box {i} = {box} must be 4 finite numbers x0, y0, x1, y1 in [0, 1]")
        box = [float(v) for v in box]
        if not all(0.0 <= v <= 1.0 for v in box):
            raise ValueError(
                f"{where}: box {i} = {box} lies outside [0, 1]; boxes are normalized xyxy "
                "(pixel coordinates divided by the image width and height), nothing is clamped"
            )
        if box[2] <= box[0] or box[3] <= box[1]:
            raise ValueError(
                f"{where}: box {i} = {box} needs x0 < x1 and y0 < y1 (xyxy: left, top, right, bottom)"
            )
        if not isinstance(phrase, str) or not phrase.strip():
            raise ValueError(f"{where}: phrase {i} = {phrase!r} must be a non-empty string")
        w, h = box[2] - box[0], box[3] - box[1]
        if w * h < min_area or min(w, h) < min_side:
            report.boxes_dropped_small += 1
            continue
        kept.append((w * h, i, box, phrase))
    if len(kept) > max_objs:
        report.boxes_dropped_over_max_objs += len(kept) - max_objs
        kept = sorted(sorted(kept, key=lambda k: (-k[0], k[1]))[:max_objs], key=lambda k: k[1])
    return [k[2] for k in kept], [k[3] for k in kept]


def read_grounding_rows(
    jsonl: str | Path, *, min_area: float, min_side: float, max_objs: int
) -> tuple[list[dict], CleaningReport]:
    """Read and clean every row; rows with no box left are dropped (and counted)."""
    jsonl = Path(jsonl)
    if not jsonl.is_file():
        raise FileNotFoundError(
            f"--mixed-data {jsonl} does not exist (a JSONL of image/caption/boxes/phrases rows)"
        )
    report, rows = CleaningReport(), []
    for where, row in read_jsonl_objects(jsonl, ROW_HINT):
        missing = [k for k in ("image", "caption", "boxes", "phrases") if k not in row]
        if missing:
            raise ValueError(f"{where}: missing keys {missing}; rows need image, caption, boxes, phrases")
        report.rows_read += 1
        boxes, phrases = clean_layout(
            row["boxes"],
            row["phrases"],
            min_area=min_area,
            min_side=min_side,
            max_objs=max_objs,
            report=report,
            where=where,
        )
        if not boxes:
            report.rows_dropped_no_boxes += 1
            continue
        rows.append(
            {
                "image": row["image"],
                "caption": str(row["caption"]),
                "boxes": boxes,
                "phrases": phrases,
                "where": where,
            }
        )
    report.rows_kept = len(rows)
    return rows, report


class BadImageError(ValueError):
    """An image file that is not an image, or not all of one (truncated)."""


def load_image_strict(path: str | Path) -> Image.Image:
    """Decode all of ``path`` as RGB, or raise ``BadImageError`` naming the file."""
    try:
        with truncated_images_refused(), Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib errors, ... by format
        raise BadImageError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e


def verify_images(
    rows: list[dict],
    image_dir: str | Path,
    *,
    skip_bad: bool,
    report: CleaningReport,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> list[dict]:
    """Decode every row's image once before training. A missing file is always an error (usually a wrong
    ``--image-dir``); an unreadable one is an error naming every such file, or with ``skip_bad`` the row is
    left out, logged and counted in ``report.rows_skipped_bad_image``."""
    from tqdm.auto import tqdm

    image_dir = Path(image_dir)
    absent = [r for r in rows if not (image_dir / r["image"]).is_file()]
    if absent:
        raise FileNotFoundError(
            f"{len(absent)} images not found under --image-dir {image_dir} "
            f"(first: {absent[0]['where']}: {image_dir / absent[0]['image']})"
        )
    kept, bad = [], []
    for row in tqdm(rows, desc="checking images", disable=not progress, leave=False):
        try:
            load_image_strict(image_dir / row["image"])
            kept.append(row)
        except BadImageError as e:
            bad.append(f"{row.get('where', 'row')}: {e}")
    if bad and not skip_bad:
        shown = "\n  ".join(bad[:10]) + (f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise BadImageError(
            f"{len(bad)} of {len(rows)} images cannot be read:\n  {shown}\n"
            "replace or remove them, or pass --skip-bad-images to train without those rows (each is logged)"
        )
    for line in bad:
        log(f"skipping bad image: {line}")
    report.rows_skipped_bad_image += len(bad)
    report.rows_kept = len(kept)
    return kept


class GroundingRows(torch.utils.data.Dataset):
    """Images resized to ``resolution`` (normalized boxes stay valid under a resize; a crop would move them)
    as (3, H, W) in [-1, 1], with caption, boxes and phrases. Images are read with ``load_image_strict``, so
    a file that went bad after ``verify_images`` still fails naming itself."""

    def __init__(self, rows: list[dict], image_dir: str | Path, resolution: int):
        self.rows, self.image_dir, self.resolution = rows, Path(image_dir), resolution

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        image = load_image_strict(self.image_dir / row["image"])
        image = image.resize((self.resolution, self.resolution), Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        return {"pixels": pixels, "caption": row["caption"], "boxes": row["boxes"], "phrases": row["phrases"]}
