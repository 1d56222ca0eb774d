"""`vlext.images.load_image` decodes a file to what an image viewer shows (issue 27).

Each case is a way a file's stored pixels differ from its display; ``convert("RGB")`` (the old loader) got
each of them wrong: 16-bit grey clipped to white, transparency dropped to the colour under it.
"""

import io

import numpy as np
import pytest
from PIL import Image

from vlext.images import as_displayed, load_image


def _save(tmp_path, image: Image.Image, name: str, **params):
    path = tmp_path / name
    image.save(path, **params)
    return path


def test_a_16_bit_greyscale_png_is_scaled_to_8_bits_not_clipped_to_white(tmp_path):
    ramp = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0 .. 65535
    path = _save(tmp_path, Image.fromarray(ramp), "grey16.png")
    assert Image.open(path).mode == "I;16"
    old = np.asarray(Image.open(path).convert("RGB"))
    assert (old[1:, :] == 255).all()  # what convert("RGB") gave: white from the second row on
    pixels = np.asarray(load_image(path))
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
    assert pixels[0, 0].tolist() == [0, 0, 0] and pixels[15, 15].tolist() == [255, 255, 255]
    assert pixels[8, 0].tolist() == [128, 128, 128]  # 128 * 257 -> 128
    assert (pixels[..., 0] == np.arange(256).reshape(16, 16)).all()


@pytest.mark.parametrize("mode", ["I;16B", "I;16L", "I"])
def test_every_16_bit_grey_byte_order_scales_the_same(mode):
    values = np.array([[0, 257 * 64, 65535]], dtype=np.uint16)
    if mode == "I":
        image = Image.fromarray(values.astype(np.int32))
    else:
        image = Image.frombytes(mode, (3, 1), values.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    assert image.mode == mode
    assert np.asarray(as_displayed(image, "L")).tolist() == [[0, 64, 255]]


def test_a_float_image_in_0_1_is_shown_as_0_255():
    image = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    assert np.asarray(as_displayed(image, "L")).tolist() == [[0, 128, 255]]


def test_a_palette_png_with_a_transparent_background_shows_white_not_black(tmp_path):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 200, 30, 30] + [0] * (256 * 3 - 6))
    image.putpixel((1, 1), 1)
    path = _save(tmp_path, image, "palette.png", transparency=0)
    assert Image.open(path).convert("RGB").getpixel((0, 0)) == (0, 0, 0)  # the old result: black
    loaded = load_image(path)
    assert loaded.getpixel((0, 0)) == (255, 255, 255) and loaded.getpixel((1, 1)) == (200, 30, 30)


@pytest.mark.parametrize(
    ("mode", "colour", "shown"),
    [
        ("RGBA", (200, 0, 0, 0), (255, 255, 255)),  # fully transparent: the background
        ("RGBA", (200, 0, 0, 255), (200, 0, 0)),  # opaque: the colour
        ("RGBA", (0, 0, 0, 128), (127, 127, 127)),  # half: a mix with white
        ("LA", (0, 0), (255, 255, 255)),
        ("LA", (100, 255), (100, 100, 100)),
    ],
)
def test_alpha_is_composited_on_white(tmp_path, mode, colour, shown):
    path = _save(tmp_path, Image.new(mode, (2, 2), colour), f"{mode}.png")
    assert load_image(path).getpixel((0, 0)) == shown


def test_asking_for_rgba_keeps_the_alpha(tmp_path):
    path = _save(tmp_path, Image.new("RGBA", (2, 2), (10, 20, 30, 40)), "keep.png")
    assert load_image(path, mode="RGBA").getpixel((0, 0)) == (10, 20, 30, 40)


def test_an_rgb_png_with_a_transparent_colour_key_shows_white_there(tmp_path):
    image = Image.new("RGB", (2, 1), (0, 255, 0))
    image.putpixel((1, 0), (9, 9, 9))
    path = _save(tmp_path, image, "key.png", transparency=(0, 255, 0))
    loaded = load_image(path)
    assert loaded.getpixel((0, 0)) == (255, 255, 255) and loaded.getpixel((1, 0)) == (9, 9, 9)


def test_the_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (4, 2), (0, 0, 255))
    image.putpixel((0, 0), (255, 0, 0))  # the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": stored 4x2, shown 2x4
    path = _save(tmp_path, image, "turned.png", exif=exif.tobytes())
    loaded = load_image(path)
    assert loaded.size == (2, 4)
    assert loaded.getpixel((1, 0)) == (255, 0, 0) and loaded.getpixel((0, 0)) == (0, 0, 255)


def test_a_cmyk_jpeg_and_a_1_bit_png_load_as_rgb(tmp_path):
    cmyk = _save(tmp_path, Image.new("CMYK", (2, 2), (0, 255, 255, 0)), "cmyk.jpg", quality=100)
    r, g, b = load_image(cmyk).getpixel((0, 0))
    assert r > 240 and g < 15 and b < 15  # pure red ink
    one = Image.new("1", (2, 1), 0)
    one.putpixel((1, 0), 1)
    path = _save(tmp_path, one, "one.png")
    assert [load_image(path).getpixel((x, 0)) for x in (0, 1)] == [(0, 0, 0), (255, 255, 255)]


def test_an_8_bit_rgb_image_is_unchanged(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    path = tmp_path / "rgb.png"
    path.write_bytes(buffer.getvalue())
    assert (np.asarray(load_image(path)) == pixels).all()


def test_open_clips_csv_path_sees_a_16_bit_grey_image_as_a_viewer_does(tmp_path):
    """open_clip's CsvDataset opens images itself and its transform converts with ``convert("RGB")``; the
    transform clip_ext wraps around it decodes as a viewer does first (mid grey stays mid grey)."""
    from clip_ext.image_check import NamingTransform

    path = _save(tmp_path, Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)), "grey16.png")
    seen = NamingTransform(lambda image: np.asarray(image.convert("RGB")))(Image.open(path))
    assert seen.shape == (4, 4, 3)
    assert abs(int(seen.mean()) - 127) <= 1


def test_every_package_decodes_images_through_vlext_images():
    """A plain ``Image.open(...)`` followed by ``convert`` clips 16-bit grey and blackens transparency; only
    header reads (the size) may open a file without :mod:`vlext.images`."""
    import ast
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    header_only = {"diffusers_ext/training/dataset.py": 1, "diffusers_ext/evaluation/evaluate.py": 1}
    found: dict[str, int] = {}
    for package in ("lavis_ext", "diffusers_ext", "clip_ext", "vlext"):
        for path in (repo / package).rglob("*.py"):
            rel = path.relative_to(repo).as_posix()
            if rel == "vlext/images.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                func = getattr(node, "func", None)
                if (
                    isinstance(node, ast.Call)
                    and isinstance(func, ast.Attribute)
                    and func.attr == "open"
                    and isinstance(func.value, ast.Name)
                    and func.value.id == "Image"
                ):
                    found[rel] = found.get(rel, 0) + 1
    assert found == header_only
