"""clip_ext.region and clip_ext.region_data: FG-CLIP-style boxes, region features and the region loss."""

import json
import math
import re

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip_train.data import CsvDataset
from test_clip_open_clip_compat import run_ours, tiny_argv

import clip_ext  # noqa: F401  (registers clip-ext-tiny)
from clip_ext.loss import MemoryBankClipLoss
from clip_ext.memory_bank import MemoryBank
from clip_ext.region import (
    RegionHead,
    filter_boxes,
    hard_negative_loss,
    region_contrastive_loss,
    region_features,
    region_forward,
)
from clip_ext.region_data import (
    BatchSideChannel,
    ClipExtCsvDataset,
    RegionDataError,
    SideChannelLoader,
    load_region_table,
)
from vlext.toyworld import write_clip_csv
from vlext.toyworld.clip_csv import hard_negative_phrases
from vlext.toyworld.scene import ToyObject


def test_filter_boxes_keeps_valid_boxes_and_counts_what_it_drops():
    boxes = torch.tensor([
        [0.1, 0.1, 0.5, 0.5],  # kept
        [0.0, 0.2, 0.4, 1.0],  # on the border: kept as it is
        [0.1, 0.1, 0.12, 0.9],  # side 0.02 < 0.05
        [0.1, 0.1, 0.3, 0.3],  # area 0.04 < 0.05
    ])  # fmt: skip
    kept, counts = filter_boxes(boxes, min_area=0.05, min_side=0.05)
    assert counts == {"kept": 2, "dropped_min_side": 1, "dropped_min_area": 1}
    assert torch.equal(kept, boxes[:2])


@pytest.mark.parametrize(
    "box, message",
    [
        ([10.0, 10.0, 50.0, 60.0], r"box 0 = .* lies outside \[0, 1\].*never clamped"),  # pixels
        (
            [-0.005, 0.2, 0.4, 0.9],
            r"box 0 = .* lies outside \[0, 1\]",
        ),  # slightly outside: refused, not clamped
        ([0.2, 0.2, 0.4, 1.004], r"box 0 = .* lies outside \[0, 1\]"),
        ([0.5, 0.1, 0.2, 0.4], r"box 0 = .* needs x0 < x1"),  # flipped
        ([0.2, 0.1, 0.2, 0.4], r"box 0 = .* needs x0 < x1"),  # empty
    ],
)
def test_filter_boxes_refuses_boxes_breaking_the_box_rule_naming_the_source(box, message):
    with pytest.raises(ValueError, match=rf"train_regions.jsonl:3: {message}"):
        filter_boxes(torch.tensor([box]), 0.0, 0.0, where="train_regions.jsonl:3")


def test_region_features_pool_inside_the_box():
    patch_map = torch.zeros(1, 2, 4, 4)
    patch_map[0, 0, :2, :2] = 1.0  # channel 0 lives in the top-left quadrant
    patch_map[0, 1, 2:, 2:] = 1.0  # channel 1 in the bottom-right
    feats = region_features(patch_map, [torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])])
    assert torch.allclose(feats, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), atol=1e-6)


def test_region_loss_masks_padding_rows():
    g = torch.Generator().manual_seed(0)
    region, caption = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    valid = torch.tensor([True, True, True, False, False])
    scale = torch.tensor(math.log(10.0))
    masked = region_contrastive_loss(region, caption, valid, scale)
    unpadded = region_contrastive_loss(region[:3], caption[:3], valid[:3], scale)
    assert torch.equal(masked, unpadded)
    padding_changed = region.clone()
    padding_changed[3:] = 100.0
    assert torch.equal(region_contrastive_loss(padding_changed, caption, valid, scale), masked)


def test_region_loss_is_symmetric_infonce_with_clamped_scale():
    g = torch.Generator().manual_seed(1)
    region, caption = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    valid = torch.ones(4, dtype=torch.bool)
    logits = 100.0 * F.normalize(region, dim=-1) @ F.normalize(caption, dim=-1).T
    labels = torch.arange(4)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    got = region_contrastive_loss(region, caption, valid, torch.tensor(7.0))  # clamped to ln(100)
    assert torch.allclose(got, expected, atol=1e-5)


