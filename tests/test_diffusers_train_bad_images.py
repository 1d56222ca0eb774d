"""Corrupt images are named, never trained on: a truncated PNG or a file that is not an image stops the
trainer before any step, naming file, line and image, even when LAVIS's process-wide
``ImageFile.LOAD_TRUNCATED_IMAGES = True`` is in effect; ``--skip-bad-images`` leaves them out and logs
and counts every one."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageFile

from diffusers_ext.testing.tiny_pipelines import save_tiny_pipeline
from diffusers_ext.training.train_spatial_adapter import train
from vlext.images import BadImageError, load_image
from vlext.toyworld import write_grounding_jsonl

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    jsonl = write_grounding_jsonl(root / "data", 8, seed=0, image_size=64)
    truncated = root / "data/images/000003.png"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    (root / "data/images/000005.png").write_text("not an image")
    return {"jsonl": jsonl, "sd": save_tiny_pipeline(root / "sd", "sd"), "truncated": truncated}


@pytest.fixture
def lavis_pil_setting():
    """What ``import lavis`` does to PIL, process-wide."""
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    yield
    ImageFile.LOAD_TRUNCATED_IMAGES = before


def _args(damaged, out, *extra):
    return [
        "--mixed-data", str(damaged["jsonl"]), "--pretrained-model", str(damaged["sd"]), "--output-dir", str(out),
        "--batch-size", "2", "--hidden-dim", "32", "--max-train-steps", "1", *extra,
    ]  # fmt: skip


def test_a_truncated_png_is_refused_where_pil_would_let_it_through(damaged, lavis_pil_setting):
    with Image.open(damaged["truncated"]) as image:
        image.load()  # PIL alone, under LAVIS's setting: half an image, no error
    with pytest.raises(BadImageError, match=f"{damaged['truncated']}: not a readable image"):
        load_image(damaged["truncated"])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is left as it was


def test_bad_images_stop_training_before_any_step_naming_each_file(damaged, tmp_path, lavis_pil_setting):
    with pytest.raises(BadImageError) as error:
        train(_args(damaged, tmp_path / "out"))
    message = str(error.value)
    assert message.startswith("2 of 8 images cannot be read")
    assert f"grounding.en.jsonl:4: {damaged['truncated']}: not a readable image" in message
    assert "grounding.en.jsonl:6: " in message and "000005.png: not a readable image" in message
    assert "--skip-bad-images" in message
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_skip_bad_images_trains_on_the_rest_and_logs_every_skipped_file(damaged, tmp_path, capsys):
    result = train(_args(damaged, tmp_path / "out", "--skip-bad-images"))
    assert result["steps"] == 1
    assert (result["cleaning"].rows_skipped_bad_image, result["cleaning"].rows_kept) == (2, 6)
    err = capsys.readouterr().err
    skipped = [line for line in err.splitlines() if line.startswith("skipping bad image: ")]
    assert len(skipped) == 2
    assert "000003.png" in skipped[0] and "000005.png" in skipped[1]


def test_a_missing_image_is_an_error_naming_the_row_and_the_path(damaged, tmp_path):
    lines = damaged["jsonl"].read_text().splitlines()
    moved = tmp_path / "rows.jsonl"  # the same rows read against a folder without the images
    moved.write_text("\n".join(lines))
    with pytest.raises(
        FileNotFoundError, match=rf"8 images not found under --image-dir {tmp_path} \(first: {moved}:1: "
    ):
        train(_args({**damaged, "jsonl": moved}, tmp_path / "out"))
