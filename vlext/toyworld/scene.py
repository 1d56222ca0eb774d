"""Objects and scenes of the toy world, and how a scene is drawn.

A scene is pure data (objects with normalized xyxy boxes on a pixel grid, a background kind and a
seed); ``Scene.render`` draws it deterministically with PIL, so a dataset written twice from the same
seed is byte-identical. Each shape fills its box edge to edge, so the box of an object's pixels is the
object's box: layout metrics such as the IoU of a colour segmentation against the box then measure the
model, not the renderer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from vlext.boxes import check_box
from vlext.toyworld._validation import check_choice, check_image_size, check_lang, check_seed
from vlext.toyworld.palette import (
    BACKGROUND_GREYS,
    BACKGROUNDS,
    BACKGROUNDS_EN,
    BACKGROUNDS_ZH,
    COLORS,
    COLORS_ZH,
    SHAPES,
    SHAPES_ZH,
    SIZES,
    SIZES_ZH,
    TEXTURE_AMPLITUDE,
)

__all__ = ["Scene", "ToyObject"]


@dataclass(frozen=True)
class ToyObject:
    """One coloured shape; ``box`` is xyxy normalized to [0, 1] of the image side."""

    shape: str
    color: str
    size: str
    box: tuple[float, float, float, float]

    def __post_init__(self):
        check_choice("shape", self.shape, SHAPES)
        check_choice("color", self.color, COLORS)
        check_choice("size", self.size, SIZES)
        check_box(self.box, "ToyObject")

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLORS[self.color]

    @property
    def name_en(self) -> str:
        """Definite reference used by edit instructions ("the red circle"); colours are unique per scene."""
        return f"the {self.color} {self.shape}"

    @property
    def name_zh(self) -> str:
        return f"{COLORS_ZH[self.color]}{SHAPES_ZH[self.shape]}"

    @property
    def phrase_en(self) -> str:
        return f"a {self.size} {self.color} {self.shape}"

    @property
    def phrase_zh(self) -> str:
        return f"一个{SIZES_ZH[self.size]}{COLORS_ZH[self.color]}{SHAPES_ZH[self.shape]}"


def _join_en(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _join_zh(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return "、".join(items[:-1]) + "和" + items[-1]


@dataclass
class Scene:
    """Objects on a background; ``seed`` fixes the background grey and texture."""

    objects: list[ToyObject]
    background: str
    image_size: int
    seed: int

    def __post_init__(self):
        check_choice("background", self.background, BACKGROUNDS)
        check_image_size(self.image_size)
        check_seed(self.seed)
        if not self.objects:
            raise ValueError("objects must hold at least one ToyObject")

    @property
    def boxes(self) -> list[tuple[float, float, float, float]]:
        return [o.box for o in self.objects]

    def phrases(self, lang: str = "en") -> list[str]:
        check_lang(lang)
        return [o.phrase_en if lang == "en" else o.phrase_zh for o in self.objects]

    @property
    def caption_en(self) -> str:
        return f"{_join_en(self.phrases('en'))} on {BACKGROUNDS_EN[self.background]}"

    @property
    def caption_zh(self) -> str:
        return f"{BACKGROUNDS_ZH[self.background]}上有{_join_zh(self.phrases('zh'))}"

    def caption(self, lang: str = "en") -> str:
        check_lang(lang)
        return self.caption_en if lang == "en" else self.caption_zh

    def render(self) -> Image.Image:
        """Draw the scene as an RGB image of ``image_size`` pixels per side; later objects on top."""
        image = Image.fromarray(_background(self.background, self.image_size, self.seed), "RGB")
        draw = ImageDraw.Draw(image)
        for obj in self.objects:
            _draw_shape(draw, obj, self.image_size)
        return image


def _background(kind: str, size: int, seed: int) -> np.ndarray:
    """Grey background; "texture" adds soft stripes and noise, still grey so no pixel looks coloured."""
    rng = np.random.default_rng(seed)
    grey = float(rng.choice(BACKGROUND_GREYS))
    plane = np.full((size, size), grey)
    if kind == "texture":
        yy, xx = np.mgrid[0:size, 0:size]
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(0.15, 0.35) * size
        phase = (xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period
        plane += 0.6 * TEXTURE_AMPLITUDE * np.sin(phase)
        plane += rng.uniform(-0.4, 0.4, size=(size, size)) * TEXTURE_AMPLITUDE
    plane = np.clip(np.rint(plane), 0, 255).astype(np.uint8)
    return np.repeat(plane[:, :, None], 3, axis=2)


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    vertices = []
    for k in range(2 * points):
        radius = 1.0 if k % 2 == 0 else inner
        angle = -math.pi / 2 + k * math.pi / points
        vertices.append((radius * math.cos(angle), radius * math.sin(angle)))
    return vertices


# Polygons in any coordinates; they are stretched to fill the object's box exactly.
_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(0, 0), (1, 0), (1, 1), (0, 1)],
    "triangle": [(0.5, 0), (1, 1), (0, 1)],
    "diamond": [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)],
    "cross": [
        (1 / 3, 0), (2 / 3, 0), (2 / 3, 1 / 3), (1, 1 / 3), (1, 2 / 3), (2 / 3, 2 / 3),
        (2 / 3, 1), (1 / 3, 1), (1 / 3, 2 / 3), (0, 2 / 3), (0, 1 / 3), (1 / 3, 1 / 3),
    ],
    "star": _star(),
}  # fmt: skip


def _draw_shape(draw: ImageDraw.ImageDraw, obj: ToyObject, size: int) -> None:
    # Pixel box with inclusive far edge: the box [x0, x1) covers pixels x0 .. x1 - 1.
    x0, y0, x1, y1 = (round(v * size) for v in obj.box)
    x1, y1 = x1 - 1, y1 - 1
    if obj.shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=obj.rgb)
        return
    poly = _POLYGONS[obj.shape]
    px = [p[0] for p in poly]
    py = [p[1] for p in poly]
    lo_x, hi_x, lo_y, hi_y = min(px), max(px), min(py), max(py)
    points = [
        (x0 + (x - lo_x) / (hi_x - lo_x) * (x1 - x0), y0 + (y - lo_y) / (hi_y - lo_y) * (y1 - y0))
        for x, y in poly
    ]
    draw.polygon(points, fill=obj.rgb)