# --- wiring: region data, the region forward and the region loss inside MemoryBankClipLoss ---


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    csv_path = write_clip_csv(root, 6, seed=0, image_size=32)
    base = CsvDataset(
        str(csv_path), None, "filepath", "title", tokenizer=open_clip.get_tokenizer("clip-ext-tiny")
    )
    return root, base


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_region_table_follows_csv_order_and_counts_what_filtering_drops(toy):
    root, base = toy
    lines = [json.loads(x) for x in (root / "train_regions.jsonl").read_text().splitlines()]
    shuffled = _jsonl(root / "shuffled.jsonl", lines[::-1])  # matched by path, not by line order
    table = load_region_table(shuffled, base.images, min_area=0.05, min_side=0.0)
    expected_kept, expected_small = 0, 0
    for image, row in zip(base.images, lines):
        assert row["filepath"] == image
        areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in (r["box"] for r in row["regions"])]
        expected_kept += sum(a >= 0.05 for a in areas)
        expected_small += sum(a < 0.05 for a in areas)
    assert expected_small > 0  # the toy world has small objects, so the filter really drops some
    assert table.counts["kept"] == expected_kept and table.counts["dropped_min_area"] == expected_small
    first = [
        r for r in lines[0]["regions"] if (r["box"][2] - r["box"][0]) * (r["box"][3] - r["box"][1]) >= 0.05
    ]
    assert table.captions[0] == [r["caption"] for r in first]
    assert torch.allclose(table.boxes[0], torch.tensor([r["box"] for r in first]).reshape(-1, 4))
    assert "dropped by --min-box-area" in table.summary()


def test_region_data_that_misses_a_csv_image_names_the_file_and_the_image(toy):
    root, base = toy
    lines = (root / "train_regions.jsonl").read_text().splitlines()
    partial = root / "partial.jsonl"
    partial.write_text("\n".join(lines[:2] + lines[3:]) + "\n")
    with pytest.raises(RegionDataError, match=rf"partial.jsonl does not match --train-data: no line for image "
                                              rf"{base.images[2]} \(CSV row 3\)"):  # fmt: skip
        load_region_table(partial, base.images, 0.0, 0.0)


def test_invalid_boxes_and_lines_are_refused_naming_file_and_line(toy):
    root, base = toy
    good = {"filepath": base.images[0], "regions": [{"box": [0.1, 0.1, 0.5, 0.5], "caption": "a red square"}]}
    pixels = {"filepath": base.images[1], "regions": [{"box": [4, 4, 20, 30], "caption": "a blue circle"}]}
    with pytest.raises(
        RegionDataError, match=r"pixels.jsonl:2: box 0 = \[4.0, 4.0, 20.0, 30.0\] lies outside \[0, 1\]"
    ):
        load_region_table(_jsonl(root / "pixels.jsonl", [good, pixels]), base.images, 0.0, 0.0)
    swapped = {"filepath": base.images[1], "regions": [{"box": [0.6, 0.1, 0.2, 0.5], "caption": "x"}]}
    with pytest.raises(
        RegionDataError, match=r"swapped.jsonl:2: box 0 = \[0.6, 0.1, 0.2, 0.5\] .*needs x0 < x1"
    ):
        load_region_table(_jsonl(root / "swapped.jsonl", [good, swapped]), base.images, 0.0, 0.0)
    three = {"filepath": base.images[1], "regions": [{"box": [0.1, 0.2, 0.3], "caption": "x"}]}
    with pytest.raises(RegionDataError, match=r"three.jsonl:2: region 0 box must be 4 numbers"):
        load_region_table(_jsonl(root / "three.jsonl", [good, three]), base.images, 0.0, 0.0)
    broken = root / "broken.jsonl"
    broken.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(RegionDataError, match=r"broken.jsonl:2: not valid JSON"):
        load_region_table(broken, base.images, 0.0, 0.0)
    with pytest.raises(RegionDataError, match=r"array.jsonl:2: expected a JSON object, got list"):
        load_region_table(_jsonl(root / "array.jsonl", [good, [good]]), base.images, 0.0, 0.0)
    with pytest.raises(
        RegionDataError, match=r"twice.jsonl:2: image .* is already listed at .*twice.jsonl:1"
    ):
        load_region_table(_jsonl(root / "twice.jsonl", [good, good]), base.images, 0.0, 0.0)


