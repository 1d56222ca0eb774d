"""The vocabulary of the toy world: colours, shapes, sizes and backgrounds, in English and Chinese.

This is the one place the toy world's defaults live. Colours are saturated and spread around the hue
circle (neighbours at least 25 degrees and 100 RGB units apart), so a colour segmentation by nearest palette entry recovers an
object from a rendered or a generated image; backgrounds are strictly grey (R = G = B), so no texture
pixel can be mistaken for an object colour.
"""

from __future__ import annotations

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 125, 0),
    "yellow": (245, 230, 0),
    "green": (30, 170, 50),
    "cyan": (0, 190, 210),
    "blue": (30, 60, 225),
    "purple": (145, 45, 200),
}
COLORS_ZH: dict[str, str] = {
    "red": "红色",
    "orange": "橙色",
    "yellow": "黄色",
    "green": "绿色",
    "cyan": "青色",
    "blue": "蓝色",
    "purple": "紫色",
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
SHAPES_ZH: dict[str, str] = {
    "circle": "圆形",
    "square": "正方形",
    "triangle": "三角形",
    "star": "星形",
    "diamond": "菱形",
    "cross": "十字形",
}

# Side of an object's square box as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.2, "medium": 0.3, "large": 0.42}
SIZES_ZH: dict[str, str] = {"small": "小的", "medium": "中等大小的", "large": "大的"}

BACKGROUNDS: tuple[str, ...] = ("plain", "texture")
BACKGROUNDS_EN: dict[str, str] = {"plain": "a plain background", "texture": "a textured background"}
BACKGROUNDS_ZH: dict[str, str] = {"plain": "纯色背景", "texture": "纹理背景"}
# Grey levels of backgrounds: light enough that every palette colour stands out, never tinted.
BACKGROUND_GREYS: tuple[int, ...] = (200, 215, 230, 245)
TEXTURE_AMPLITUDE = 12

# Smallest object side in pixels: below it a star or a cross is no longer recognisable.
MIN_OBJECT_PIXELS = 6
MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 2048

LANGS: tuple[str, ...] = ("en", "zh")
