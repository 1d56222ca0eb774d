"""Layout evaluation on the toy world: did each object land in its requested box?

GLIGEN-style layout control is scored by detecting each requested object and comparing its box with the
request (the YOLO-score / mIoU of GLIGEN and MIGC). On toy-world prompts every object has a distinct
palette colour, so the toy world's colour locator is the detector and no model is needed. The scoring is
:func:`diffusers_ext.evaluation.layout_scoring.score_layouts`, the same code path ``python -m diffusers_ext.evaluation.evaluate``
runs on real images with OWLv2 or Grounding DINO; only the detector differs.
"""

from __future__ import annotations

from collections.abc import Sequence

from diffusers_ext.evaluation.detectors import ToyColourDetector
from diffusers_ext.evaluation.layout_scoring import score_layouts

__all__ = ["layout_scores"]


def layout_scores(images: Sequence, requests: Sequence[Sequence[tuple[str, Sequence[float]]]]) -> dict:
    """Layout scores over all requested (colour, xyxy box) pairs.

    ``mean_iou`` and ``share_iou_gt_0.5`` compare the detected box with the requested one; they also
    punish an object drawn in the right place but smaller or paler than asked. ``share_center_in_box``
    asks only whether the detected object's centre lies inside its box: placement alone, the question
    layout control is about (a pointing-game style hit rate). An object whose colour is not found counts
    as IoU 0 and as a miss (a failure, not a skipped sample). ``ap`` / ``ap50`` are torchmetrics' box AP.
    """
    if len(images) != len(requests):
        raise ValueError(f"{len(images)} images but {len(requests)} request lists; give one list per image")
    layouts = [
        {"boxes": [list(box) for _, box in objs], "phrases": [c for c, _ in objs]} for objs in requests
    ]
    records, summary = score_layouts(images, layouts, ToyColourDetector())
    summary["ious"] = [o["iou"] for r in records for o in r["objects"]]
    return summary
