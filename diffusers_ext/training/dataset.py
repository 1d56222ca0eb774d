"""The trainer's data: the grounding rows' images checked before training, and the Dataset it iterates.

Rows come from :func:`diffusers_ext.layout_rows.read_grounding_rows`. Images are decoded fully before
training starts (:func:`verify_images`) and at every read, with :func:`vlext.images.load_image` (PIL's
``LOAD_TRUNCATED_IMAGES`` forced off for our reads: LAVIS switches it on process-wide when imported, which
would let a half-written PNG train as a partly grey image without a word).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffusers_ext.layout_rows import CleaningReport
from vlext.images import BadImageError, load_image

__all__ = ["GroundingRows", "verify_images"]

logger = logging.getLogger(__name__)


def verify_images(
    rows: list[dict],
    image_dir: str | Path,
    *,
    skip_bad: bool,
    report: CleaningReport,
    log: Callable[[str], None] = logger.warning,
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
            load_image(image_dir / row["image"])
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
    as (3, H, W) in [-1, 1], with caption, boxes and phrases. Images are read with ``vlext.images.load_image``, so
    a file that went bad after ``verify_images`` still fails naming itself."""

    def __init__(self, rows: list[dict], image_dir: str | Path, resolution: int):
        self.rows, self.image_dir, self.resolution = rows, Path(image_dir), resolution

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        image = load_image(self.image_dir / row["image"])
        image = image.resize((self.resolution, self.resolution), Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        return {"pixels": pixels, "caption": row["caption"], "boxes": row["boxes"], "phrases": row["phrases"]}
