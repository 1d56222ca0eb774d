"""Training samples in GLIGEN's data recipe, and the sampler that keeps resume exact with loader workers.

GLIGEN (Li et al., CVPR 2023; its box-text config: ``random_crop: False``, ``random_flip: True``, 512 px,
at most 30 boxes) keeps each image's aspect ratio: the shorter side is resized to the training resolution,
a square is cropped (centre by default), the image is mirrored half of the time, and every box is
recomputed in the crop; boxes that leave the crop or become too small there are dropped and the 30
largest are kept. The order of the steps and the micro-conditioning follow diffusers' SDXL training
script (``examples/text_to_image/train_text_to_image_sdxl.py``): resize, flip, crop, and
``original_size = (h, w)`` before the resize, ``crop_top_left = (top, left)`` in the resized image,
``target_size = (res, res)``.

Images are decoded fully before training starts (:func:`verify_images`) and at every read, with
:func:`vlext.images.load_image` (PIL's ``LOAD_TRUNCATED_IMAGES`` forced off for our reads: LAVIS switches
it on process-wide when imported, which would let a half-written PNG train as a partly grey image).

Determinism. Which way a sample is cropped and flipped is drawn from a generator seeded by
(seed, epoch, sample index), never from a worker's or the process's random state, so any number of
``DataLoader`` workers and a resumed run see the same pixels. ``EpochBatchSampler`` yields this rank's
share of the (seed, epoch) permutation as ``(epoch, index)`` keys, from a given step on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffusers_ext.layout_rows import CleaningReport, clean_layout
from vlext.images import BadImageError, load_image

__all__ = [
    "CROP_MODES",
    "CropPlan",
    "EpochBatchSampler",
    "GroundingCrops",
    "augmentation_rng",
    "collate_samples",
    "crop_boxes",
    "plan_crop",
    "to_unit_range",
    "verify_images",
]

logger = logging.getLogger(__name__)

# "none": resize to a square without cropping (non-square images are squashed), the trainer's old behaviour
CROP_MODES = ("center", "random", "none")


def verify_images(
    rows: list[dict],
    image_dir: str | Path,
    *,
    skip_bad: bool,
    report: CleaningReport,
    log: Callable[[str], None] = logger.warning,
    progress: bool = True,
    rank: int = 0,
    world: int = 1,
    gather: Callable[[list], list] | None = None,
) -> list[dict]:
    """Decode every row's image once before training. A missing file is always an error (usually a wrong
    ``--image-dir``); an unreadable one is an error naming every such file, or with ``skip_bad`` the row is
    left out, logged and counted in ``report.rows_skipped_bad_image``.

    With ``world`` processes each decodes only its share (every ``world``-th row from ``rank``) and
    ``gather`` (accelerate's ``gather_object``: every rank's list, concatenated) combines the bad rows, so
    the images are decoded once in all, not once per process, and every rank keeps the same rows."""
    from tqdm.auto import tqdm

    image_dir = Path(image_dir)
    absent = [r for r in rows if not (image_dir / r["image"]).is_file()]
    if absent:
        raise FileNotFoundError(
            f"{len(absent)} images not found under --image-dir {image_dir} "
            f"(first: {absent[0]['where']}: {image_dir / absent[0]['image']})"
        )
    bad = []
    share = range(rank, len(rows), world)
    for i in tqdm(share, desc="checking images", disable=not progress, leave=False):
        row = rows[i]
        try:
            load_image(image_dir / row["image"])
        except BadImageError as e:
            bad.append((i, f"{row.get('where', 'row')}: {e}"))
    if world > 1:
        if gather is None:
            raise ValueError("verify_images with world > 1 needs gather (accelerate.utils.gather_object)")
        bad = gather(bad)
    bad.sort()
    if bad and not skip_bad:
        lines = [line for _, line in bad]
        shown = "\n  ".join(lines[:10]) + (f"\n  ... and {len(lines) - 10} more" if len(lines) > 10 else "")
        raise BadImageError(
            f"{len(bad)} of {len(rows)} images cannot be read:\n  {shown}\n"
            "replace or remove them, or pass --skip-bad-images to train without those rows (each is logged)"
        )
    for _, line in bad:
        log(f"skipping bad image: {line}")
    dropped = {i for i, _ in bad}
    kept = [row for i, row in enumerate(rows) if i not in dropped]
    report.rows_skipped_bad_image += len(bad)
    report.rows_kept = len(kept)
    return kept


@dataclass(frozen=True)
class CropPlan:
    """Where a sample's square comes from: ``original_size`` (h, w) of the file, ``resized`` (h, w) after
    the aspect-preserving resize, the crop's ``top``/``left`` in the (flipped) resized image, ``flip``."""

    original_size: tuple[int, int]
    resized: tuple[int, int]
    top: int
    left: int
    flip: bool


