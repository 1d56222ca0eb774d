"""Training at real scale on toy data: GLIGEN's crop/flip recipe (boxes follow the pixels), SDXL's
micro-conditioning per sample, the DataLoader with workers (exact resume), and the conditioning cache."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_ext.layout_rows import CleaningReport
from diffusers_ext.testing.tiny_pipelines import save_tiny_pipeline
from diffusers_ext.training.conditioning_cache import ConditioningCache
from diffusers_ext.training.dataset import (
    EpochBatchSampler,
    GroundingCrops,
    collate_samples,
    prepare_rows,
)
from diffusers_ext.training.train_spatial_adapter import _time_ids, train
from vlext.atomic_files import temp_name
from vlext.toyworld import ToyWorld, locate, write_grounding_jsonl

torch.set_num_threads(1)
PAD_LEFT, WIDE = 48, 192  # 128-px scenes pasted into 192x128 canvases (1.5x wide; COCO is 1.33x)


def _wide_scenes(root: Path, n: int, seed: int = 3) -> tuple[Path, list]:
    """Non-square images whose objects' true pixels are known: toy scenes (one object per colour) pasted
    into wider grey canvases; rows with boxes in canvas coordinates."""
    world, rows, scenes = ToyWorld(seed, 128, max_objects=3), [], []
    (root / "images").mkdir(parents=True)
    i = 0
    while len(scenes) < n:
        scene = world.scene(i)
        i += 1
        if len({o.color for o in scene.objects}) < len(scene.objects):
            continue
        canvas = Image.new("RGB", (WIDE, 128), (128, 128, 128))
        canvas.paste(scene.render(), (PAD_LEFT, 0))
        name = f"images/{len(scenes)}.png"
        canvas.save(root / name)
        boxes = [[(PAD_LEFT + o.box[0] * 128) / WIDE, o.box[1], (PAD_LEFT + o.box[2] * 128) / WIDE, o.box[3]]
                 for o in scene.objects]  # fmt: skip
        rows.append(
            {"image": name, "caption": scene.caption("en"), "boxes": boxes, "phrases": scene.phrases("en")}
        )
        scenes.append(scene)
    path = root / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, scenes


def _dataset(root: Path, rows: list[dict], **kw) -> GroundingCrops:
    dataset = GroundingCrops([dict(r) for r in rows], root, 64, **kw)
    prepare_rows(dataset, CleaningReport())
    return dataset


def _uint8(pixels: torch.Tensor) -> np.ndarray:
    assert pixels.dtype == torch.uint8  # pixels cross the worker boundary as bytes
    return pixels.permute(1, 2, 0).numpy()


@pytest.mark.parametrize("crop", ["center", "random"])
def test_the_crop_and_flip_move_every_box_onto_its_objects_pixels(tmp_path, crop):
    path, scenes = _wide_scenes(tmp_path, 4)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    dataset = _dataset(tmp_path, rows, crop=crop, flip=True, seed=1, min_area=0.0)
    flips, lefts, checked = set(), set(), 0
    for epoch in range(4):
        for i, scene in enumerate(scenes):
            sample, plan = dataset[(epoch, i)], dataset.plan(epoch, i)
            flips.add(plan.flip)
            lefts.add(plan.left)
            image = _uint8(sample["pixels"])
            by_phrase = dict(zip(sample["phrases"], sample["boxes"], strict=True))
            for obj, phrase in zip(scene.objects, scene.phrases("en"), strict=True):
                found = locate(image, obj.color, min_pixels=6)
                if phrase not in by_phrase:  # dropped: it left the crop (or nearly: under 6 pixels remain)
                    assert found is None or (found[2] - found[0]) * (found[3] - found[1]) < 0.01
                    continue
                box = by_phrase[phrase]
                assert found is not None, (epoch, i, phrase, box)
                inside = np.array(found) - np.array(box)  # the object's pixels lie within its box ...
                assert (
                    inside[0] >= -2 / 64
                    and inside[1] >= -2 / 64
                    and inside[2] <= 2 / 64
                    and inside[3] <= 2 / 64
                )
                whole = 0 < box[0] and box[2] < 1  # not cut by the crop (it only cuts left/right here)
                if whole and obj.shape in (
                    "square",
                    "circle",
                ):  # ... and fill it: shapes touching all 4 sides
                    assert np.abs(inside).max() <= 2 / 64, (epoch, i, phrase, found, box)
                checked += 1
    assert flips == {False, True} and checked >= 30
    assert len(lefts) > 1 if crop == "random" else lefts == {round((96 - 64) / 2)}


def test_boxes_that_leave_the_crop_or_become_small_are_counted():
    from diffusers_ext.training.dataset import clean_cropped_layout, plan_crop

    # 200x100 image -> 128x64 resized, centre crop keeps x in [32, 96) of 128, i.e. [0.25, 0.75) of the image
    plan = plan_crop(200, 100, 64, "center", np.random.default_rng(0), flip=False)
    assert (plan.resized, plan.top, plan.left) == ((64, 128), 0, 32)
    row = {
        "boxes": [[0.0, 0.0, 0.2, 1.0], [0.2, 0.0, 0.26, 1.0], [0.3, 0.2, 0.6, 0.8], [0.0, 0.0, 0.01, 0.01]],
        "phrases": ["outside", "sliver", "inside", "speck"],
    }
    report = CleaningReport()
    boxes, phrases = clean_cropped_layout(
        row, plan, 64, min_area=0.01, min_side=0.05, max_objs=30, report=report
    )
    assert phrases == ["inside"]
    assert boxes[0] == pytest.approx([0.1, 0.2, 0.7, 0.8])  # (0.3*128-32)/64 = 0.1, (0.6*128-32)/64 = 0.7
    assert (report.boxes_left_crop, report.boxes_small_after_crop, report.boxes_dropped_small) == (2, 1, 0)
    # the speck also left the crop; a flip mirrors x about the resized image's centre before the crop
    flipped = replace(plan, flip=True)
    b, _ = clean_cropped_layout(
        row, flipped, 64, min_area=0.0, min_side=0.0, max_objs=30, report=CleaningReport()
    )
    assert b[-1] == pytest.approx([1 - 0.7, 0.2, 1 - 0.1, 0.8])


def test_sdxl_time_ids_are_the_original_size_and_crop_of_each_image(tmp_path):
    """diffusers' train_text_to_image_sdxl.py: original_size (h, w) before the resize (torchvision's
    Resize(res): shorter side res, longer int(res * long / short)); centre crop
    y1 = max(0, int(round((H' - res) / 2))), x1 likewise, H', W' after resizing the shorter side to res;
    add_time_ids = original_size + crops_coords_top_left + target_size."""
    from diffusers import StableDiffusionXLPipeline

    for name, size in (("coco.png", (640, 480)), ("tall.png", (48, 100))):
        Image.new("RGB", size, (120, 120, 120)).save(tmp_path / name)
    rows = [{"image": n, "caption": "c", "boxes": [[0.0, 0.0, 1.0, 1.0]], "phrases": ["p"]} for n in ("coco.png", "tall.png")]  # fmt: skip
    dataset = _dataset(tmp_path, rows, crop="center", flip=False)
    batch = collate_samples([dataset[(0, 0)], dataset[(0, 1)]])
    pipe = StableDiffusionXLPipeline.from_pretrained(save_tiny_pipeline(tmp_path / "sdxl", "sdxl"))
    got = _time_ids(pipe, batch, 64, torch.float32, pipe.text_encoder_2.config.projection_dim)

    def reference(w, h, res=64):
        short = min(w, h)
        new_w, new_h = (int(res * w / short), res) if w >= h else (res, int(res * h / short))
        y1, x1 = max(0, int(round((new_h - res) / 2.0))), max(0, int(round((new_w - res) / 2.0)))
        return [h, w, y1, x1, res, res]

    assert got.tolist() == [reference(640, 480), reference(48, 100)]
    assert got.tolist() == [[480, 640, 0, 10, 64, 64], [100, 48, 34, 0, 64, 64]]


def test_the_sampler_shards_the_seeded_permutation_and_starts_mid_epoch():
    a = EpochBatchSampler(10, 2, world=2, rank=0, seed=5)
    b = EpochBatchSampler(10, 2, world=2, rank=1, seed=5)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(5 + 1)).tolist()
    for s in (a, b):
        s.set_epoch(1)
    assert [i for batch in a for _, i in batch] + [i for batch in b for _, i in batch] == order[0:2] + order[
        4:6
    ] + order[2:4] + order[6:8]
    a.set_epoch(1, start_step=1)
    assert list(a) == [[(1, order[4]), (1, order[5])]] and len(a) == 1


# ---- the trainer: workers, resume, cache -------------------------------------------------------------


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    wide, _ = _wide_scenes(root / "wide", 8)
    return {
        "jsonl": write_grounding_jsonl(root / "data", 8, seed=0, image_size=64),
        "wide": wide,
        "root": root,
    }


@pytest.fixture(scope="module")
def models(toy):
    return {k: save_tiny_pipeline(toy["root"] / k, k) for k in ("sd", "sdxl", "kolors")}


def _args(data, model, out, *extra):
    return ["--mixed-data", str(data), "--pretrained-model", str(model), "--output-dir", str(out),
            "--batch-size", "2", "--hidden-dim", "32", "--lr", "1e-3", "--phrase-dropout", "0.3", *extra]  # fmt: skip


def _losses(out) -> dict:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def test_resume_with_loader_workers_continues_with_the_uninterrupted_losses(toy, models, tmp_path):
    common = ["--epochs", "2", "--random-crop", "--dataloader-num-workers", "2"]
    train(_args(toy["wide"], models["sd"], tmp_path / "full", *common[:3], "--checkpointing-steps", "3"))
    train(_args(toy["wide"], models["sd"], tmp_path / "resumed", *common, "--resume", str(tmp_path / "full" / "checkpoint-3")))  # fmt: skip
    full, resumed = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert sorted(resumed) == [4, 5, 6, 7, 8]  # steps 5-8 are the second epoch: new crops and flips
    assert all(resumed[s] == pytest.approx(full[s], rel=1e-6) for s in resumed)


@pytest.mark.parametrize("kind", ["sd", "sdxl", "kolors"])
def test_workers_and_cache_give_the_same_losses_and_a_second_run_encodes_nothing(toy, models, tmp_path, kind):
    steps = ["--max-train-steps", "4"]
    plain = train(_args(toy["wide"], models[kind], tmp_path / "plain", *steps))
    fast = ["--dataloader-num-workers", "2", "--cache-dir", str(tmp_path / "c"), "--cache-latents"]
    first = train(_args(toy["wide"], models[kind], tmp_path / "first", *steps, *fast))
    second = train(_args(toy["wide"], models[kind], tmp_path / "second", *steps, *fast))
    assert first["losses"] == pytest.approx(plain["losses"], rel=1e-5)
    assert second["losses"] == pytest.approx(plain["losses"], rel=1e-5)
    captions = len({json.loads(line)["caption"] for line in toy["wide"].read_text().splitlines()})
    assert first["cache"]["written"] == first["cache"]["entries"] > 1 + captions + 8 * 2  # + phrases
    assert (second["cache"]["written"], second["cache"]["found"]) == (0, first["cache"]["entries"])
    assert second["on_device"] == ["UNet2DConditionModel"]  # no text encoder, no VAE on the accelerator
    assert "UNet2DConditionModel" in plain["on_device"] and len(plain["on_device"]) >= 3


def test_a_changed_caption_or_image_invalidates_exactly_its_entries(toy, models, tmp_path):
    data = tmp_path / "data"
    jsonl = write_grounding_jsonl(data, 4, seed=1, image_size=64)
    cache = ["--cache-dir", str(tmp_path / "c"), "--cache-latents", "--max-train-steps", "1"]
    first = train(_args(jsonl, models["sd"], tmp_path / "a", *cache))["cache"]
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    rows[0]["caption"] = "a caption no other row has"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    image = data / rows[1]["image"]
    pixels = np.asarray(Image.open(image)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(image)
    second = train(_args(jsonl, models["sd"], tmp_path / "b", *cache))["cache"]
    # one new prompt, the changed image's latents in both orientations; nothing else is recomputed
    assert second["written"] == 1 + 2
    assert second["found"] == second["entries"] - 3 and second["entries"] == first["entries"]


def test_a_half_written_cache_entry_is_never_read(toy, models, tmp_path, monkeypatch):
    cache_dir = tmp_path / "c"
    args = ["--cache-dir", str(cache_dir), "--max-train-steps", "2"]
    reference = train(_args(toy["jsonl"], models["sd"], tmp_path / "a", *args))
    entries = sorted(cache_dir.rglob("*.safetensors"))
    # a writer killed before its rename leaves only a temporary name: readers never open it
    cache = ConditioningCache(cache_dir, model=Path(models["sd"]).resolve(), kind="sd", dtype="torch.float32",
                              cache_latents=False, resolution=64, crop="center")  # fmt: skip

    def killed(*_):
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        cache.write("phrase", {"text": "never finished"}, {"feature": torch.ones(3)})
    monkeypatch.undo()
    assert cache.read("phrase", {"text": "never finished"}) is None
    assert not list(cache_dir.rglob(".*.tmp"))  # vlext.atomic_files removes its temporary file on an error
    # a SIGKILL leaves the temporary name behind, half written: readers never open it either
    path, _ = cache._content("phrase", {"text": "never finished"})
    temp_name(path).write_bytes(b"\x08\x00")
    assert cache.read("phrase", {"text": "never finished"}) is None
    # a damaged final file (copied half, disk trouble) is treated as absent and written again
    damaged = entries[0]
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    with pytest.warns(UserWarning, match="unreadable"):
        again = train(_args(toy["jsonl"], models["sd"], tmp_path / "b", *args))
    assert again["cache"]["written"] == 1 and again["cache"]["rewritten_bad"] >= 1
    assert again["losses"] == pytest.approx(reference["losses"], rel=1e-6)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--cache-latents"], "--cache-latents needs --cache-dir"),
        (["--cache-dir", "c", "--cache-latents", "--random-crop"], "crop offset is drawn anew every epoch"),
        (["--dataloader-num-workers", "-1"], "must be >= 0"),
    ],
)
def test_cache_and_loader_misconfigurations_are_refused_before_work(toy, models, tmp_path, extra, match):
    with pytest.raises(SystemExit, match=match):
        train(_args(toy["jsonl"], models["sd"], tmp_path / "bad", *extra))
    assert not (tmp_path / "bad").exists()


def test_the_loader_benchmark_prints_both_rates_at_a_small_size(capsys):
    from benchmarks.bench_diffusers_input_pipeline import main

    assert main(["--images", "4", "--resolutions", "64", "--workers", "1", "--batch", "2", "--no-feed"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("loader 64 px"))
    plain = float(line.split(": ")[1].split()[0])
    workers = float(line.split(", ")[1].split()[0])
    assert plain > 0 and workers > 0 and "with 1 workers" in line
