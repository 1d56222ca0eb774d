"""Unreadable training images are named, never used.

open_clip's ``CsvDataset`` opens each image lazily inside its loader: a truncated or non-image file fails
deep in a worker with a PIL message that does not say which file ("image file is truncated"). The trainer
wraps the dataset's transform with :class:`NamingTransform` (the error names the file and the flag that
skips such files), and with ``--skip-bad-images`` reads every image once before training
(:func:`find_bad_images`) and leaves the bad ones out, counted and logged.

Truncated files are only caught while PIL's process-wide ``ImageFile.LOAD_TRUNCATED_IMAGES`` is False
(LAVIS sets it True at import): every read here goes through :mod:`vlext.images` (one loader, one
:class:`~vlext.images.BadImageError`, one message), which switches it off while it reads.
"""

from __future__ import annotations

from vlext.images import BadImageError, as_displayed, bad_image_error, load_image, truncated_images_refused

__all__ = ["NamingTransform", "find_bad_images", "name_unopenable_images"]

SKIP_HINT = (
    "fix or remove the file, or pass --skip-bad-images to leave unreadable images out (counted and logged)"
)


class NamingTransform:
    """Wraps open_clip's image transform: decodes the image first, so a broken file fails naming itself."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image):
        path = getattr(image, "filename", "<unnamed image>")
        try:
            with truncated_images_refused():
                image.load()
        except (OSError, ValueError, SyntaxError) as e:
            raise bad_image_error(path, e, SKIP_HINT) from e
        # open_clip's own convert("RGB") clips 16-bit grey to white and blackens transparent palettes
        return self.transform(as_displayed(image, "RGB"))


_NAMING_CLASSES: dict[type, type] = {}


def name_unopenable_images(dataset) -> None:
    """Make ``dataset[i]`` (open_clip's ``CsvDataset``) name the file and the flag when ``Image.open`` fails.

    A file that is no image at all (or is missing) fails in ``CsvDataset.__getitem__``'s own ``Image.open``,
    before :class:`NamingTransform` sees it. The instance's class becomes a subclass whose ``__getitem__``
    adds the file and :data:`SKIP_HINT` to that error; everything else (fields, loader, sampler) stays the
    host's.
    """
    cls = type(dataset)
    if cls in _NAMING_CLASSES.values():
        return
    if cls not in _NAMING_CLASSES:

        def __getitem__(self, idx):
            try:
                return cls.__getitem__(self, idx)
            except BadImageError:
                raise
            except OSError as e:  # PIL's UnidentifiedImageError, a missing file
                raise bad_image_error(self.images[idx], e, SKIP_HINT) from e

        _NAMING_CLASSES[cls] = type(f"Naming{cls.__name__}", (cls,), {"__getitem__": __getitem__})
    dataset.__class__ = _NAMING_CLASSES[cls]


def find_bad_images(paths: list[str]) -> list[tuple[int, str, str]]:
    """(row, path, reason) of every image in ``paths`` that does not open and decode completely."""
    bad = []
    for row, path in enumerate(paths):
        try:
            load_image(str(path), mode=None).close()
        except BadImageError as e:
            cause = e.__cause__
            bad.append((row, str(path), f"{type(cause).__name__}: {cause}"))
    return bad