def augmentation_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one sample's crop offset and flip: a function of (seed, epoch, index) only."""
    return np.random.default_rng([seed, epoch, index, 0x6C1])


def plan_crop(width: int, height: int, resolution: int, mode: str, rng: np.random.Generator, flip: bool):
    """The crop of a ``width`` x ``height`` image for ``mode`` (see ``CROP_MODES``); ``flip`` mirrors it
    half of the time (one draw of ``rng``, before the crop offset's draws, always made so that turning the
    crop mode does not shift the flips)."""
    if mode not in CROP_MODES:
        raise ValueError(f"crop mode {mode!r}: expected one of {CROP_MODES}")
    flipped = bool(rng.random() < 0.5) and flip
    if mode == "none":
        return CropPlan((height, width), (resolution, resolution), 0, 0, flipped)
    # torchvision's Resize(resolution), which the SDXL script uses: shorter side = resolution, longer floored
    short, long = min(width, height), max(width, height)
    new_long = int(resolution * long / short)
    new_w, new_h = (resolution, new_long) if width <= height else (new_long, resolution)
    if mode == "center":
        top, left = round((new_h - resolution) / 2), round((new_w - resolution) / 2)
    else:
        top, left = int(rng.integers(0, new_h - resolution + 1)), int(rng.integers(0, new_w - resolution + 1))
    return CropPlan((height, width), (new_h, new_w), top, left, flipped)


def crop_boxes(boxes: list[list[float]], plan: CropPlan, resolution: int) -> list[list[float] | None]:
    """Normalized xyxy boxes of the original image -> normalized boxes in the crop (clipped to it), or
    None for a box with nothing left inside the crop."""
    new_h, new_w = plan.resized
    out = []
    for x0, y0, x1, y1 in boxes:
        x0, x1 = x0 * new_w, x1 * new_w
        if plan.flip:
            x0, x1 = new_w - x1, new_w - x0
        x0, x1 = x0 - plan.left, x1 - plan.left
        y0, y1 = y0 * new_h - plan.top, y1 * new_h - plan.top
        x0, y0 = max(0.0, x0) / resolution, max(0.0, y0) / resolution
        x1, y1 = min(float(resolution), x1) / resolution, min(float(resolution), y1) / resolution
        out.append([x0, y0, x1, y1] if x1 > x0 and y1 > y0 else None)
    return out