def test_dataset_pads_regions_with_a_validity_mask(toy):
    root, base = toy
    table = load_region_table(root / "train_regions.jsonl", base.images, 0.0, 0.0)
    dataset = ClipExtCsvDataset(base, open_clip.image_transform(32, is_train=False), table)
    r = table.max_regions
    for idx in range(len(dataset)):
        image, text, extras = dataset[idx]
        n = len(table.captions[idx])
        assert image.shape == (3, 32, 32) and extras["region_boxes"].shape == (r, 4)
        assert extras["region_valid"].tolist() == [True] * n + [False] * (r - n)
        assert torch.equal(extras["region_text"][:n], base.tokenize(table.captions[idx]))
        assert (extras["region_text"][n:] == 0).all() and (extras["region_caption_ids"][n:] == -1).all()
        assert int(extras["sample_ids"]) == idx


def test_side_channel_finds_a_batch_by_its_image_tensor_after_the_host_moves_it():
    channel = BatchSideChannel(keep=3)
    tokens = torch.zeros(2, 5, dtype=torch.long)
    batches = [(torch.rand(2, 3, 4, 4), tokens, {"sample_ids": torch.tensor([i, i])}) for i in range(3)]
    loader = SideChannelLoader(batches, channel, "cpu", torch.float32)
    seen = []
    for images, _ in loader:
        seen.append(images.to(device="cpu", dtype=torch.float32, non_blocking=True))  # what the host does
    # --accum-freq 3 revisits earlier batches: each is still found by identity
    assert [int(channel.get(images)["sample_ids"][0]) for images in seen] == [0, 1, 2]
    assert channel.get(torch.rand(2, 3, 4, 4)) is None


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return open_clip.create_model("clip-ext-tiny", output_dict=True)


def _region_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(3, 3, 32, 32, generator=g)
    text = torch.randint(1, 400, (3, 32), generator=g)
    region_text = torch.randint(1, 400, (3, 2, 32), generator=g)
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]],
                          [[0.1, 0.2, 0.9, 0.8], [0.0, 0.0, 0.0, 0.0]],
                          [[0.25, 0.0, 1.0, 0.75], [0.0, 0.5, 0.5, 1.0]]])  # fmt: skip
    valid = torch.tensor([[True, True], [True, False], [True, True]])
    return image, text, boxes, valid, region_text


