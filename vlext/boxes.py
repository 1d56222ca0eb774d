"""The distribution's one box rule: normalized xyxy with ``0 <= x0 < x1 <= 1`` and ``0 <= y0 < y1 <= 1``.

Every box we accept (diffusers_ext's layout rows, generation and adapter inputs, evaluation layouts,
clip_ext's region data, the toy world) obeys it. A box that breaks it is refused with an error naming where
it came from (a file and line, an argument), never clamped: a box outside [0, 1] is usually pixel
coordinates or a wrong normalization, and an empty or flipped one is usually xywh or yxyx; clamping would
train or generate on the wrong place without a word.

:func:`satisfies_box_rule` is the rule itself, written once with ``&`` and comparisons so that it works
elementwise on Python floats, numpy arrays and torch tensors (NaN and inf fail every comparison, so they
break the rule too). :func:`box_error` is the one message. Standard library only.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

__all__ = ["BOX_RULE", "box_error", "box_problem", "check_box", "satisfies_box_rule"]

BOX_RULE = (
    "boxes are normalized xyxy: 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 (divide pixel coordinates by the "
    "image width and height); boxes outside this are refused, never clamped"
)


def satisfies_box_rule(x0, y0, x1, y1):
    """The box rule, elementwise: floats give a bool, arrays and tensors a boolean array of their shape."""
    return (0 <= x0) & (x0 < x1) & (x1 <= 1) & (0 <= y0) & (y0 < y1) & (y1 <= 1)


def box_problem(box) -> str | None:
    """What is wrong with one box (a sequence of 4 numbers), in words; None when it obeys the rule."""
    if (
        isinstance(box, (str, bytes))
        or not isinstance(box, Sequence)
        or len(box) != 4
        or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in box)
    ):
        return "must be 4 finite numbers x0, y0, x1, y1"
    if not all(math.isfinite(v) for v in box):
        return "must be 4 finite numbers x0, y0, x1, y1 (NaN or inf given)"
    if not all(0.0 <= v <= 1.0 for v in box):
        return "lies outside [0, 1]"
    if not satisfies_box_rule(*box):
        return "has x1 <= x0 or y1 <= y0 (empty or flipped; it needs x0 < x1 and y0 < y1)"
    return None


def box_error(where: str, index, box, error: type[Exception] = ValueError) -> Exception:
    """The one message for a box that breaks the rule: where, which box, its values, what is wrong, the rule."""
    problem = box_problem(box)
    shown = box if problem == "must be 4 finite numbers x0, y0, x1, y1" else [float(v) for v in box]
    return error(f"{where}: box {index} = {shown} {problem or 'breaks the box rule'}; {BOX_RULE}")


def check_box(box, where: str, index=0, error: type[Exception] = ValueError) -> list[float]:
    """``box`` as 4 floats when it obeys the rule, else raise ``error`` (:func:`box_error`)."""
    if box_problem(box) is not None:
        raise box_error(where, index, box, error)
    return [float(v) for v in box]
