"""clip_ext under the precisions users train with (issue 29, finding 1 and What to build 3): coordinates and
indices never pass through bf16, and a region training step runs under bf16 / fp16 autocast on CPU."""

import pytest
import torch

from clip_ext.region import region_features

BATCH = 300  # per-GPU batches over 256 are ordinary in CLIP training; bf16 holds no odd integer above 256


def _id_map(batch: int, dtype=torch.float32) -> torch.Tensor:
    """(B, 2, 4, 4) map whose image b holds b // 16 in channel 0 and b % 16 in channel 1: both exact in bf16."""
    b = torch.arange(batch, dtype=torch.float32)
    return torch.stack([b // 16, b % 16], 1)[:, :, None, None].expand(batch, 2, 4, 4).to(dtype)


def _decoded(pooled: torch.Tensor) -> list[int]:
    return (pooled.float()[:, 0] * 16 + pooled.float()[:, 1]).round().long().tolist()


@pytest.mark.parametrize("mode", ["amp_bf16", "pure_bf16", "amp_fp16"])
def test_every_region_is_pooled_from_its_own_image_at_a_batch_over_256(mode):
    boxes = [torch.tensor([[0.1, 0.2, 0.7, 0.9]]) for _ in range(BATCH)]
    if mode == "pure_bf16":
        pooled = region_features(_id_map(BATCH, torch.bfloat16), boxes)
        assert pooled.dtype == torch.bfloat16
    else:
        # under autocast the patch map arrives in the autocast dtype (the output of a matmul)
        dtype = torch.bfloat16 if mode == "amp_bf16" else torch.float16
        with torch.autocast("cpu", dtype=dtype):
            pooled = region_features(_id_map(BATCH, dtype), boxes)
    assert _decoded(pooled) == list(range(BATCH))


def test_a_flat_box_list_with_image_indices_pools_each_from_its_image():
    batch_index = torch.tensor([299, 0, 257, 257, 1])
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(5, 4)
    pooled = region_features(_id_map(BATCH, torch.bfloat16), boxes, batch_index=batch_index)
    assert _decoded(pooled) == [299, 0, 257, 257, 1]


def test_box_corners_keep_fp32_precision_under_bf16():
    # a map whose value is the x coordinate: the pooled value is the box's centre x, to fp32 precision
    x = torch.arange(16, dtype=torch.float32).add(0.5)
    patch_map = x[None, None, None, :].expand(1, 1, 16, 16).contiguous()
    box = torch.tensor([[0.1234, 0.2, 0.6789, 0.9]])
    exact = region_features(patch_map, [box])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_amp = region_features(patch_map, [box])
    assert float(under_amp) == pytest.approx(float(exact), abs=0.05)  # bf16 output rounding only
    assert float(exact) == pytest.approx(16 * (0.1234 + 0.6789) / 2, abs=1e-3)


# --- a whole clip_ext training step under the precisions users pick (CPU autocast) ----------------------


@pytest.mark.parametrize("precision", ["amp_bf16", "pure_bf16", "amp"])
def test_a_bank_region_and_hard_negative_training_step_runs_under_reduced_precision(tmp_path, precision):
    """open_clip's trainer autocasts on the device it trains on (CPU here): the region forward, every loss
    term and the bank run in bf16 / fp16 as on a GPU, and each logged loss is finite (under fp16 the masked
    region losses once normalised zero padding rows with an eps that is 0 in fp16: NaN)."""
    import math
    import re

    from test_clip_open_clip_compat import run_ours, tiny_argv

    from vlext.toyworld import write_clip_csv

    data = write_clip_csv(tmp_path / "data", 8, seed=0, image_size=32, split="train").parent
    argv = tiny_argv(data, tmp_path / "logs", precision, "--precision", precision, "--memory-bank-size", "8",
                     "--region-data", str(data / "train_regions.jsonl"), "--hard-negative-weight",
                     "--log-every-n-steps", "1")  # fmt: skip
    model = run_ours(argv)
    log = (tmp_path / "logs" / precision / "out.log").read_text()
    for name in ("Contrastive_loss", "Region_loss", "Hard_negative_loss"):
        values = [float(v) for v in re.findall(rf"{name}: ([-\w.]+)", log)]
        assert len(values) == 2 and all(math.isfinite(v) for v in values), (name, values)
    assert int(model.memory_bank.filled) == 8
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_region_forward_hands_roi_align_exact_image_indices_at_a_batch_over_256(monkeypatch):
    import open_clip

    import clip_ext  # noqa: F401  (registers clip-ext-tiny)
    from clip_ext import region

    model = open_clip.create_model("clip-ext-tiny")
    size = (
        model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    )
    seen = []
    original = region.roi_align

    def spy(patch_map, rois, **kwargs):
        seen.append(rois)
        return original(patch_map, rois, **kwargs)

    monkeypatch.setattr(region, "roi_align", spy)
    boxes = torch.tensor([[0.1, 0.2, 0.7, 0.9], [0.0, 0.0, 1.0, 1.0]]).expand(BATCH, 2, 4)
    valid = torch.ones(BATCH, 2, dtype=torch.bool)
    valid[::3, 1] = False
    context = model.context_length
    text = torch.zeros(BATCH, context, dtype=torch.long)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = region.region_forward(model, torch.zeros(BATCH, 3, size, size), text, boxes, valid,
                                    torch.zeros(BATCH, 2, context, dtype=torch.long))  # fmt: skip
    (rois,) = seen
    assert rois.dtype == torch.float32
    expected = torch.arange(BATCH).repeat_interleave(2)[valid.reshape(-1)]
    assert torch.equal(rois[:, 0].long(), expected)
    assert out["region_valid"].sum() == expected.shape[0]
