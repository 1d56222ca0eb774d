"""Layout scores of generated images from any detector: one code path for the toy world and real images.

The "oracle" evaluation of layout-conditioned generation (GLIGEN, Li et al., CVPR 2023; MIGC, Zhou et al.,
CVPR 2024): each requested object is matched to the best-scoring detection of its own phrase, and its
detected box is compared with the requested one:

- ``iou`` per object; ``mean_iou`` and ``share_iou_gt_0.5`` over all objects (an object its detector does
  not find counts as IoU 0: a failure, not a skipped sample);
- ``share_center_in_box``: the detected box's centre lies inside the requested box (placement alone);
- ``ap`` / ``ap50``: COCO box AP (IoU 0.5:0.95) and AP at IoU 0.5 from torchmetrics'
  ``MeanAveragePrecision`` over every candidate the detector returned, one class per distinct phrase.

A layout may repeat a phrase ("a dog", "a dog"): its m objects then take the phrase's m best-scoring
candidates, assigned to them by the largest total IoU (which of two identical dogs is which is not a
question a detector can answer). Per-image records are plain JSON, so ``summarize`` recomputes the same
summary from records stored by an earlier, interrupted run.

:func:`layout_scores` is the toy-world entry point the demo uses: on toy-world prompts every object has a
distinct palette colour, so the toy world's colour locator (``ToyColourDetector``) is the detector and no
model is needed; only the detector differs from a real run of ``python -m diffusers_ext.evaluation.evaluate``.
"""

from __future__ import annotations

from collections.abc import Sequence

from diffusers_ext.evaluation.detectors import ToyColourDetector
from vlext.toyworld import box_iou

__all__ = ["layout_scores", "score_image", "score_layouts", "summarize"]


def _center_inside(found, box) -> bool:
    cx, cy = (found[0] + found[2]) / 2, (found[1] + found[3]) / 2
    return box[0] <= cx <= box[2] and box[1] <= cy <= box[3]


def score_image(image_size, boxes, phrases, detections, detector_phrases=None) -> dict:
    """Match one image's detections to its requested objects; returns its JSON-ready record.

    ``image_size`` (width, height); ``boxes`` normalized xyxy, one per phrase; ``detections`` the
    detector's ``Detection`` list for ``detector_phrases`` (defaults to ``phrases``, in the same order).
    """
    from scipy.optimize import linear_sum_assignment

    detector_phrases = list(phrases if detector_phrases is None else detector_phrases)
    if not (len(boxes) == len(phrases) == len(detector_phrases)):
        raise ValueError(
            f"{len(boxes)} boxes, {len(phrases)} phrases and {len(detector_phrases)} detector phrases; "
            "give one of each per object"
        )
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(detector_phrases):
        groups.setdefault(p, []).append(i)
    objects: list[dict | None] = [None] * len(boxes)
    kept = []
    for phrase, members in groups.items():
        # objects with the same phrase got the same candidates; read those of the first one only
        first = members[0]
        cands = sorted((d for d in detections if d.phrase_index == first), key=lambda d: -d.score)
        kept += [{"phrase": phrase, "box": list(d.box), "score": d.score} for d in cands]
        top = cands[: len(members)]
        assigned: dict[int, object] = {}
        if len(members) == 1 and top:
            assigned[members[0]] = top[0]
        elif top:
            cost = [[-box_iou(d.box, boxes[m]) for d in top] for m in members]
            rows, cols = linear_sum_assignment(cost)
            assigned = {members[r]: top[c] for r, c in zip(rows, cols, strict=True)}
        for m in members:
            d = assigned.get(m)
            objects[m] = {
                "phrase": phrases[m],
                "detector_phrase": phrase,
                "box": [float(v) for v in boxes[m]],
                "detected": None if d is None else [float(v) for v in d.box],
                "score": None if d is None else float(d.score),
                "iou": 0.0 if d is None else box_iou(d.box, boxes[m]),
                "center_in_box": d is not None and _center_inside(d.box, boxes[m]),
            }
    return {"size": [int(image_size[0]), int(image_size[1])], "objects": objects, "detections": kept}


