"""Find a named colour's object in an image: the layout check for generated toy-world images.

Layout-conditioned generators (GLIGEN, Li et al., CVPR 2023) are scored by whether the object appears
inside its box. For toy-world prompts a detector is unnecessary: every object has a distinct,
saturated palette colour, so a pixel is assigned to the nearest palette colour or to grey, and the
box of the largest connected region of the requested colour is the detection. Nearest-colour with a
distance limit tolerates the shading and colour drift of generated images; the largest component
ignores stray pixels of the same hue elsewhere.
"""

from __future__ import annotations

from collections import deque

import numpy as np
from PIL import Image

from vlext.toyworld._validation import check_color, check_count
from vlext.toyworld.palette import COLORS

__all__ = ["box_iou", "locate"]

# Greys compete with the palette so that white, black and grey pixels are never counted as a colour.
_GREYS = [(v, v, v) for v in (0, 64, 128, 192, 255)]


def box_iou(a, b) -> float:
    """Intersection over union of two xyxy boxes (any units, both the same)."""
    ax0, ay0, ax1, ay1 = (float(v) for v in a)
    bx0, by0, bx1, by1 = (float(v) for v in b)
    iw = max(0.0, min(ax1, bx1) - max(ax0, bx0))
    ih = max(0.0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    return inter / union if union > 0 else 0.0


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Pixel coordinates (row, col) of the largest 4-connected component of ``mask``."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    for r0, c0 in zip(*np.nonzero(mask)):
        if seen[r0, c0]:
            continue
        seen[r0, c0] = True
        component = [(int(r0), int(c0))]
        queue = deque(component)
        while queue:
            r, c = queue.popleft()
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    component.append((rr, cc))
                    queue.append((rr, cc))
        if len(component) > len(best):
            best = component
    return np.asarray(best)


def locate(image, color: str, min_pixels: int = 4, max_distance: float = 120.0):
    """Box (xyxy normalized to [0, 1]) of the largest region of ``color`` in ``image``, or None.

    Args:
        image: a PIL image or an (H, W, 3) uint8 array.
        color: a toy-world colour name.
        min_pixels: regions smaller than this are not a detection (returns None).
        max_distance: RGB distance beyond which a pixel matches no colour, even its nearest.
    """
    check_color(color)
    check_count("min_pixels", min_pixels, minimum=1)
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"))
    else:
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"image must be a PIL image or an (H, W, 3) array, got shape {array.shape}")
    h, w = array.shape[:2]
    anchors = np.array(list(COLORS.values()) + _GREYS, dtype=np.float32)
    pixels = array.reshape(-1, 1, 3).astype(np.float32)
    dist = np.sqrt(((pixels - anchors[None]) ** 2).sum(-1))
    index = list(COLORS).index(color)
    mask = (dist.argmin(1) == index) & (dist[:, index] <= max_distance)
    mask = mask.reshape(h, w)
    if mask.sum() < min_pixels:
        return None
    points = _largest_component(mask)
    if len(points) < min_pixels:
        return None
    rows, cols = points[:, 0], points[:, 1]
    return (
        float(cols.min() / w),
        float(rows.min() / h),
        float((cols.max() + 1) / w),
        float((rows.max() + 1) / h),
    )
