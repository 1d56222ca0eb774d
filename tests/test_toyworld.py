"""Specification of the toy world: determinism, geometry, captions, edits and the dataset layouts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vlext.toyworld import (
    COLORS,
    EDIT_KINDS,
    Scene,
    ToyObject,
    ToyWorld,
    box_iou,
    locate,
    write_cirr,
    write_clip_csv,
    write_fashioniq,
    write_grounding_jsonl,
)
from vlext.toyworld.cli import main as cli_main
from vlext.toyworld.palette import COLORS_ZH, SHAPES_ZH

SIZE = 64


@pytest.fixture(scope="module")
def world():
    return ToyWorld(seed=3, image_size=SIZE, max_objects=4)


@pytest.fixture(scope="module")
def scenes(world):
    return world.scenes(40)


@pytest.fixture(scope="module")
def cirr_root(tmp_path_factory):
    return write_cirr(tmp_path_factory.mktemp("cirr"), n_train=6, n_val=4, n_test=3, seed=1)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _pixel_box(box):
    return tuple(round(v * SIZE) for v in box)


def test_scene_depends_only_on_seed_and_index(world):
    again = ToyWorld(seed=3, image_size=SIZE, max_objects=4)
    assert again.scene(17) == world.scenes(20)[17]
    assert np.array_equal(np.asarray(again.scene(17).render()), np.asarray(world.scene(17).render()))


def test_different_seeds_give_different_images():
    a = [np.asarray(s.render()) for s in ToyWorld(seed=0).scenes(5)]
    b = [np.asarray(s.render()) for s in ToyWorld(seed=1).scenes(5)]
    assert all(not np.array_equal(x, y) for x, y in zip(a, b))


def test_render_is_rgb_of_requested_size(scenes):
    image = scenes[0].render()
    assert image.mode == "RGB" and image.size == (SIZE, SIZE)


def test_writers_are_byte_identical_for_the_same_seed(tmp_path):
    first = write_cirr(tmp_path / "a", n_train=2, n_val=1, n_test=1, seed=5)
    second = write_cirr(tmp_path / "b", n_train=2, n_val=1, n_test=1, seed=5)
    other = write_cirr(tmp_path / "c", n_train=2, n_val=1, n_test=1, seed=6)
    assert _files(first) == _files(second)
    assert _files(first) != _files(other)


def test_objects_never_overlap_and_never_share_a_colour(scenes):
    for scene in scenes:
        assert len({o.color for o in scene.objects}) == len(scene.objects)
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1 :]:
                assert box_iou(a.box, b.box) == 0.0


def test_object_pixels_lie_inside_their_box(scenes):
    for scene in scenes:
        pixels = np.asarray(scene.render())
        for obj in scene.objects:
            ys, xs = np.nonzero((pixels == np.array(obj.rgb)).all(-1))
            x0, y0, x1, y1 = _pixel_box(obj.box)
            assert len(xs) > 0
            assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1


def test_locate_finds_every_object_with_iou_above_0_9(scenes):
    ious = [box_iou(locate(s.render(), o.color), o.box) for s in scenes for o in s.objects]
    assert min(ious) > 0.9


def test_locate_tolerates_colour_drift_of_generated_images(scenes):
    rng = np.random.default_rng(0)
    ious = []
    for scene in scenes[:10]:
        pixels = np.asarray(scene.render()).astype(int)
        drifted = pixels + rng.integers(-25, 26, size=3) + rng.integers(-10, 11, size=pixels.shape)
        image = Image.fromarray(np.clip(drifted, 0, 255).astype(np.uint8))
        ious += [box_iou(locate(image, o.color), o.box) for o in scene.objects]
    assert min(ious) > 0.9


def test_locate_returns_none_for_an_absent_colour(scenes):
    scene = scenes[0]
    absent = next(c for c in COLORS if c not in {o.color for o in scene.objects})
    assert locate(scene.render(), absent) is None


def test_box_iou_of_half_overlapping_boxes_is_one_third():
    assert box_iou((0, 0, 2, 1), (1, 0, 3, 1)) == pytest.approx(1 / 3)


def test_captions_mention_every_object_in_both_languages(scenes):
    for scene in scenes:
        for obj in scene.objects:
            assert obj.phrase_en in scene.caption_en
            assert obj.phrase_zh in scene.caption_zh
        assert scene.phrases("zh") == [o.phrase_zh for o in scene.objects]


def test_phrases_read_as_specified():
    obj = ToyObject("circle", "red", "large", (0.0, 0.0, 0.5, 0.5))
    assert (obj.phrase_en, obj.phrase_zh) == ("a large red circle", "一个大的红色圆形")


def _changed(reference: Scene, target: Scene):
    return [(a, b) for a, b in zip(reference.objects, target.objects) if a != b]


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_edit_caption_describes_the_change_made(world, scenes, kind):
    rng = np.random.default_rng(0)
    done = 0
    for scene in scenes:
        try:
            target, en, zh = world.edit(scene, rng, kind=kind)
        except ValueError:
            continue  # e.g. "remove" on a one-object scene
        done += 1
        assert target.background == scene.background and target.seed == scene.seed
        if kind == "add":
            new = target.objects[-1]
            assert target.objects[:-1] == scene.objects and en == f"add {new.phrase_en}"
            assert zh == f"添加{new.phrase_zh}"
            continue
        if kind == "remove":
            (gone,) = [o for o in scene.objects if o not in target.objects]
            assert len(target.objects) == len(scene.objects) - 1 and en == f"remove {gone.name_en}"
            continue
        ((before, after),) = _changed(scene, target)
        assert en.split(" ", 1)[1].startswith(before.name_en) and before.name_zh in zh
        if kind == "color":
            assert after.color != before.color and en.endswith(after.color) and COLORS_ZH[after.color] in zh
            assert locate(target.render(), after.color) is not None
        elif kind == "shape":
            assert after.shape != before.shape and en.endswith(after.shape) and SHAPES_ZH[after.shape] in zh
        elif kind == "move":
            dx, dy = after.box[0] - before.box[0], after.box[1] - before.box[1]
            moved = {
                "left": dx < 0 and dy == 0,
                "right": dx > 0 and dy == 0,
                "up": dy < 0 and dx == 0,
                "down": dy > 0 and dx == 0,
            }
            assert [d for d, ok in moved.items() if ok] == [en.split()[-1]]
            assert max(abs(dx), abs(dy)) >= 0.15 - 1e-9
        elif kind == "resize":
            grew = after.box[2] - after.box[0] > before.box[2] - before.box[0]
            assert en.endswith("larger" if grew else "smaller") and zh.endswith("变大" if grew else "变小")
    assert done >= 10


def test_edited_scenes_keep_objects_apart(world, scenes):
    rng = np.random.default_rng(1)
    for scene in scenes:
        target = world.edit(scene, rng).target
        boxes = target.boxes
        assert all(box_iou(a, b) == 0.0 for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def _load_cirr(root, split):
    triplets = json.loads((root / "cirr" / "captions" / f"cap.rc2.{split}.json").read_text())
    relpaths = json.loads((root / "cirr" / "image_splits" / f"split.rc2.{split}.json").read_text())
    return triplets, relpaths


@pytest.mark.parametrize("split", ["train", "val", "test1"])
def test_cirr_every_referenced_image_is_in_the_split_file_and_on_disk(cirr_root, split):
    triplets, relpaths = _load_cirr(cirr_root, split)
    for row in triplets:
        names = [
            row["reference"],
            *row["img_set"]["members"],
            *([row["target_hard"]] if "target_hard" in row else []),
        ]
        for name in names:
            assert (cirr_root / relpaths[name]).is_file()


@pytest.mark.parametrize("split,count", [("train", 6), ("val", 4), ("test1", 3)])
def test_cirr_members_are_six_unique_names_with_reference_and_target(cirr_root, split, count):
    triplets, _ = _load_cirr(cirr_root, split)
    assert len(triplets) == count and [r["pairid"] for r in triplets] == list(range(count))
    for row in triplets:
        members = row["img_set"]["members"]
        assert len(members) == 6 == len(set(members))
        assert members[row["img_set"]["reference_rank"]] == row["reference"]
        if split != "test1":
            assert members[row["img_set"]["target_rank"]] == row["target_hard"] != row["reference"]


def test_cirr_test1_rows_carry_no_target(cirr_root):
    triplets, _ = _load_cirr(cirr_root, "test1")
    assert all("target_hard" not in r and "target_soft" not in r for r in triplets)
    assert all({"pairid", "reference", "caption", "img_set"} <= set(r) for r in triplets)


def test_cirr_members_are_distinct_images_of_one_scene_family(cirr_root):
    triplets, relpaths = _load_cirr(cirr_root, "train")
    row = triplets[0]
    images = [np.asarray(Image.open(cirr_root / relpaths[m])) for m in row["img_set"]["members"]]
    assert all(not np.array_equal(a, b) for i, a in enumerate(images) for b in images[i + 1 :])
    # Near variants: each member differs from the reference in a small part of the image only.
    reference = np.asarray(Image.open(cirr_root / relpaths[row["reference"]]))
    assert max((im != reference).any(-1).mean() for im in images) < 0.5


def test_cirr_image_paths_follow_the_release_layout(cirr_root):
    _, train = _load_cirr(cirr_root, "train")
    _, val = _load_cirr(cirr_root, "val")
    assert all(p.startswith("./train/") and p.endswith(f"/{n}.png") for n, p in train.items())
    assert all(p == f"./dev/{n}.png" and n.startswith("dev-") for n, p in val.items())


def test_fashioniq_layout_is_complete(tmp_path):
    root = write_fashioniq(tmp_path / "fiq", n_per_category=2, seed=0)
    for category in ("dress", "shirt", "toptee"):
        for split in ("train", "val", "test"):
            triplets = json.loads((root / "captions" / f"cap.{category}.{split}.json").read_text())
            names = json.loads((root / "image_splits" / f"split.{category}.{split}.json").read_text())
            assert len(triplets) == 2
            for row in triplets:
                assert len(row["captions"]) == 2 and all(row["captions"])
                assert {row["candidate"], row["target"]} <= set(names)
            for name in names:
                assert Image.open(root / "images" / f"{name}.png").size == (SIZE, SIZE)


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_grounding_rows_are_valid_with_boxes_in_unit_range(tmp_path, lang):
    path = write_grounding_jsonl(tmp_path, 8, seed=2, lang=lang)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 8
    for row in rows:
        assert set(row) == {"image", "caption", "boxes", "phrases"}
        assert Image.open(tmp_path / row["image"]).size == (SIZE, SIZE)
        assert len(row["boxes"]) == len(row["phrases"]) >= 1
        for x0, y0, x1, y1 in row["boxes"]:
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
        assert all(p in row["caption"] for p in row["phrases"])
        assert all(p.startswith("一个") if lang == "zh" else p.startswith("a ") for p in row["phrases"])


def test_clip_csv_is_read_by_open_clip_train_csv_dataset(tmp_path):
    from open_clip_train.data import CsvDataset

    path = write_clip_csv(tmp_path, 5, seed=0)
    # open_clip_train's defaults: tab separator, filepath / title columns.
    dataset = CsvDataset(
        str(path), lambda im: np.asarray(im).shape, "filepath", "title", tokenizer=lambda t: t
    )
    assert len(dataset) == 5
    shape, title = dataset[4]
    assert shape == (SIZE, SIZE, 3) and title.endswith("background")


def test_clip_regions_match_the_csv_rows(tmp_path):
    path = write_clip_csv(tmp_path, 4, seed=0, split="val")
    filepaths = [line.split("\t")[0] for line in path.read_text().splitlines()[1:]]
    regions = [json.loads(line) for line in (tmp_path / "val_regions.jsonl").read_text().splitlines()]
    assert [r["filepath"] for r in regions] == filepaths
    for r in regions:
        image = Image.open(r["filepath"])
        for region in r["regions"]:
            color = region["caption"].split()[2]
            assert box_iou(locate(image, color), region["box"]) > 0.9


@pytest.mark.parametrize(
    "call,needle",
    [
        (lambda: ToyWorld(image_size=8), "image_size"),
        (lambda: ToyWorld(max_objects=0), "max_objects"),
        (lambda: ToyWorld(max_objects=2, min_objects=3), "min_objects"),
        (lambda: ToyWorld(backgrounds=("plain", "marble")), "backgrounds"),
        (lambda: ToyWorld().scene(-1), "i must"),
        (lambda: locate(Image.new("RGB", (8, 8)), "pink"), "accepted: red"),
        (lambda: ToyObject("hexagon", "red", "large", (0, 0, 1, 1)), "shape"),
        (lambda: ToyObject("circle", "red", "large", (0.5, 0, 0.2, 1)), "box"),
        (lambda: ToyWorld().scene(0).phrases("fr"), "lang"),
        (lambda: ToyWorld().edit(ToyWorld().scene(0), 0, kind="rotate"), "kind"),
        (lambda: write_cirr("/tmp/unused-toyworld", n_train=-1), "n_train"),
        (lambda: write_cirr("/tmp/unused-toyworld", pairs_per_set=6), "pairs_per_set"),
        (lambda: write_fashioniq("/tmp/unused-toyworld", n_per_category=0), "n_per_category"),
        (lambda: write_grounding_jsonl("/tmp/unused-toyworld", 2, lang="de"), "lang"),
        (lambda: write_clip_csv("/tmp/unused-toyworld", 2, split="dev"), "split"),
    ],
)
def test_bad_input_raises_a_value_error_naming_the_argument(call, needle):
    with pytest.raises(ValueError, match=needle):
        call()


def test_bad_writer_arguments_write_nothing(tmp_path):
    with pytest.raises(ValueError):
        write_cirr(tmp_path / "x", n_train=2, image_size=16)
    assert not (tmp_path / "x").exists()


def test_cli_writes_the_requested_dataset_and_prints_it(tmp_path, capsys):
    assert (
        cli_main(["grounding", "--out", str(tmp_path), "--n", "3", "--lang", "zh", "--image-size", "48"]) == 0
    )
    path = tmp_path / "grounding.zh.jsonl"
    assert str(path) in capsys.readouterr().out
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 3 and Image.open(tmp_path / rows[0]["image"]).size == (48, 48)


def test_cli_help_answers_without_importing_torch(tmp_path):
    """`python -m vlext.toyworld --help` stays fast (< 3 s): the toy world needs only numpy and PIL."""
    import subprocess
    import sys

    probe = "import sys, runpy; sys.argv = ['toyworld', '--help']\ntry:\n    runpy.run_module('vlext.toyworld', run_name='__main__')\nexcept SystemExit as e:\n    assert e.code == 0\nprint('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "python -m vlext.toyworld" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "False"
