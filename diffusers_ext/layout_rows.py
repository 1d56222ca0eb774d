"""GLIGEN-style grounding rows: reading, checking and box cleaning, for the trainer and the evaluation.

A row is ``{"image": path, "caption": str, "boxes": [[x0, y0, x1, y1], ...], "phrases": [str, ...]}`` with
boxes normalized to [0, 1] (``vlext.toyworld.write_grounding_jsonl`` writes exactly this). Cleaning follows
GLIGEN's data recipe (Li et al., CVPR 2023): boxes under a minimum area (1% by default) or side are dropped,
and only the ``max_objs`` largest boxes are kept. Every dropped box and row is counted in a
``CleaningReport`` so the user sees what the data lost. Malformed rows are errors naming the file and line,
never silently skipped or repaired: a phrase/box count mismatch, NaN, and any box that breaks the project's
box rule (:mod:`vlext.boxes`: 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1; a box outside [0, 1] is usually pixel
coordinates or a wrong normalization, which clamping would hide).

The evaluation reads the same rows with ``strict=True``: nothing is dropped (every box is scored), a key
outside the row format and an empty layout are errors. The trainer's dataset and its image checks are in
:mod:`diffusers_ext.training.dataset`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from vlext.boxes import check_box
from vlext.jsonl import read_jsonl_objects

__all__ = [
    "CleaningReport",
    "ROW_HINT",
    "ROW_KEYS",
    "check_layout_shape",
    "clean_layout",
    "read_grounding_rows",
]

ROW_KEYS = ("image", "caption", "boxes", "phrases")
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


def check_layout_shape(phrases, boxes, where: str = "layout") -> None:
    """Refuse the two shapes that used to be misread: ``phrases`` as one string (read as one phrase per
    character) and a single box not nested in a list (read as four boxes)."""
    if isinstance(phrases, str) or not isinstance(phrases, (list, tuple)):
        raise ValueError(
            f"{where}: phrases must be a list of strings, one per box, got {type(phrases).__name__} {phrases!r}"
            + (f"; for one object write [{phrases!r}]" if isinstance(phrases, str) else "")
        )
    if not isinstance(boxes, (list, tuple)) or any(isinstance(b, (int, float)) for b in boxes):
        hint = (
            f"; for one box write [{list(boxes)}]"
            if isinstance(boxes, (list, tuple)) and len(boxes) == 4
            else ""
        )
        raise ValueError(
            f"{where}: boxes must be a list of [x0, y0, x1, y1] lists, one per phrase, got {boxes!r}{hint}"
        )


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
    check_layout_shape(phrases, boxes, where)
    if len(boxes) != len(phrases):
        raise ValueError(f"{where}: {len(phrases)} phrases but {len(boxes)} boxes; each phrase needs one box")
    kept = []
    for i, (box, phrase) in enumerate(zip(boxes, phrases, strict=True)):
        report.boxes_read += 1
        box = check_box(box, where, i)
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
    jsonl: str | Path,
    *,
    min_area: float = 0.0,
    min_side: float = 0.0,
    max_objs: int | None = None,
    strict: bool = False,
    optional_keys: tuple[str, ...] = (),
    limit: int | None = None,
    flag: str = "--mixed-data",
) -> tuple[list[dict], CleaningReport]:
    """Read, check and clean the rows of ``jsonl``; errors name ``file:line``.

    Args:
        jsonl: the rows' JSONL file (``flag`` names it in errors).
        min_area, min_side, max_objs: GLIGEN's cleaning (:func:`clean_layout`); ``max_objs=None`` keeps all.
        strict: the evaluation's reading: a key other than ``ROW_KEYS`` and ``optional_keys``, an empty
            layout and an empty caption are errors (the trainer ignores other keys and drops rows left
            without boxes, counted).
        optional_keys: keys copied into the row when present (with ``strict``, the only other keys allowed).
        limit: stop after this many rows (the later lines are not read).

    Returns:
        (rows, report): each row ``{"image", "caption", "boxes", "phrases", "where"}`` plus the optional keys
        it has; ``report`` counts what was read, dropped and kept.
    """
    jsonl = Path(jsonl)
    if not jsonl.is_file():
        raise FileNotFoundError(f"{flag} {jsonl} does not exist (a JSONL of {ROW_HINT} rows)")
    report, rows = CleaningReport(), []
    for where, row in read_jsonl_objects(jsonl, ROW_HINT):
        if limit is not None and len(rows) >= limit:
            break
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise ValueError(f"{where}: missing keys {missing}; each line must be {ROW_HINT}")
        if strict:
            unknown = sorted(set(row) - set(ROW_KEYS) - set(optional_keys))
            if unknown:
                raise ValueError(
                    f"{where}: unknown keys {unknown}; accepted: {', '.join(ROW_KEYS + tuple(optional_keys))}"
                )
        if not isinstance(row["image"], str) or not row["image"].strip():
            raise ValueError(f"{where}: 'image' must be a non-empty path string, got {row['image']!r}")
        if not isinstance(row["caption"], str):
            # str() made a null caption train as the text "None" and a list as "['a', 'b']"
            raise ValueError(
                f"{where}: 'caption' must be a string (\"\" for none), got {type(row['caption']).__name__} "
                f"{row['caption']!r}"
            )
        check_layout_shape(row["phrases"], row["boxes"], where)
        if strict and not row["phrases"]:
            raise ValueError(f"{where}: boxes and phrases must be non-empty lists of the same length")
        report.rows_read += 1
        boxes, phrases = clean_layout(
            row["boxes"],
            row["phrases"],
            min_area=min_area,
            min_side=min_side,
            max_objs=len(row["boxes"]) if max_objs is None else max_objs,
            report=report,
            where=where,
        )
        if strict and not (isinstance(row["caption"], str) and row["caption"].strip()):
            raise ValueError(f"{where}: caption must be a non-empty string")
        if not boxes:
            report.rows_dropped_no_boxes += 1
            continue
        rows.append(
            {
                "image": row["image"],
                "caption": row["caption"],
                "boxes": boxes,
                "phrases": phrases,
                "where": where,
                **{k: row[k] for k in optional_keys if k in row},
            }
        )
    report.rows_kept = len(rows)
    return rows, report