def test_region_forward_matches_the_plain_forward_and_zeroes_padding(tiny_model):
    image, text, boxes, valid, region_text = _region_batch()
    with torch.no_grad():
        out = region_forward(tiny_model, image, text, boxes, valid, region_text)
        plain = tiny_model(image, text)
    torch.testing.assert_close(out["image_features"], plain["image_features"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["text_features"], plain["text_features"], atol=1e-5, rtol=1e-5)
    assert (
        out["region_features"].shape == (6, 64) and out["region_valid"].tolist() == valid.reshape(-1).tolist()
    )
    assert (out["region_features"][3] == 0).all() and (out["region_text_features"][3] == 0).all()
    torch.testing.assert_close(out["region_features"][0].norm(), torch.tensor(1.0))
    # region caption features are the text tower's own embedding of the caption
    torch.testing.assert_close(
        out["region_text_features"][4], tiny_model.encode_text(region_text[2, :1], normalize=True)[0],
        atol=1e-5, rtol=1e-5,
    )  # fmt: skip


def test_padded_boxes_do_not_change_the_loss_and_gradients_reach_temperature_and_projection(tiny_model):
    image, text, boxes, valid, region_text = _region_batch()
    head = RegionHead(tiny_model.logit_scale.item())
    loss = MemoryBankClipLoss(None, region_head=head, region_weight=0.1)
    tiny_model.zero_grad()
    out = region_forward(tiny_model, image, text, boxes, valid, region_text)
    values = loss(**out, output_dict=True)
    assert set(values) == {"contrastive_loss", "region_loss"} and torch.isfinite(values["region_loss"])
    values["region_loss"].backward()
    assert head.logit_scale.grad is not None and head.logit_scale.grad != 0
    assert tiny_model.visual.proj.grad is not None and tiny_model.visual.proj.grad.abs().sum() > 0
    other_boxes, other_text = boxes.clone(), region_text.clone()
    other_boxes[1, 1] = torch.tensor([0.3, 0.3, 0.9, 0.9])  # a padding slot
    other_text[1, 1] = 7
    with torch.no_grad():
        again = loss(
            **region_forward(tiny_model, image, text, other_boxes, valid, other_text), output_dict=True
        )
    torch.testing.assert_close(again["region_loss"], values["region_loss"].detach())
    unweighted = loss.region_loss(out["region_features"], out["region_text_features"], out["region_valid"])
    assert values["region_loss"].item() == pytest.approx(0.1 * unweighted.item())


def test_same_caption_is_not_a_negative_in_batch_or_in_the_bank():
    g = torch.Generator().manual_seed(2)
    region, caption = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    caption[2] = caption[0]  # two boxes with the same phrase
    valid, scale = torch.ones(3, dtype=torch.bool), torch.tensor(math.log(10.0))
    ids = torch.tensor([5, 6, 5])
    masked = region_contrastive_loss(region, caption, valid, scale, caption_ids=ids)
    r, c = F.normalize(region, dim=-1), F.normalize(caption, dim=-1)
    logits = 10.0 * r @ c.T
    logits[0, 2] = logits[2, 0] = float("-inf")
    labels = torch.arange(3)
    torch.testing.assert_close(
        masked, (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    )
    bank = F.normalize(torch.randn(2, 8, generator=g), dim=-1)
    with_bank = region_contrastive_loss(region, caption, valid, scale, ids, bank, torch.tensor([6, 9]))
    extra = 10.0 * r @ bank.T
    extra[1, 0] = float("-inf")  # bank entry of caption 6 is row 1's own caption
    per_region = torch.cat([logits, extra], 1)
    expected = (F.cross_entropy(per_region, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(with_bank, expected)


def test_bank_region_texts_are_negatives_once_active_and_enqueued_after_the_step():
    bank = MemoryBank(size=4, dim=8, region_text=True)
    head = RegionHead(math.log(10.0))
    loss = MemoryBankClipLoss(bank, region_head=head, region_weight=1.0)
    g = torch.Generator().manual_seed(3)
    feats = lambda n: F.normalize(torch.randn(n, 8, generator=g), dim=-1)  # noqa: E731
    image, text, region, caption = feats(2), feats(2), feats(3), feats(3)
    valid, ids = torch.tensor([True, True, False]), torch.tensor([0, 1, -1])
    kwargs = dict(
        region_features=region, region_text_features=caption, region_valid=valid, region_caption_ids=ids
    )
    first = loss(image, text, torch.tensor(10.0), output_dict=True, **kwargs)["region_loss"].item()
    assert first == pytest.approx(
        region_contrastive_loss(region, caption, valid, head.logit_scale, ids).item()
    )
    loss.commit()
    assert int(bank.region_filled) == 2 and torch.equal(bank.region_id_queue[:2], torch.tensor([0, 1]))
    new_ids = torch.tensor([2, 3, -1])
    kwargs["region_caption_ids"] = new_ids
    second = loss(image, text, torch.tensor(10.0), output_dict=True, **kwargs)["region_loss"].item()
    expected = region_contrastive_loss(
        region, caption, valid, head.logit_scale, new_ids, caption[:2], ids[:2]
    )
    assert second == pytest.approx(expected.item()) and second > first
    for _ in range(3):  # wraps around with 2 valid regions per step into 4 slots
        loss(image, text, torch.tensor(10.0), output_dict=True, **kwargs)
        loss.commit()
    assert int(bank.region_filled) == 4 and int(bank.region_ptr) == 0


# --- FG-CLIP's hard-negative region loss ---


def test_hard_negative_loss_on_known_logits():
    f64 = dict(dtype=torch.float64)
    region = torch.tensor([[1.0, 0.0], [0.3, 0.7]], **f64)
    positive = torch.tensor(
        [[2.0, 0.0], [0.0, 1.0]], **f64
    )  # cosine 1 with region 0 (features are normalized)
    negatives = torch.tensor([[[0.0, 1.0], [-1.0, 0.0], [5.0, 5.0]],  # cosines 0, -1, padding
                              [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]], **f64)  # fmt: skip
    valid = torch.tensor([[True, True, False], [False, False, False]])  # region 1 has no negatives: no anchor
    loss = hard_negative_loss(region, positive, negatives, valid, torch.tensor(math.log(10.0), **f64))
    # logits [10, 0, -10]: CE with the true caption first, one direction, as FG-CLIP's hard_contrastive_loss
    expected = math.log(1 + math.exp(-10) + math.exp(-20))
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    clamped = hard_negative_loss(
        region, positive, negatives, valid, torch.tensor(7.0, **f64)
    )  # capped at 100
    assert clamped.item() == pytest.approx(math.log(1 + math.exp(-100) + math.exp(-200)), abs=1e-12)
    scale = torch.tensor(math.log(2.0), requires_grad=True, **f64)
    hard_negative_loss(region, positive, negatives, valid, scale).backward()
    assert scale.grad < 0  # a sharper temperature lowers the loss when the true caption already wins


def test_hard_negatives_reach_the_loss_through_the_region_forward(tiny_model):
    image, text, boxes, valid, region_text = _region_batch()
    g = torch.Generator().manual_seed(4)
    hn_text = torch.randint(1, 400, (3, 2, 4, 32), generator=g)
    hn_valid = torch.ones(3, 2, 4, dtype=torch.bool)
    hn_valid[0, 0, 2:] = False  # region 0 has two negatives
    head = RegionHead(tiny_model.logit_scale.item(), hard_negatives=True)
    loss = MemoryBankClipLoss(None, region_head=head, region_weight=0.1, hard_negative_weight=0.5)
    out = region_forward(tiny_model, image, text, boxes, valid, region_text, hn_text, hn_valid)
    assert out["hard_negative_text_features"].shape == (24, 64)
    # padding regions' negatives are not encoded (region 1, slot 1 is padding)
    assert out["hard_negative_valid"].reshape(3, 2, 4)[1, 1].tolist() == [False] * 4
    assert (out["hard_negative_text_features"].reshape(3, 2, 4, 64)[1, 1] == 0).all()
    torch.testing.assert_close(
        out["hard_negative_text_features"][1], tiny_model.encode_text(hn_text[0, 0, 1:2], normalize=True)[0],
        atol=1e-5, rtol=1e-5,
    )  # fmt: skip
    values = loss(**out, output_dict=True)
    assert set(values) == {"contrastive_loss", "region_loss", "hard_negative_loss"}
    flat_valid = out["hard_negative_valid"].reshape(6, 4)
    expected = hard_negative_loss(out["region_features"], out["region_text_features"],
                                  out["hard_negative_text_features"].reshape(6, 4, 64), flat_valid,
                                  head.hard_negative_logit_scale)  # fmt: skip
    assert values["hard_negative_loss"].item() == pytest.approx(0.5 * expected.item())
    values["hard_negative_loss"].backward()
    assert head.hard_negative_logit_scale.grad is not None and head.hard_negative_logit_scale.grad != 0
    assert head.logit_scale.grad is None  # each loss has its own temperature


def test_toy_world_hard_negatives_swap_one_colour_or_shape_word():
    obj = ToyObject(shape="circle", color="red", size="small", box=(0.1, 0.1, 0.3, 0.3))
    negatives = hard_negative_phrases(obj)
    assert len(negatives) == 10 and len(set(negatives)) == 10 and obj.phrase_en not in negatives
    assert negatives[0] == "a small orange circle" and "a small blue circle" in negatives
    assert "a small red square" in negatives
    for phrase in negatives:  # exactly one word differs
        assert sum(a != b for a, b in zip(phrase.split(), obj.phrase_en.split())) == 1


def test_region_table_keeps_each_kept_boxs_hard_negatives_and_pads_them(toy):
    root, base = toy
    table = load_region_table(root / "train_regions.jsonl", base.images, min_area=0.05, min_side=0.0)
    lines = [json.loads(x) for x in (root / "train_regions.jsonl").read_text().splitlines()]
    kept = [
        r for r in lines[0]["regions"] if (r["box"][2] - r["box"][0]) * (r["box"][3] - r["box"][1]) >= 0.05
    ]
    assert table.hard_negatives[0] == [r["hard_negatives"] for r in kept] and table.max_hard_negatives == 10
    dataset = ClipExtCsvDataset(
        base, open_clip.image_transform(32, is_train=False), table, hard_negatives=True
    )
    _, _, extras = dataset[0]
    n = len(kept)
    assert extras["region_hard_negative_text"].shape == (table.max_regions, 10, 32)
    assert (
        extras["region_hard_negative_valid"][:n].all() and not extras["region_hard_negative_valid"][n:].any()
    )
    assert torch.equal(extras["region_hard_negative_text"][0], base.tokenize(kept[0]["hard_negatives"]))
    bad = {"filepath": base.images[0], "regions": [{"box": [0.1, 0.1, 0.5, 0.5], "caption": "a red square",
                                                    "hard_negatives": "a blue square"}]}  # fmt: skip
    with pytest.raises(RegionDataError, match=r"hn.jsonl:1: region 0 hard_negatives must be a list"):
        load_region_table(_jsonl(root / "hn.jsonl", [bad]), base.images, 0.0, 0.0)


def _logged(log, name):
    return [float(v) for v in re.findall(rf" {name}: ([-\d.eE+naif]+) \(", log)]


def test_hard_negative_loss_trains_in_clip_ext_train_with_its_own_temperature(tmp_path):
    data = tmp_path / "data"
    write_clip_csv(data, 16, seed=0, image_size=32)
    model = run_ours(tiny_argv(data, tmp_path / "logs", "hn", "--region-data", str(data / "train_regions.jsonl"),
                               "--hard-negative-weight", "--memory-bank-size", "8", "--diag", "--log-every-n-steps",
                               "1", "--report-to", "tensorboard", epochs=2))  # fmt: skip
    log = (tmp_path / "logs/hn/out.log").read_text()
    assert "hard negatives" in log and "kept regions carry hard negative captions, padded to 10" in log
    hard, region, contrastive, total = (_logged(log, k) for k in ("Hard_negative_loss", "Region_loss",
                                                                    "Contrastive_loss", "Loss"))  # fmt: skip
    assert len(hard) == 8 and all(math.isfinite(v) and v > 0 for v in hard)  # 2 epochs x 4 steps
    assert total[0] == pytest.approx(contrastive[0] + region[0] + hard[0], abs=3e-4)
    head = model.clip_ext_region
    init = math.log(1 / 0.07)  # both temperatures start at the global scale of a model from scratch
    assert head.hard_negative_logit_scale.item() != pytest.approx(init, abs=1e-6)
    assert head.hard_negative_logit_scale.item() != pytest.approx(head.logit_scale.item(), abs=1e-6)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "logs/hn/tensorboard"))
    events.Reload()
    for tag in ("diag/hard_negative_loss", "diag/hard_negative_logit_scale", "diag/region_loss",
                "diag/region_logit_scale", "diag/bank_mass_image_to_text", "diag/bank_mass_text_to_image"):  # fmt: skip
        assert len(events.Scalars(tag)) == 8, tag
    mass = [e.value for e in events.Scalars("diag/bank_mass_image_to_text")]
    assert mass[0] == 0.0 and all(0.0 < m < 1.0 for m in mass[1:])  # bank empty at step 1, then in use
    hard_tb = [e.value for e in events.Scalars("diag/hard_negative_loss")]
    assert hard_tb[-1] == pytest.approx(hard[-1] / 0.5, rel=1e-3, abs=2e-4)  # unweighted in diag


def test_hard_negative_weight_without_negatives_in_the_data_is_refused(tmp_path):
    data = tmp_path / "data"
    write_clip_csv(data, 8, seed=0, image_size=32)
    rows = [json.loads(x) for x in (data / "train_regions.jsonl").read_text().splitlines()]
    for row in rows:
        for r in row["regions"]:
            del r["hard_negatives"]
    plain = _jsonl(tmp_path / "plain.jsonl", rows)
    with pytest.raises(
        SystemExit, match=r"--hard-negative-weight: no region of .*plain.jsonl carries 'hard_negatives'"
    ):
        run_ours(
            tiny_argv(data, tmp_path / "logs", "nohn", "--region-data", str(plain), "--hard-negative-weight")
        )
