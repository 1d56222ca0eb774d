"""clip_ext.region: FG-CLIP-style box filtering, roi_align region features and region InfoNCE."""

import math

import pytest
import torch
import torch.nn.functional as F

from clip_ext.region import filter_boxes, region_contrastive_loss, region_features


def test_filter_boxes_clamps_and_counts_what_it_drops():
    boxes = torch.tensor([
        [0.1, 0.1, 0.5, 0.5],  # kept
        [-0.005, 0.2, 0.4, 1.004],  # rounding error: clamped and kept
        [0.1, 0.1, 0.12, 0.9],  # side 0.02 < 0.05
        [0.1, 0.1, 0.3, 0.3],  # area 0.04 < 0.05
    ])  # fmt: skip
    kept, counts = filter_boxes(boxes, min_area=0.05, min_side=0.05)
    assert counts == {"kept": 2, "dropped_min_side": 1, "dropped_min_area": 1}
    assert torch.equal(kept[1], torch.tensor([0.0, 0.2, 0.4, 1.0]))


def test_filter_boxes_refuses_pixel_boxes_and_wrong_order_naming_the_source():
    with pytest.raises(ValueError, match=r"train_regions.jsonl:3: boxes must be normalized"):
        filter_boxes(torch.tensor([[10.0, 10.0, 50.0, 60.0]]), 0.0, 0.0, where="train_regions.jsonl:3")
    with pytest.raises(ValueError, match="x0 <= x1"):
        filter_boxes(torch.tensor([[0.5, 0.1, 0.2, 0.4]]), 0.0, 0.0)


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
