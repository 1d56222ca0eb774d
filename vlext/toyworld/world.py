"""The scene generator and the edits that turn a reference scene into a target scene.

Scene ``i`` of a ``ToyWorld`` depends only on ``(seed, i)`` (a ``numpy`` SeedSequence over both), so
any process can regenerate any scene without replaying the ones before it, and datasets written by
different workers agree. Objects in a scene never overlap (boxes at least one pixel apart) and never
share a colour, so "the red circle" names one object and a colour segmentation recovers every box.

Edits follow the modification types of composed image retrieval (CIRR, Liu et al., ICCV 2021): change
an object's colour or shape, move or resize it, add or remove an object. The instruction is written
from the change actually made, so caption and target always agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import NamedTuple

import numpy as np

from vlext.toyworld._validation import check_choice, check_count, check_image_size, check_seed
from vlext.toyworld.palette import BACKGROUNDS, COLORS, COLORS_ZH, MIN_OBJECT_PIXELS, SHAPES, SHAPES_ZH, SIZES
from vlext.toyworld.scene import Scene, ToyObject

__all__ = ["EDIT_KINDS", "Edit", "ToyWorld"]

EDIT_KINDS: tuple[str, ...] = ("color", "shape", "move", "resize", "add", "remove")
_DIRECTIONS = {
    "left": ("to the left", "向左"),
    "right": ("to the right", "向右"),
    "up": ("up", "向上"),
    "down": ("down", "向下"),
}
# A move shifts the object by at least this fraction of the image side, so it is visible.
_MIN_SHIFT = 0.15


class Edit(NamedTuple):
    """A target scene and the instruction that turns the reference into it."""

    target: Scene
    caption_en: str
    caption_zh: str


def _side_px(size: str, image_size: int) -> int:
    return max(MIN_OBJECT_PIXELS, round(SIZES[size] * image_size))


def _pixel_box(box, image_size: int) -> tuple[int, int, int, int]:
    return tuple(round(v * image_size) for v in box)


def _free_positions(side: int, image_size: int, occupied: Sequence[tuple[int, int, int, int]]) -> np.ndarray:
    """Top-left corners (x, y) where a ``side`` box keeps a one-pixel gap to every occupied box."""
    span = image_size - side + 1
    ys, xs = np.mgrid[0:span, 0:span]
    free = np.ones_like(xs, dtype=bool)
    for ox0, oy0, ox1, oy1 in occupied:
        apart = (xs + side + 1 <= ox0) | (xs >= ox1 + 1) | (ys + side + 1 <= oy0) | (ys >= oy1 + 1)
        free &= apart
    return np.stack([xs[free], ys[free]], axis=1)


def _box_at(x: int, y: int, side: int, image_size: int) -> tuple[float, float, float, float]:
    return (x / image_size, y / image_size, (x + side) / image_size, (y + side) / image_size)


class ToyWorld:
    """Deterministic generator of toy scenes.

    Args:
        seed: world seed; scene ``i`` depends only on ``(seed, i)``.
        image_size: pixels per image side.
        max_objects, min_objects: range of the number of objects per scene (at most one per colour).
        backgrounds: background kinds to draw from ("plain", "texture").
    """

    def __init__(
        self,
        seed: int = 0,
        image_size: int = 64,
        max_objects: int = 3,
        min_objects: int = 1,
        backgrounds: Sequence[str] = BACKGROUNDS,
    ):
        self.seed = check_seed(seed)
        self.image_size = check_image_size(image_size)
        self.max_objects = check_count("max_objects", max_objects, minimum=1)
        self.min_objects = check_count("min_objects", min_objects, minimum=1)
        if max_objects > len(COLORS):
            raise ValueError(
                f"max_objects must be at most {len(COLORS)} (one object per colour), got {max_objects}"
            )
        if min_objects > max_objects:
            raise ValueError(f"min_objects ({min_objects}) must not exceed max_objects ({max_objects})")
        cells = image_size // (_side_px("small", image_size) + 1)
        if cells * cells < max_objects:
            raise ValueError(
                f"max_objects={max_objects} small objects do not fit in a {image_size}px image; "
                f"use image_size >= {image_size * 2} or max_objects <= {cells * cells}"
            )
        if isinstance(backgrounds, str) or not backgrounds:
            raise ValueError(
                f"backgrounds must be a non-empty sequence of {BACKGROUNDS}, got {backgrounds!r}"
            )
        for b in backgrounds:
            check_choice("backgrounds entry", b, BACKGROUNDS)
        self.backgrounds = tuple(backgrounds)

    def __repr__(self) -> str:
        return (
            f"ToyWorld(seed={self.seed}, image_size={self.image_size}, max_objects={self.max_objects}, "
            f"min_objects={self.min_objects}, backgrounds={self.backgrounds})"
        )

    def rng(self, *key: int) -> np.random.Generator:
        """Generator for ``key`` under this world's seed (scene ``i`` uses ``rng(i)``)."""
        return np.random.default_rng([self.seed, *key])

    def scene(self, i: int) -> Scene:
        check_count("i", i)
        rng = self.rng(i)
        n = int(rng.integers(self.min_objects, self.max_objects + 1))
        colors = [str(c) for c in rng.choice(list(COLORS), size=n, replace=False)]
        objects: list[ToyObject] = []
        for color in colors:
            shape = str(rng.choice(SHAPES))
            size = str(rng.choice(list(SIZES)))
            obj = self._place(rng, shape, color, size, objects)
            if obj is None:
                raise RuntimeError(f"scene {i}: no room for {n} objects in {self.image_size}px ({self!r})")
            objects.append(obj)
        background = str(rng.choice(self.backgrounds))
        return Scene(objects, background, self.image_size, seed=int(rng.integers(2**31)))

    def scenes(self, n: int, start: int = 0) -> list[Scene]:
        check_count("n", n)
        check_count("start", start)
        return [self.scene(i) for i in range(start, start + n)]

    def _place(self, rng, shape, color, size, others, fallback: bool = True) -> ToyObject | None:
        """Put a new object at a uniformly drawn free position; shrink it if it does not fit."""
        occupied = [_pixel_box(o.box, self.image_size) for o in others]
        names = list(SIZES)
        candidates = names[: names.index(size) + 1][::-1] if fallback else [size]
        for name in candidates:
            side = _side_px(name, self.image_size)
            free = _free_positions(side, self.image_size, occupied)
            if len(free):
                x, y = free[int(rng.integers(len(free)))]
                return ToyObject(shape, color, name, _box_at(int(x), int(y), side, self.image_size))
        return None

    def edit(self, scene: Scene, rng: np.random.Generator | int, kind: str | None = None) -> Edit:
        """Apply one modification to ``scene`` and return ``(target, caption_en, caption_zh)``.

        ``kind`` forces one of ``EDIT_KINDS``; by default a feasible kind is drawn from ``rng``. The
        target keeps the reference's background and seed, so only the described change differs.
        """
        if not isinstance(scene, Scene):
            raise ValueError(f"scene must be a Scene, got {type(scene).__name__}")
        if scene.image_size != self.image_size:
            raise ValueError(
                f"scene.image_size {scene.image_size} differs from this world's {self.image_size}"
            )
        if isinstance(rng, int) and not isinstance(rng, bool):
            rng = np.random.default_rng(check_seed(rng, "rng"))
        if not isinstance(rng, np.random.Generator):
            raise ValueError(f"rng must be a numpy Generator or a non-negative int seed, got {rng!r}")
        if kind is not None:
            check_choice("kind", kind, EDIT_KINDS)
            kinds = [kind]
        else:
            kinds = [EDIT_KINDS[k] for k in rng.permutation(len(EDIT_KINDS))]
        for k in kinds:
            result = getattr(self, f"_edit_{k}")(scene, rng)
            if result is not None:
                objects, en, zh = result
                return Edit(replace(scene, objects=objects), en, zh)
        raise ValueError(f"edit kind {kinds[0]!r} is not possible on this scene ({scene.caption_en})")

    def _pick(self, scene: Scene, rng) -> int:
        return int(rng.integers(len(scene.objects)))

    def _edit_color(self, scene, rng):
        i = self._pick(scene, rng)
        obj = scene.objects[i]
        unused = [c for c in COLORS if c not in {o.color for o in scene.objects}]
        if not unused:
            return None
        color = str(rng.choice(unused))
        objects = list(scene.objects)
        objects[i] = replace(obj, color=color)
        return objects, f"make {obj.name_en} {color}", f"把{obj.name_zh}变成{COLORS_ZH[color]}"

    def _edit_shape(self, scene, rng):
        i = self._pick(scene, rng)
        obj = scene.objects[i]
        shape = str(rng.choice([s for s in SHAPES if s != obj.shape]))
        objects = list(scene.objects)
        objects[i] = replace(obj, shape=shape)
        return objects, f"turn {obj.name_en} into a {shape}", f"把{obj.name_zh}变成{SHAPES_ZH[shape]}"

    def _edit_move(self, scene, rng):
        i = self._pick(scene, rng)
        obj = scene.objects[i]
        size = self.image_size
        x0, y0, x1, y1 = _pixel_box(obj.box, size)
        side = x1 - x0
        others = [_pixel_box(o.box, size) for j, o in enumerate(scene.objects) if j != i]
        free = _free_positions(side, size, others)
        shift = max(2, round(_MIN_SHIFT * size))
        xs, ys = free[:, 0], free[:, 1]
        for direction in [list(_DIRECTIONS)[k] for k in rng.permutation(len(_DIRECTIONS))]:
            keep = {
                "left": (xs <= x0 - shift) & (ys == y0),
                "right": (xs >= x0 + shift) & (ys == y0),
                "up": (ys <= y0 - shift) & (xs == x0),
                "down": (ys >= y0 + shift) & (xs == x0),
            }[direction]
            if keep.any():
                x, y = free[keep][int(rng.integers(int(keep.sum())))]
                objects = list(scene.objects)
                objects[i] = replace(obj, box=_box_at(int(x), int(y), side, size))
                en, zh = _DIRECTIONS[direction]
                return objects, f"move {obj.name_en} {en}", f"把{obj.name_zh}{zh}移动"
        return None

    def _edit_resize(self, scene, rng):
        i = self._pick(scene, rng)
        obj = scene.objects[i]
        size = self.image_size
        names = list(SIZES)
        others = [_pixel_box(o.box, size) for j, o in enumerate(scene.objects) if j != i]
        x0, y0, x1, y1 = _pixel_box(obj.box, size)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        for new in [n for n in (str(s) for s in rng.permutation(names)) if n != obj.size]:
            side = _side_px(new, size)
            if side == x1 - x0:
                continue
            free = _free_positions(side, size, others)
            if not len(free):
                continue
            # Keep the centre where it was as far as the free space allows.
            dist = (free[:, 0] + side / 2 - cx) ** 2 + (free[:, 1] + side / 2 - cy) ** 2
            x, y = free[int(np.argmin(dist))]
            objects = list(scene.objects)
            objects[i] = replace(obj, size=new, box=_box_at(int(x), int(y), side, size))
            larger = names.index(new) > names.index(obj.size)
            en, zh = ("larger", "变大") if larger else ("smaller", "变小")
            return objects, f"make {obj.name_en} {en}", f"把{obj.name_zh}{zh}"
        return None

    def _edit_add(self, scene, rng):
        unused = [c for c in COLORS if c not in {o.color for o in scene.objects}]
        if len(scene.objects) >= self.max_objects or not unused:
            return None
        color = str(rng.choice(unused))
        shape = str(rng.choice(SHAPES))
        size = str(rng.choice(list(SIZES)))
        obj = self._place(rng, shape, color, size, scene.objects, fallback=False)
        if obj is None:
            return None
        return [*scene.objects, obj], f"add {obj.phrase_en}", f"添加{obj.phrase_zh}"

    def _edit_remove(self, scene, rng):
        if len(scene.objects) <= 1:
            return None
        i = self._pick(scene, rng)
        obj = scene.objects[i]
        objects = [o for j, o in enumerate(scene.objects) if j != i]
        return objects, f"remove {obj.name_en}", f"移除{obj.name_zh}"