def clean_cropped_layout(
    row: dict,
    plan: CropPlan,
    resolution: int,
    *,
    min_area: float,
    min_side: float,
    max_objs: int,
    report: CleaningReport,
) -> tuple[list[list[float]], list[str]]:
    """GLIGEN's order: recompute the boxes in the crop, drop those that left it ("left the crop") and those
    under ``min_area``/``min_side`` there (counted as "too small after crop" when they were large enough
    in the original image, else as small), then keep the ``max_objs`` largest. ``boxes_read`` is
    counted when the rows are read, not here."""
    inside, phrases, small_before = [], [], []
    for box, cropped, phrase in zip(row["boxes"], crop_boxes(row["boxes"], plan, resolution), row["phrases"]):
        if cropped is None:
            report.boxes_left_crop += 1
            continue
        inside.append(cropped)
        phrases.append(phrase)
        w, h = box[2] - box[0], box[3] - box[1]
        small_before.append(w * h < min_area or min(w, h) < min_side)
    step = CleaningReport()
    kept, kept_phrases = clean_layout(
        inside, phrases, min_area=min_area, min_side=min_side, max_objs=max_objs, report=step
    )
    dropped = [
        i
        for i, b in enumerate(inside)
        if (b[2] - b[0]) * (b[3] - b[1]) < min_area or min(b[2] - b[0], b[3] - b[1]) < min_side
    ]
    were_small = sum(small_before[i] for i in dropped)
    report.boxes_dropped_small += were_small
    report.boxes_small_after_crop += step.boxes_dropped_small - were_small
    report.boxes_dropped_over_max_objs += step.boxes_dropped_over_max_objs
    return kept, kept_phrases


def _transform(image: Image.Image, plan: CropPlan, resolution: int) -> torch.Tensor:
    new_h, new_w = plan.resized
    image = image.resize((new_w, new_h), Image.BICUBIC)
    if plan.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if (new_h, new_w) != (resolution, resolution):
        image = image.crop((plan.left, plan.top, plan.left + resolution, plan.top + resolution))
    # uint8 across the worker boundary (a quarter of float32's bytes); ``to_unit_range`` scales on the device
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1], the VAE's input range (the same numbers as scaling in numpy)."""
    return pixels.float() / 127.5 - 1.0


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the file's header."""
    with Image.open(path) as image:
        return image.size


class GroundingCrops(torch.utils.data.Dataset):
    """Grounding rows as training samples in GLIGEN's recipe, indexed by ``(epoch, index)`` keys.

    A sample is ``pixels`` (3, res, res) uint8 (``to_unit_range`` maps them to [-1, 1]; absent when ``cache`` holds its latents: then
    ``latent_mean``/``latent_std``), ``caption``, the ``boxes`` and ``phrases`` left in the crop,
    ``original_size`` and ``crop_top_left`` for SDXL's micro-conditioning, and, with a ``cache``, the
    cached ``prompt_embeds`` (+ ``pooled``) and ``phrase_feats``. Rows must carry ``size`` (w, h):
    ``prepare_rows`` adds it and applies the crop cleaning of epoch 0 to the report."""

    def __init__(
        self,
        rows: list[dict],
        image_dir: str | Path,
        resolution: int,
        *,
        crop: str = "center",
        flip: bool = True,
        seed: int = 0,
        min_area: float = 0.0,
        min_side: float = 0.0,
        max_objs: int = 30,
        cache=None,
    ):
        if crop not in CROP_MODES:
            raise ValueError(f"crop {crop!r}: expected one of {CROP_MODES}")
        self.rows, self.image_dir, self.resolution = rows, Path(image_dir), resolution
        self.crop, self.flip, self.seed = crop, flip, seed
        self.min_area, self.min_side, self.max_objs = min_area, min_side, max_objs
        self.cache = cache

    def __len__(self) -> int:
        return len(self.rows)

    def plan(self, epoch: int, index: int) -> CropPlan:
        """The crop and flip of sample ``index`` in ``epoch``, drawn for the row's ``crop_key`` (its index
        before ``prepare_rows`` dropped rows without boxes), so the crop a row was cleaned with is the crop
        it trains on."""
        row = self.rows[index]
        w, h = row["size"]
        rng = augmentation_rng(self.seed, epoch, row.get("crop_key", index))
        return plan_crop(w, h, self.resolution, self.crop, rng, self.flip)

    def layout(self, epoch: int, index: int, report: CleaningReport | None = None):
        plan = self.plan(epoch, index)
        boxes, phrases = clean_cropped_layout(
            self.rows[index],
            plan,
            self.resolution,
            min_area=self.min_area,
            min_side=self.min_side,
            max_objs=self.max_objs,
            report=report if report is not None else CleaningReport(),
        )
        return plan, boxes, phrases

    def __getitem__(self, key) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        row = self.rows[index]
        plan, boxes, phrases = self.layout(epoch, index)
        sample = {
            "caption": row["caption"],
            "boxes": boxes,
            "phrases": phrases,
            "original_size": plan.original_size,
            "crop_top_left": (plan.top, plan.left),
        }
        if self.cache is not None:
            sample.update(self.cache.sample_conditioning(row, phrases, plan))
        if "latent_mean" not in sample:
            image = load_image(self.image_dir / row["image"])
            sample["pixels"] = _transform(image, plan, self.resolution)
        return sample


