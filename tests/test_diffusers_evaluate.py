"""Layout scoring and the detector interface on known answers: rendered toy-world layouts (the colour
locator recovers every box exactly), boxes moved aside, synthetic detections, tiny random-weight OWLv2 and
Grounding DINO folders built offline, and the input checks that run before any generation."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from diffusers_ext.evaluation.detectors import Detection, ToyColourDetector, ZeroShotDetector, load_detector
from diffusers_ext.evaluation.evaluate import main, read_layouts
from diffusers_ext.evaluation.layout_scoring import score_image, score_layouts, summarize
from diffusers_ext.testing.tiny_detectors import save_tiny_grounding_dino, save_tiny_owlv2
from vlext.toyworld import ToyWorld, write_grounding_jsonl

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def toy():
    scenes = ToyWorld(seed=0, image_size=64, max_objects=3).scenes(6)
    images = [s.render() for s in scenes]
    layouts = [{"boxes": [list(b) for b in s.boxes], "phrases": s.phrases("en")} for s in scenes]
    return scenes, images, layouts


def test_ground_truth_layouts_score_iou_above_0_9_and_ap_1(toy):
    _, images, layouts = toy
    records, summary = score_layouts(images, layouts, ToyColourDetector())
    ious = [o["iou"] for r in records for o in r["objects"]]
    assert len(ious) == summary["n_objects"] > len(images)
    assert min(ious) > 0.9
    assert summary["share_iou_gt_0.5"] == 1.0 and summary["share_center_in_box"] == 1.0
    assert summary["ap"] == pytest.approx(1.0) and summary["ap50"] == pytest.approx(1.0)


def test_chinese_phrases_find_the_same_objects(toy):
    scenes, images, layouts = toy
    zh = [{"boxes": lay["boxes"], "phrases": s.phrases("zh")} for s, lay in zip(scenes, layouts, strict=True)]
    _, summary = score_layouts(images, zh, ToyColourDetector())
    assert summary["mean_iou"] > 0.9 and summary["ap"] == pytest.approx(1.0)


def test_boxes_moved_aside_score_iou_near_0_and_ap_0(toy):
    _, images, layouts = toy
    # each requested box mirrored to the other side of the image: the drawn object is elsewhere
    moved = [
        {"boxes": [[1 - b[2], 1 - b[3], 1 - b[0], 1 - b[1]] for b in lay["boxes"]], "phrases": lay["phrases"]}
        for lay in layouts
    ]
    far = [
        (rec_box, lay_box)
        for lay, mov in zip(layouts, moved, strict=True)
        for lay_box, rec_box in zip(lay["boxes"], mov["boxes"], strict=True)
    ]
    records, summary = score_layouts(images, moved, ToyColourDetector())
    ious = [o["iou"] for r in records for o in r["objects"]]
    assert len(ious) == len(far)
    assert summary["mean_iou"] < 0.1 and summary["share_iou_gt_0.5"] < 0.1
    assert summary["ap50"] < 0.1


def test_an_object_not_found_counts_as_iou_0():
    rec = score_image(
        (64, 64),
        [[0.1, 0.1, 0.5, 0.5], [0.5, 0.5, 0.9, 0.9]],
        ["a cat", "a dog"],
        [Detection((0.1, 0.1, 0.5, 0.5), 0.9, 0)],
    )
    assert [o["iou"] for o in rec["objects"]] == [1.0, 0.0]
    assert rec["objects"][1]["detected"] is None
    s = summarize([rec])
    assert s["n_detected"] == 1 and s["mean_iou"] == 0.5 and s["share_iou_gt_0.5"] == 0.5


def test_each_object_takes_the_best_scoring_candidate_of_its_own_phrase():
    dets = [
        Detection((0.5, 0.5, 0.9, 0.9), 0.4, 0),  # right place, lower score: not chosen
        Detection((0.0, 0.0, 0.2, 0.2), 0.8, 0),
        Detection((0.1, 0.1, 0.5, 0.5), 0.99, 1),  # the other phrase's box is never used for object 0
    ]
    rec = score_image((64, 64), [[0.5, 0.5, 0.9, 0.9], [0.1, 0.1, 0.5, 0.5]], ["a cat", "a dog"], dets)
    assert rec["objects"][0]["detected"] == [0.0, 0.0, 0.2, 0.2] and rec["objects"][0]["iou"] == 0.0
    assert rec["objects"][1]["iou"] == 1.0


def test_a_repeated_phrase_shares_its_top_candidates_by_largest_total_iou():
    boxes = [[0.0, 0.0, 0.4, 0.4], [0.6, 0.6, 1.0, 1.0]]
    dets = [
        Detection((0.6, 0.6, 1.0, 1.0), 0.9, 0),
        Detection((0.0, 0.0, 0.4, 0.4), 0.8, 0),
        Detection((0.3, 0.3, 0.5, 0.5), 0.1, 0),
    ]
    rec = score_image((64, 64), boxes, ["a dog", "a dog"], dets)
    assert [o["iou"] for o in rec["objects"]] == [1.0, 1.0]


def test_box_ap_counts_every_candidate_with_its_score():
    # one perfect box ranked below a wrong one: AP50 of a single object is then 1.0 at recall 1 but
    # precision 0.5 at that recall -> COCO's 101-point AP is 0.5
    rec = score_image(
        (100, 100),
        [[0.1, 0.1, 0.5, 0.5]],
        ["a cat"],
        [Detection((0.6, 0.6, 0.9, 0.9), 0.9, 0), Detection((0.1, 0.1, 0.5, 0.5), 0.5, 0)],
    )
    assert summarize([rec])["ap50"] == pytest.approx(0.5, abs=0.01)


def test_toy_detector_refuses_a_phrase_without_one_colour_word():
    with pytest.raises(ValueError, match="exactly one toy-world colour"):
        ToyColourDetector().check_phrases(["a dog"], "data.jsonl:3")


# ------------------------------------------------------------------- zero-shot detectors, tiny weights


@pytest.fixture(scope="module")
def owl_folder(tmp_path_factory):
    return save_tiny_owlv2(tmp_path_factory.mktemp("owlv2") / "owlv2")


def _noise(w, h, seed):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


def test_tiny_owlv2_folder_loads_through_auto_classes_and_keeps_top_k_per_phrase(owl_folder):
    det = load_detector(str(owl_folder))
    assert isinstance(det, ZeroShotDetector) and det.family == "owl"
    out = det.detect([_noise(64, 48, 0), _noise(40, 40, 1)], [["a red circle", "a blue square"], ["a cat"]])
    assert [len(o) for o in out] == [2 * det.top_k, det.top_k]
    assert sorted({d.phrase_index for d in out[0]}) == [0, 1]
    assert all(0.0 <= v <= 1.0 for o in out for d in o for v in d.box)
    assert all(d.box[0] <= d.box[2] and d.box[1] <= d.box[3] for o in out for d in o)
    scores = [d.score for d in out[0] if d.phrase_index == 0]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) > 1


def test_owlv2_best_box_equals_the_processors_own_post_processing(owl_folder):
    det = load_detector(str(owl_folder))
    image = _noise(64, 48, 2)  # not square: OWLv2 pads to a square, the processor un-pads
    inputs = det.processor(text=[["a red circle"]], images=[image], return_tensors="pt")
    with torch.no_grad():
        outputs = det.model(**inputs)
    ref = det.processor.post_process_grounded_object_detection(
        outputs, threshold=0.0, target_sizes=[(48, 64)]
    )[0]
    best = int(ref["scores"].argmax())
    expected = (ref["boxes"][best] / torch.tensor([64, 48, 64, 48])).clamp(0, 1)
    mine = det.detect([image], [["a red circle"]])[0][0]
    assert mine.score == pytest.approx(float(ref["scores"][best]), abs=1e-6)
    assert torch.allclose(torch.tensor(mine.box), expected, atol=1e-5)


def test_tiny_owlv2_scores_through_score_layouts(owl_folder):
    det = load_detector(str(owl_folder))
    images = [_noise(64, 64, 3), _noise(64, 64, 4)]
    layouts = [
        {"boxes": [[0.1, 0.1, 0.6, 0.6]], "phrases": ["a cat"]},
        {"boxes": [[0.2, 0.2, 0.9, 0.5], [0, 0, 0.5, 0.5]], "phrases": ["a dog", "a cat"]},
    ]
    records, summary = score_layouts(images, layouts, det)
    assert summary["n_objects"] == 3 and summary["n_detected"] == 3
    assert 0.0 <= summary["mean_iou"] <= 1.0 and 0.0 <= summary["ap"] <= 1.0
    assert all(len(r["detections"]) == det.top_k * len(r["objects"]) for r in records)


def test_tiny_grounding_dino_gives_each_phrase_its_own_token_scores(tmp_path):
    det = load_detector(str(save_tiny_grounding_dino(tmp_path / "gdino")))
    assert det.family == "grounding-dino"
    image = _noise(64, 48, 5)
    out = det.detect([image], [["a red circle", "a blue square"]])[0]
    assert len(out) == 2 * det.top_k
    # boxes are the model's own, converted cx,cy,w,h -> xyxy and clipped: each equals one of the
    # processor's post-processed boxes
    text = "a red circle. a blue square."
    inputs = det.processor(images=image, text=text, return_tensors="pt")
    with torch.no_grad():
        outputs = det.model(**inputs)
    ref = det.processor.post_process_grounded_object_detection(
        outputs, inputs.input_ids, threshold=0.0, text_threshold=0.0, target_sizes=[(48, 64)]
    )[0]
    ref_boxes = (ref["boxes"] / torch.tensor([64, 48, 64, 48])).clamp(0, 1)
    for d in out:
        assert (ref_boxes - torch.tensor(d.box)).abs().max(dim=1).values.min() < 1e-5
    # the two phrases are scored on their own tokens: their score lists differ
    s0 = [d.score for d in out if d.phrase_index == 0]
    s1 = [d.score for d in out if d.phrase_index == 1]
    assert s0 != s1


def test_zero_shot_detector_refuses_chinese_phrases_naming_the_english_field(owl_folder):
    with pytest.raises(ValueError, match="phrases_en"):
        load_detector(str(owl_folder)).check_phrases(["一个大的红色圆形"], "data.jsonl:2")


# ------------------------------------------------------------------- refused before any generation


def test_a_folder_that_is_not_a_detector_is_refused(tmp_path):
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(ValueError, match="'clip' is not a zero-shot object detector.*owlv2"):
        load_detector(str(tmp_path / "clip"))
    with pytest.raises(ValueError, match="no config.json"):
        load_detector(str(tmp_path))
    with pytest.raises(ValueError, match="neither a folder nor one of"):
        load_detector(str(tmp_path / "missing" / "dir"))


def test_published_detector_names_offline_say_what_to_download():
    with pytest.raises(FileNotFoundError, match="hf download google/owlv2-base-patch16-ensemble"):
        load_detector("owlv2")


@pytest.fixture()
def data(tmp_path):
    path = write_grounding_jsonl(tmp_path / "data", 3)
    return path, [json.loads(line) for line in path.read_text().splitlines()]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda r: r.update(image="images/none.png"), r"grounding.en.jsonl:2: image .*none.png not found"),
        (lambda r: r["boxes"][0].__setitem__(2, 1.2), r"grounding.en.jsonl:2: box 0 .* outside \[0, 1\]"),
        (lambda r: r["boxes"][0].__setitem__(0, 0.99), r"grounding.en.jsonl:2: box 0 .*(x0 < x1|x1 < x0)"),
        (lambda r: r["phrases"].append("a red dot"), r"grounding.en.jsonl:2: .* phrases but .* boxes"),
        (lambda r: r.update(phrases_en=["x"]), r"grounding.en.jsonl:2: phrases_en must be a list of"),
        (lambda r: r.update(box=[]), r"grounding.en.jsonl:2: unknown keys \['box'\]"),
    ],
)
def test_bad_rows_are_refused_naming_file_and_line(data, change, match):
    path, rows = data
    change(rows[1])
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        read_layouts(_write(path, rows))


def test_bad_input_stops_the_command_before_the_pipeline_is_loaded(data, tmp_path, capsys):
    path, rows = data
    rows[2]["boxes"][0] = [0.5, 0.5, 0.4, 0.9]
    out = tmp_path / "out"
    rc = main(
        [
            "--data",
            str(_write(path, rows)),
            "--pretrained-model",
            str(tmp_path),
            "--adapter",
            "a",
            "--out",
            str(out),
            "--detector",
            "toy-colour",
        ]
    )
    assert rc == 2 and "grounding.en.jsonl:3" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--gate-scales", "0"], "--gate-scales"),
        (["--schedule", "0.5", "0.5"], "--schedule"),
        (["--clip-model", "nowhere"], "--clip-model"),
        (["--detector", "/nowhere/detector"], "--detector"),
    ],
)
def test_bad_flags_are_refused_naming_the_flag(data, tmp_path, capsys, flags, match):
    path, _ = data
    rc = main(
        [
            "--data",
            str(path),
            "--pretrained-model",
            str(tmp_path),
            "--adapter",
            "a",
            "--out",
            str(tmp_path / "out"),
            *flags,
        ]
    )
    assert rc == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------- FID plumbing


class _ChannelStats(torch.nn.Module):
    """A 6-d FID feature: mean and std of each colour channel of uint8 images."""

    def forward(self, x):
        x = x.float() / 255.0
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_colour_shift(tmp_path, toy):
    from diffusers_ext.evaluation.evaluate import _fid

    _, images, _ = toy
    paths = []
    for i, im in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        im.save(paths[-1])
    shifted = []
    for i, im in enumerate(images):
        shifted.append(tmp_path / f"shifted{i}.png")
        Image.eval(im, lambda v: min(255, v + 40)).save(shifted[-1])
    assert abs(_fid(_ChannelStats(), paths, paths, (64, 64))) < 1e-3
    assert _fid(_ChannelStats(), paths, shifted, (64, 64)) > 0.01
    assert _fid(_ChannelStats(), paths[:1], paths, (64, 64)) is None  # one real image: no covariance


@pytest.mark.slow
def test_fid_features_read_a_torchvision_inception_state_dict_and_refuse_other_files(tmp_path):
    from torchvision.models import inception_v3

    from diffusers_ext.evaluation.evaluate import _fid_feature_module

    torch.manual_seed(0)
    torch.save(
        inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), tmp_path / "inc.pth"
    )
    module = _fid_feature_module(str(tmp_path / "inc.pth"))
    with torch.no_grad():
        feats = module(torch.randint(0, 256, (2, 3, 48, 48), dtype=torch.uint8))
    assert module.num_features == 2048 and feats.shape == (2, 2048)
    (tmp_path / "junk.pth").write_bytes(b"not weights")
    with pytest.raises(ValueError, match="--fid-features .*neither a TorchScript feature module nor"):
        _fid_feature_module(str(tmp_path / "junk.pth"))
