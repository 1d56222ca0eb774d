"""Argument checks shared by the toy world's entry points.

Every public function validates its arguments before rendering or writing anything, so a bad count or
an unknown colour is reported with the argument's name and what is accepted, not as a half-written
dataset.
"""

from __future__ import annotations

from collections.abc import Iterable

from vlext.toyworld.palette import COLORS, LANGS, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE


def check_count(name: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def check_image_size(value, name: str = "image_size") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_IMAGE_SIZE <= value <= MAX_IMAGE_SIZE:
        raise ValueError(
            f"{name} must be an int in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}] (pixels per side), got {value!r}"
        )
    return value


def check_seed(value, name: str = "seed") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


def check_choice(name: str, value, accepted: Iterable[str]) -> str:
    accepted = tuple(accepted)
    if value not in accepted:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, accepted))}; got {value!r}")
    return value


def check_lang(value, name: str = "lang") -> str:
    return check_choice(name, value, LANGS)


def check_color(value, name: str = "color") -> str:
    if value not in COLORS:
        raise ValueError(f"{name} {value!r} is not a toy-world colour; accepted: {', '.join(COLORS)}")
    return value