def _average_precision(records: Sequence[dict]) -> tuple[float, float]:
    """COCO box AP and AP50 (torchmetrics ``MeanAveragePrecision``), boxes in pixels, a class per phrase."""
    import torch
    from torchmetrics.detection import MeanAveragePrecision

    classes = {
        p: i for i, p in enumerate(sorted({o["detector_phrase"] for r in records for o in r["objects"]}))
    }
    preds, targets = [], []
    for r in records:
        w, h = r["size"]
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        det = [d for d in r["detections"] if d["phrase"] in classes]
        preds.append(
            {
                "boxes": torch.tensor([d["box"] for d in det], dtype=torch.float32).reshape(-1, 4) * scale,
                "scores": torch.tensor([d["score"] for d in det], dtype=torch.float32),
                "labels": torch.tensor([classes[d["phrase"]] for d in det], dtype=torch.long),
            }
        )
        targets.append(
            {
                "boxes": torch.tensor([o["box"] for o in r["objects"]], dtype=torch.float32).reshape(-1, 4)
                * scale,
                "labels": torch.tensor(
                    [classes[o["detector_phrase"]] for o in r["objects"]], dtype=torch.long
                ),
            }
        )
    metric = MeanAveragePrecision(iou_type="bbox", box_format="xyxy")
    metric.update(preds, targets)
    result = metric.compute()
    return float(result["map"]), float(result["map_50"])


def summarize(records: Sequence[dict]) -> dict:
    """Summary over per-image records (from ``score_image``): counts, mean IoU, shares, AP, AP50."""
    objects = [o for r in records for o in r["objects"]]
    if not objects:
        raise ValueError("no objects requested: nothing to score")
    ious = [o["iou"] for o in objects]
    ap, ap50 = _average_precision(records)
    return {
        "n_images": len(records),
        "n_objects": len(objects),
        "n_detected": sum(o["detected"] is not None for o in objects),
        "mean_iou": sum(ious) / len(ious),
        "share_iou_gt_0.5": sum(i > 0.5 for i in ious) / len(ious),
        "share_center_in_box": sum(o["center_in_box"] for o in objects) / len(objects),
        "ap": ap,
        "ap50": ap50,
    }


def score_layouts(images: Sequence, layouts: Sequence[dict], detector) -> tuple[list[dict], dict]:
    """Detect and score: ``images`` (PIL) with ``layouts`` (dicts with ``boxes``, ``phrases`` and optionally
    ``detector_phrases``, one per image) -> (per-image records, summary). The same function scores the toy
    world with ``ToyColourDetector`` and real images with a zero-shot detector."""
    if len(images) != len(layouts):
        raise ValueError(f"{len(images)} images but {len(layouts)} layouts; give one layout per image")
    queries = [list(lay.get("detector_phrases") or lay["phrases"]) for lay in layouts]
    detections = detector.detect(list(images), queries)
    records = [
        score_image(im.size, lay["boxes"], lay["phrases"], dets, q)
        for im, lay, dets, q in zip(images, layouts, detections, queries, strict=True)
    ]
    return records, summarize(records)


def layout_scores(images: Sequence, requests: Sequence[Sequence[tuple[str, Sequence[float]]]]) -> dict:
    """Toy-world layout scores over all requested (colour, xyxy box) pairs, detected by colour.

    ``mean_iou`` and ``share_iou_gt_0.5`` compare the detected box with the requested one; they also
    punish an object drawn in the right place but smaller or paler than asked. ``share_center_in_box``
    asks only whether the detected object's centre lies inside its box: placement alone, the question
    layout control is about (a pointing-game style hit rate). An object whose colour is not found counts
    as IoU 0 and as a miss (a failure, not a skipped sample). ``ap`` / ``ap50`` are torchmetrics' box AP.

    Args:
        images: PIL images of toy-world scenes, one per request list.
        requests: per image, the requested objects as (palette colour name, normalized xyxy box) pairs.

    Returns:
        The :func:`summarize` dict plus ``ious``, every object's IoU in request order.

    Example:
        >>> from vlext.toyworld import ToyWorld
        >>> scene = next(iter(ToyWorld(seed=3, image_size=64, max_objects=1, backgrounds=("plain",)).scenes(1)))
        >>> scores = layout_scores([scene.render()], [[(o.color, o.box) for o in scene.objects]])
        >>> round(scores["mean_iou"], 2) > 0.9
        True
    """
    if len(images) != len(requests):
        raise ValueError(f"{len(images)} images but {len(requests)} request lists; give one list per image")
    layouts = [
        {"boxes": [list(box) for _, box in objs], "phrases": [c for c, _ in objs]} for objs in requests
    ]
    records, summary = score_layouts(images, layouts, ToyColourDetector())
    summary["ious"] = [o["iou"] for r in records for o in r["objects"]]
    return summary
