"""Strict image decoding shared by the three trainers' readers.

PIL reads ``ImageFile.LOAD_TRUNCATED_IMAGES`` at decode time, and LAVIS sets it to True for the whole process
when it is imported (``lavis/datasets/datasets/coco_caption_datasets.py``): a half-written PNG then decodes
as an image padded with grey, and trains without a word. Our readers decode inside
:func:`truncated_images_refused`, whatever another library has set, so a truncated file raises.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from PIL import ImageFile

__all__ = ["truncated_images_refused"]


@contextmanager
def truncated_images_refused() -> Iterator[None]:
    """Decode with PIL's ``LOAD_TRUNCATED_IMAGES`` off, restoring the caller's setting afterwards."""
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before