def prepare_rows(dataset: GroundingCrops, report: CleaningReport) -> list[dict]:
    """Add each row's image ``size`` and apply epoch 0's crop cleaning, counting into ``report``; rows with
    no box left in their crop are dropped (``rows_dropped_no_boxes``). Returns the kept rows (also set on
    ``dataset``). With ``--random-crop`` later epochs crop elsewhere and clean the same way per sample."""
    kept = []
    for i, row in enumerate(dataset.rows):
        row.setdefault("size", image_size(dataset.image_dir / row["image"]))
        # the crop is drawn for this key, which stays with the row when the rows are renumbered below (it
        # used to be the index: a kept row then trained on the crop of the row that had its new index)
        row.setdefault("crop_key", i)
    all_rows = dataset.rows
    for i, row in enumerate(all_rows):
        _, boxes, _ = dataset.layout(0, i, report)
        if boxes:
            kept.append(row)
        else:
            report.rows_dropped_no_boxes += 1
    dataset.rows = kept
    report.rows_kept = len(kept)
    return kept


class EpochBatchSampler(torch.utils.data.Sampler):
    """This rank's batches of one epoch: (micro-)step ``s`` takes ``order[s*B*W + r*B : ... + B]`` of the
    permutation seeded by ``seed + epoch`` (B per process, W processes, rank r), from ``start_step`` on;
    with ``accumulation`` micro-batches per optimizer step, a whole number of optimizer steps.
    ``set_epoch`` picks the epoch and the first step (a resumed run starts mid-epoch)."""

    def __init__(
        self, n: int, batch_size: int, *, world: int = 1, rank: int = 0, seed: int = 0, accumulation: int = 1
    ):
        self.n, self.batch_size, self.world, self.rank, self.seed = n, batch_size, world, rank, seed
        # micro-batches: a whole number of optimizer steps of ``accumulation`` micro-batches each
        self.steps_per_epoch = n // (batch_size * world * accumulation) * accumulation
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    def __iter__(self):
        order = torch.randperm(
            self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)
        ).tolist()
        global_batch = self.batch_size * self.world
        for step in range(self.start_step, self.steps_per_epoch):
            start = step * global_batch + self.rank * self.batch_size
            yield [(self.epoch, i) for i in order[start : start + self.batch_size]]


def collate_samples(samples: list[dict]) -> dict:
    """Stack the tensors of a batch (pixels or latents, cached embeddings); keep the rest as lists."""
    out = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        stackable = key in ("pixels", "latent_mean", "latent_std", "prompt_embeds", "pooled")
        out[key] = torch.stack(values) if stackable else values
    return out


def check_flip_and_latent_cache(crop: str, cache_latents: bool) -> None:
    """A random crop moves every epoch, so its latents cannot be cached (flips are cached both ways)."""
    if cache_latents and crop == "random":
        raise SystemExit(
            "--cache-latents with --random-crop: the crop offset is drawn anew every epoch, so the VAE "
            "latents cannot be computed once; use --center-crop (or --no-crop) with --cache-latents, or "
            "drop --cache-latents (prompt and phrase embeddings are still cached)"
        )
