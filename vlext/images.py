"""Strict image reading shared by the three extensions: one loader, one ``BadImageError``.

PIL reads ``ImageFile.LOAD_TRUNCATED_IMAGES`` at decode time, and LAVIS sets it to True for the whole process
when it is imported (``lavis/datasets/datasets/coco_caption_datasets.py``): a half-written PNG then decodes
as an image padded with grey, and trains without a word. Our readers decode inside
:func:`truncated_images_refused`, whatever another library has set, so a truncated file raises.

:func:`load_image` decodes the whole file; a missing, non-image or truncated file raises
:class:`BadImageError` naming the file (:func:`bad_image_error` builds that message for readers that open
the file themselves, such as open_clip's ``CsvDataset``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, ImageFile

__all__ = ["BadImageError", "bad_image_error", "load_image", "truncated_images_refused"]


class BadImageError(OSError, ValueError):
    """An image file that is missing, not an image, or not all of one (truncated).

    Both an ``OSError`` (what PIL raises, what open_clip's callers catch) and a ``ValueError`` (bad input,
    what LAVIS and diffusers_ext callers catch), so every existing ``except`` keeps working.
    """


@contextmanager
def truncated_images_refused() -> Iterator[None]:
    """Decode with PIL's ``LOAD_TRUNCATED_IMAGES`` off, restoring the caller's setting afterwards."""
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def bad_image_error(path, error: BaseException, hint: str = "") -> BadImageError:
    """The one message: ``<path>: not a readable image (<error type>: <error>)[; <hint>]``."""
    message = f"{path}: not a readable image ({type(error).__name__}: {error})"
    return BadImageError(f"{message}; {hint}" if hint else message)


def load_image(path: str | Path, mode: str | None = "RGB", hint: str = "") -> Image.Image:
    """Open and fully decode ``path`` (converted to ``mode``; None keeps the file's mode).

    Args:
        path: the image file.
        mode: PIL mode of the result, ``"RGB"`` by default.
        hint: what the user can do about a bad file (a flag that skips such files), added to the message.

    Returns:
        The decoded ``PIL.Image.Image``.

    Raises:
        BadImageError: the file is missing, not an image, or truncated; the message names it.

    Example:
        >>> from vlext.images import load_image
        >>> load_image("does/not/exist.png")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        vlext.images.BadImageError: does/not/exist.png: not a readable image (FileNotFoundError: ...)
    """
    try:
        with truncated_images_refused(), Image.open(path) as image:
            image.load()
            return image.convert(mode) if mode is not None else image.copy()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib errors, ... by format
        raise bad_image_error(path, e, hint) from e
