"""GLIGEN-style grounding rows: reading, box cleaning and the training dataset.

A row is ``{"image": path, "caption": str, "boxes": [[x0, y0, x1, y1], ...], "phrases": [str, ...]}`` with
boxes normalized to [0, 1] (``vlext.toyworld.write_grounding_jsonl`` writes exactly this). Cleaning follows
GLIGEN's data recipe (Li et al., CVPR 2023): coordinates are clamped to [0, 1], boxes under a minimum area
(1% by default) or side are dropped, and only the ``max_objs`` largest boxes are kept. Every dropped box and
row is counted in a ``CleaningReport`` so the user sees what the data lost; malformed rows (phrase/box
count mismatch, NaN, x1 < x0) are errors naming the line, never silently skipped.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlext.jsonl import read_jsonl_objects

__all__ = ["CleaningReport", "GroundingRows", "clean_layout", "read_grounding_rows"]

ROW_HINT = '{"image": "<path>", "caption": "...", "boxes": [[x0, y0, x1, y1], ...], "phrases": ["...", ...]}'


@dataclass
class CleaningReport:
    rows_read: int = 0
    rows_kept: int = 0
    rows_dropped_no_boxes: int = 0
    boxes_read: int = 0
    boxes_clamped: int = 0
    boxes_dropped_small: int = 0
    boxes_dropped_over_max_objs: int = 0

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
    """Clamp, drop small boxes, keep the ``max_objs`` largest (ties keep the earlier box); counts go to
    ``report``. Order of the kept objects is the input order."""
    if len(boxes) != len(phrases):
        raise ValueError(f"{where}: {len(phrases)} phrases but {len(boxes)} boxes; each phrase needs one box")
    kept = []
    for i, (box, phrase) in enumerate(zip(boxes, phrases, strict=True)):
        report.boxes_read += 1
        if len(box) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box):
            raise ValueError(f"{where}: box {i} = {box} must be 4 finite numbers x0, y0, x1, y1 in [0, 1]")
        if box[2] < box[0] or box[3] < box[1]:
            raise ValueError(f"{where}: box {i} = {box} has x1 < x0 or y1 < y0; expected xyxy")
        if not isinstance(phrase, str) or not phrase.strip():
            raise ValueError(f"{where}: phrase {i} = {phrase!r} must be a non-empty string")
        clamped = [min(max(float(v), 0.0), 1.0) for v in box]
        report.boxes_clamped += clamped != [float(v) for v in box]
        w, h = clamped[2] - clamped[0], clamped[3] - clamped[1]
        if w * h < min_area or min(w, h) < min_side:
            report.boxes_dropped_small += 1
            continue
        kept.append((w * h, i, clamped, phrase))
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
            {"image": row["image"], "caption": str(row["caption"]), "boxes": boxes, "phrases": phrases}
        )
    report.rows_kept = len(rows)
    return rows, report


class GroundingRows(torch.utils.data.Dataset):
    """Images resized to ``resolution`` (normalized boxes stay valid under a resize; a crop would move them)
    as (3, H, W) in [-1, 1], with caption, boxes and phrases."""

    def __init__(self, rows: list[dict], image_dir: str | Path, resolution: int):
        self.rows, self.image_dir, self.resolution = rows, Path(image_dir), resolution
        absent = [r["image"] for r in rows if not (self.image_dir / r["image"]).is_file()]
        if absent:
            raise FileNotFoundError(
                f"{len(absent)} images not found under --image-dir {self.image_dir} (first: {absent[0]})"
            )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        image = Image.open(self.image_dir / row["image"]).convert("RGB")
        image = image.resize((self.resolution, self.resolution), Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        return {"pixels": pixels, "caption": row["caption"], "boxes": row["boxes"], "phrases": row["phrases"]}
