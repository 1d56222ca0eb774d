"""FG-CLIP-style region pieces: box filtering, region features by roi_align, and the region InfoNCE loss.

FG-CLIP (360CVGroup/FG-CLIP) pools each box from the patch-token map with roi_align and projects it like
the global feature, then contrasts it with the box's caption. Boxes are filtered first and what was dropped
is counted, because silently losing boxes hides data problems (degenerate boxes from a converter, boxes in
pixels instead of normalized). Not wired into ``clip_ext.train`` yet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

__all__ = ["filter_boxes", "region_features", "region_contrastive_loss"]


def filter_boxes(
    boxes: torch.Tensor, min_area: float, min_side: float, where: str = "boxes"
) -> tuple[torch.Tensor, dict[str, int]]:
    """Clamp normalized xyxy boxes to [0, 1] and keep those with enough area and side; returns (keep, counts).

    Boxes outside [0, 1] by more than a rounding error, or with x1 < x0 / y1 < y0, are refused with an error
    naming ``where`` (a file and line), since they mean the data is not in normalized xyxy at all.
    """
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(
            f"{where}: boxes must have shape (N, 4) as [x0, y0, x1, y1], got {tuple(boxes.shape)}"
        )
    if not torch.isfinite(boxes).all() or (boxes < -0.01).any() or (boxes > 1.01).any():
        raise ValueError(f"{where}: boxes must be normalized to [0, 1] (xyxy), got values in "
                         f"[{boxes.min().item():.3g}, {boxes.max().item():.3g}]")  # fmt: skip
    if ((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).any():
        raise ValueError(f"{where}: boxes must satisfy x0 <= x1 and y0 <= y1 (xyxy order)")
    clamped = boxes.clamp(0.0, 1.0)
    width, height = clamped[:, 2] - clamped[:, 0], clamped[:, 3] - clamped[:, 1]
    small_side = (width < min_side) | (height < min_side)
    small_area = ~small_side & (width * height < min_area)
    keep = ~(small_side | small_area)
    counts = {"kept": int(keep.sum()), "dropped_min_side": int(small_side.sum()),
              "dropped_min_area": int(small_area.sum())}  # fmt: skip
    return clamped[keep], counts


def region_features(patch_map: torch.Tensor, boxes: list[torch.Tensor], output_size: int = 1) -> torch.Tensor:
    """roi_align over a (B, C, H, W) patch-token map with normalized xyxy boxes per image -> (sum N_i, C)."""
    height, width = patch_map.shape[-2:]
    scale = torch.tensor([width, height, width, height], dtype=patch_map.dtype, device=patch_map.device)
    pixel_boxes = [b.to(patch_map.dtype) * scale for b in boxes]
    pooled = roi_align(patch_map, pixel_boxes, output_size=output_size, spatial_scale=1.0, aligned=True)
    return pooled.mean(dim=(-2, -1))


def region_contrastive_loss(
    region: torch.Tensor, caption: torch.Tensor, valid: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE between (N, D) region and caption features over the rows where ``valid`` is True.

    Padding rows (``valid`` False) are neither anchors nor negatives. ``logit_scale`` is the region head's
    own log temperature, clamped at ln(100) as open_clip clamps the global one.
    """
    if region.shape != caption.shape or valid.shape != region.shape[:1]:
        raise ValueError(f"region {tuple(region.shape)}, caption {tuple(caption.shape)} and valid "
                         f"{tuple(valid.shape)} must agree on (N, D) / (N,)")  # fmt: skip
    region, caption = F.normalize(region[valid], dim=-1), F.normalize(caption[valid], dim=-1)
    if region.shape[0] == 0:
        return region.sum() * 0.0
    scale = logit_scale.clamp(max=torch.log(torch.tensor(100.0))).exp()
    logits = scale * region @ caption.T
    labels = torch.arange(region.shape[0], device=region.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
