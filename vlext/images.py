"""Strict image reading shared by the three extensions: one loader, one ``BadImageError``.

PIL reads ``ImageFile.LOAD_TRUNCATED_IMAGES`` at decode time, and LAVIS sets it to True for the whole process
when it is imported (``lavis/datasets/datasets/coco_caption_datasets.py``): a half-written PNG then decodes
as an image padded with grey, and trains without a word. Our readers decode inside
:func:`truncated_images_refused`, whatever another library has set, so a truncated file raises.

:func:`load_image` decodes the whole file; a missing, non-image or truncated file raises
:class:`BadImageError` naming the file (:func:`bad_image_error` builds that message for readers that open
the file themselves, such as open_clip's ``CsvDataset``).

Decoded as a viewer shows the file (:func:`as_displayed`), not as ``convert("RGB")`` maps its raw pixels
(issue 27: a 16-bit greyscale PNG trained as all white, a palette PNG's transparent background as black):

- 16-bit greyscale (``I;16`` and its byte orders, ``I``) is scaled to 8 bits (``v / 257``); ``convert``
  clipped every value above 255 to white. A 32-bit float (``F``) image is taken as 0..1 when it lies there.
- Transparency (``RGBA``, ``LA``, ``PA``, a palette or a single colour marked transparent by ``tRNS``) is
  composited on white, what browsers and image viewers show for a transparent page background and what the
  Pillow docs' ``alpha_composite`` recipe does; ``convert("RGB")`` dropped the alpha and showed the colour
  hidden under it (black for most palettes). Ask for ``mode="RGBA"`` to keep the alpha instead.
- EXIF orientation (a phone photo stored sideways with ``Orientation`` 6) is applied, as
  :func:`PIL.ImageOps.exif_transpose` does.
- CMYK with an embedded ICC profile goes to sRGB through that profile (``PIL.ImageCms``); without one,
  Pillow's plain conversion. 1-bit images become black and white.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, ImageFile, ImageOps

__all__ = ["BadImageError", "as_displayed", "bad_image_error", "load_image", "truncated_images_refused"]

WHITE = (255, 255, 255, 255)  # the background transparent pixels are shown on
_SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _eight_bit_grey(image: Image.Image) -> Image.Image:
    """16-bit (or 32-bit integer, or float) greyscale scaled to 8 bits, as a viewer maps it."""
    import numpy as np

    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        finite = values[np.isfinite(values)]
        scale = 255.0 if finite.size == 0 or finite.max() <= 1.0 else 1.0
        values = np.nan_to_num(values, nan=0.0) * scale
    else:
        values = np.asarray(image).astype(np.float64) / 257.0  # 65535 -> 255, 257 -> 1
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def _cmyk_to_srgb(image: Image.Image) -> Image.Image:
    profile = image.info.get("icc_profile")
    if not profile:
        return image.convert("RGB")
    import io

    from PIL import ImageCms

    source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
    return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")


def as_displayed(image: Image.Image, mode: str = "RGB") -> Image.Image:
    """``image`` as a viewer shows it, in ``mode``: orientation applied, 16-bit grey scaled to 8 bits,
    CMYK through its ICC profile, transparency composited on white (unless ``mode`` keeps alpha).

    Example:
        >>> from PIL import Image
        >>> clear = Image.new("RGBA", (1, 1), (0, 0, 0, 0))
        >>> clear.convert("RGB").getpixel((0, 0)), as_displayed(clear).getpixel((0, 0))
        ((0, 0, 0), (255, 255, 255))
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_GREY or image.mode == "F":
        image = _eight_bit_grey(image)
    elif image.mode == "CMYK":
        image = _cmyk_to_srgb(image)
    transparent = image.mode in _ALPHA_MODES or "transparency" in image.info
    if transparent and mode not in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba)
    return image if image.mode == mode else image.convert(mode)


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
    """Open and fully decode ``path`` as a viewer shows it (:func:`as_displayed`, in ``mode``; None keeps the
    file's mode and pixels, only the EXIF orientation applied).

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
            return as_displayed(image, mode) if mode is not None else ImageOps.exif_transpose(image)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib errors, ... by format
        raise bad_image_error(path, e, hint) from e
