"""Layout evaluation on the toy world: did each object land in its requested box?

GLIGEN-style layout control is scored by detecting each requested object and comparing its box with the
request (the YOLO-score / mIoU of GLIGEN and MIGC). On toy-world prompts every object has a distinct
palette colour, so ``vlext.toyworld.locate`` (colour segmentation) is the detector: no model is needed.
CLIP score and FID need pretrained models; :func:`clip_score` and :func:`fid` are thin hooks into
torchmetrics for users who have them (the imports happen only when called).
"""

from __future__ import annotations

from collections.abc import Sequence

from vlext.toyworld import box_iou, locate

__all__ = ["clip_score", "fid", "layout_scores"]


def _center_inside(found, box) -> bool:
    cx, cy = (found[0] + found[2]) / 2, (found[1] + found[3]) / 2
    return box[0] <= cx <= box[2] and box[1] <= cy <= box[3]


def layout_scores(images: Sequence, requests: Sequence[Sequence[tuple[str, Sequence[float]]]]) -> dict:
    """Layout scores over all requested (colour, xyxy box) pairs.

    ``mean_iou`` and ``share_iou_gt_0.5`` compare the detected box with the requested one; they also
    punish an object drawn in the right place but smaller or paler than asked. ``share_center_in_box``
    asks only whether the detected object's centre lies inside its box: placement alone, the question
    layout control is about (a pointing-game style hit rate). An object whose colour is not found counts
    as IoU 0 and as a miss (a failure, not a skipped sample).
    """
    if len(images) != len(requests):
        raise ValueError(f"{len(images)} images but {len(requests)} request lists; give one list per image")
    ious, hits = [], []
    for image, objects in zip(images, requests, strict=True):
        for color, box in objects:
            found = locate(image, color)
            ious.append(0.0 if found is None else box_iou(found, box))
            hits.append(found is not None and _center_inside(found, box))
    if not ious:
        raise ValueError("no objects requested: nothing to score")
    return {
        "mean_iou": sum(ious) / len(ious),
        "share_iou_gt_0.5": sum(i > 0.5 for i in ious) / len(ious),
        "share_center_in_box": sum(hits) / len(hits),
        "n_objects": len(ious),
        "ious": ious,
    }


def clip_score(images, prompts, model_name_or_path: str = "openai/clip-vit-base-patch16") -> float:
    """CLIP score (torchmetrics) of uint8 (N, 3, H, W) images against their prompts; needs the CLIP model."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    metric = CLIPScore(model_name_or_path=model_name_or_path)
    return float(metric(images, list(prompts)))


def fid(real_images, fake_images, feature: int = 2048) -> float:
    """FID (torchmetrics) between two uint8 (N, 3, H, W) image batches; needs the Inception weights."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=feature)
    metric.update(real_images, real=True)
    metric.update(fake_images, real=False)
    return float(metric.compute())
