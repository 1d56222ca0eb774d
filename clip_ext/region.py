"""FG-CLIP-style region pieces: box filtering, region features by roi_align, and the region InfoNCE loss.

FG-CLIP (360CVGroup/FG-CLIP) pools each box from the patch-token map with roi_align and projects it like
the global feature, then contrasts it with the box's caption. Boxes are filtered first and what was dropped
is counted, because silently losing boxes hides data problems (degenerate boxes from a converter, boxes in
pixels instead of normalized). ``clip_ext.train`` wires these in with ``--region-data`` (see
:mod:`clip_ext.region_data` for the data side): :class:`RegionHead` is a submodule of the model (so its
temperature is checkpointed) and :func:`region_forward` is the model's forward while the region loss is on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from vlext.boxes import box_error, satisfies_box_rule

__all__ = [
    "filter_boxes",
    "region_features",
    "region_contrastive_loss",
    "hard_negative_loss",
    "RegionHead",
    "region_forward",
]

MAX_LOGIT_SCALE = math.log(100)


def filter_boxes(
    boxes: torch.Tensor, min_area: float, min_side: float, where: str = "boxes"
) -> tuple[torch.Tensor, dict[str, int]]:
    """Check normalized xyxy boxes against the box rule and keep those with enough area and side.

    The box rule is the distribution's one rule (:mod:`vlext.boxes`, diffusers_ext applies it too):
    ``0 <= x0 < x1 <= 1`` and ``0 <= y0 < y1 <= 1``. A box outside [0, 1], empty or flipped is refused with an error naming ``where``
    (a file and line), never clamped: such a box means the data is not in normalized xyxy. Returns
    (kept boxes, counts of what was kept and dropped as too small).
    """
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(
            f"{where}: boxes must have shape (N, 4) as [x0, y0, x1, y1], got {tuple(boxes.shape)}"
        )
    broken = ~satisfies_box_rule(*boxes.unbind(-1))
    if broken.any():
        bad = int(torch.nonzero(broken)[0])
        raise box_error(where, bad, boxes[bad].tolist())
    small_side, small_area = _too_small(boxes, min_area, min_side)
    keep = ~(small_side | small_area)
    counts = {"kept": int(keep.sum()), "dropped_min_side": int(small_side.sum()),
              "dropped_min_area": int(small_area.sum())}  # fmt: skip
    return boxes[keep], counts


def _too_small(boxes: torch.Tensor, min_area: float, min_side: float) -> tuple[torch.Tensor, torch.Tensor]:
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    small_side = (width < min_side) | (height < min_side)
    return small_side, ~small_side & (width * height < min_area)


def kept_box_mask(boxes: torch.Tensor, min_area: float, min_side: float) -> torch.Tensor:
    """Which rows :func:`filter_boxes` keeps (boxes already validated), to select their captions."""
    small_side, small_area = _too_small(boxes, min_area, min_side)
    return ~(small_side | small_area)


def region_features(
    patch_map: torch.Tensor,
    boxes: torch.Tensor | list[torch.Tensor],
    output_size: int = 1,
    batch_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """roi_align over a (B, C, H, W) patch-token map with normalized xyxy boxes -> (K, C) in the map's dtype.

    ``boxes`` is a list of (N_i, 4) per image, or one (K, 4) tensor with ``batch_index`` (K,) naming each
    box's image. Boxes, their image index and the pooling run in fp32 whatever the map's dtype or autocast:
    torchvision's roi format carries the image index in the boxes' dtype, and bf16 holds no odd integer above
    256, so with a per-GPU batch over 256 a bf16 box was pooled from a neighbouring image (issue 29, finding
    1); bf16 corners also lose about 1/8 of a patch.
    """
    height, width = patch_map.shape[-2:]
    if isinstance(boxes, (list, tuple)):
        counts = torch.tensor([len(b) for b in boxes], device=patch_map.device)
        batch_index = torch.arange(len(boxes), device=patch_map.device).repeat_interleave(counts)
        boxes = torch.cat(list(boxes)) if len(boxes) else patch_map.new_zeros(0, 4)
    if batch_index is None or batch_index.shape != boxes.shape[:1]:
        raise ValueError(f"region_features: boxes {tuple(boxes.shape)} need one batch index each")
    scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=patch_map.device)
    rois = torch.cat([batch_index.to(torch.float32)[:, None], boxes.to(torch.float32) * scale], dim=1)
    with torch.autocast(patch_map.device.type, enabled=False):
        pooled = roi_align(patch_map.float(), rois, output_size=output_size, spatial_scale=1.0, aligned=True)
    return pooled.mean(dim=(-2, -1)).to(patch_map.dtype)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def region_contrastive_loss(
    region: torch.Tensor,
    caption: torch.Tensor,
    valid: torch.Tensor,
    logit_scale: torch.Tensor,
    caption_ids: torch.Tensor | None = None,
    bank_captions: torch.Tensor | None = None,
    bank_ids: torch.Tensor | None = None,
    rows: slice | None = None,
    world_size: int = 1,
) -> torch.Tensor:
    """Symmetric InfoNCE between (N, D) region and caption features over the rows where ``valid`` is True.

    Padding rows (``valid`` False) are neither anchors nor negatives. ``logit_scale`` is the region head's
    own log temperature, clamped at ln(100) as open_clip clamps the global one.

    ``caption_ids`` (N,) names each row's caption text: another row (or bank entry, ``bank_ids``) with the
    same caption is not a negative, since short region phrases repeat across images ("a red square") and
    would otherwise be pushed apart from themselves. ``bank_captions`` (M, D) are extra caption negatives of
    the region->caption direction (the memory bank's region texts, detached).

    ``rows`` (a DDP rank's own rows under open_clip's ``local_loss``): only those rows are anchors and their
    summed loss is divided by the valid rows of all N over ``world_size``, so that the ranks' losses add up
    to ``world_size`` x the loss over all N, as ``ClipLoss``'s local losses do (DDP's average then gives
    the one-process gradient, whatever each rank's share of valid regions).

    Masks instead of selecting the valid rows: nothing here reads a count to the host.
    """
    if region.shape != caption.shape or valid.shape != region.shape[:1]:
        raise ValueError(f"region {tuple(region.shape)}, caption {tuple(caption.shape)} and valid "
                         f"{tuple(valid.shape)} must agree on (N, D) / (N,)")  # fmt: skip
    n = region.shape[0]
    rows = slice(0, n) if rows is None else rows
    # fp32: padding rows are zero, and F.normalize's eps (1e-12) is 0 in fp16, which makes them 0 / 0 = NaN
    region, caption = (
        F.normalize(_at_least_fp32(region), dim=-1),
        F.normalize(_at_least_fp32(caption), dim=-1),
    )
    scale = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
    labels = torch.arange(n, device=region.device)[rows]
    anchors = valid[rows]
    per_region = scale * region[rows] @ caption.T
    per_caption = scale * caption[rows] @ region.T
    not_negative = ~valid[None, :]
    if caption_ids is not None:
        own = labels[:, None] == torch.arange(n, device=region.device)[None, :]
        not_negative = not_negative | ((caption_ids[rows][:, None] == caption_ids[None, :]) & ~own)
    # a padding anchor keeps finite logits: its loss is weighted 0, and an all -inf row would give NaN gradients
    not_negative = not_negative & anchors[:, None]
    per_region = per_region.masked_fill(not_negative, float("-inf"))
    per_caption = per_caption.masked_fill(not_negative, float("-inf"))
    if bank_captions is not None and bank_captions.shape[0] > 0:
        extra = scale * region[rows] @ bank_captions.to(region.dtype).T
        if caption_ids is not None and bank_ids is not None:
            same = caption_ids[rows][:, None] == bank_ids[None, :]
            extra = extra.masked_fill(same & anchors[:, None], float("-inf"))
        per_region = torch.cat([per_region, extra], 1)
    per_row = F.cross_entropy(per_region, labels, reduction="none") + F.cross_entropy(
        per_caption, labels, reduction="none"
    )
    count = valid.sum().clamp(min=1).to(per_row.dtype) / world_size
    # an empty batch gives 0 with the temperature still in the graph, so DDP sees a gradient on every rank
    return (per_row * anchors.to(per_row.dtype)).sum() / (2 * count)


def hard_negative_loss(
    region: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    valid: torch.Tensor,
    logit_scale: torch.Tensor,
    anchor_count: torch.Tensor | None = None,
) -> torch.Tensor:
    """FG-CLIP's hard-negative region loss: each region against its own caption and its hard negatives.

    ``region`` and ``positive`` (N, D) are a region's feature and its caption's; ``negatives`` (N, M, D) its
    negative captions ("a red circle" -> "a blue circle"), ``valid`` (N, M) which of the M slots hold one.
    Logits ``scale x [<r, c>, <r, n_1>, ..., <r, n_M>]``, cross-entropy with the true caption at index 0,
    one direction (region -> captions) and averaged over the regions that have at least one negative, as in
    FG-CLIP's ``hard_contrastive_loss`` (there always 10 negatives). Its temperature is its own learnable
    log scale, clamped at ln(100) like the others.

    ``anchor_count``: divide by this instead of the local count of regions with negatives (under DDP, the
    global count over the world size: the ranks' losses then average to the one-process loss and gradient
    whatever each rank's share). A region without negatives has one finite logit: its loss is exactly 0.
    """
    if (
        region.shape != positive.shape
        or negatives.shape[:1] != region.shape[:1]
        or valid.shape != negatives.shape[:2]
    ):
        raise ValueError(f"region {tuple(region.shape)}, positive {tuple(positive.shape)}, negatives "
                         f"{tuple(negatives.shape)} and valid {tuple(valid.shape)} must be (N, D), (N, D), "
                         "(N, M, D) and (N, M)")  # fmt: skip
    anchors = valid.any(dim=1)
    # fp32: padding rows and slots are zero, and F.normalize's eps (1e-12) is 0 in fp16 (0 / 0 = NaN)
    r = F.normalize(_at_least_fp32(region), dim=-1)
    c = F.normalize(_at_least_fp32(positive), dim=-1)
    n = F.normalize(_at_least_fp32(negatives), dim=-1)
    scale = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
    logits = scale * torch.cat([(r * c).sum(-1, keepdim=True), torch.einsum("nd,nmd->nm", r, n)], dim=1)
    present = torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)
    logits = logits.masked_fill(~present, float("-inf"))
    per_row = F.cross_entropy(
        logits, torch.zeros(r.shape[0], dtype=torch.long, device=r.device), reduction="none"
    )
    count = anchors.sum() if anchor_count is None else anchor_count
    # no anchor anywhere: 0, with features and temperature in the graph so DDP sees a gradient on every rank
    return (per_row * anchors.to(per_row.dtype)).sum() / count.clamp(min=1).to(per_row.dtype)


class RegionHead(nn.Module):
    """The region losses' own learnable temperatures (log space), a submodule of the CLIP model.

    FG-CLIP gives the region InfoNCE and the hard-negative loss each its own scale
    (``logit_scale_finegraind``, ``logit_scale_hardneg``); both start from the global one (so a pretrained
    model's region logits start as sharp as its global logits) and are clamped at ln(100) like the global
    scale. ``hard_negative_logit_scale`` exists only when the hard-negative loss is on.
    """

    def __init__(self, init_logit_scale: float, hard_negatives: bool = False):
        super().__init__()
        if not 0.0 <= init_logit_scale <= MAX_LOGIT_SCALE + 1e-6:
            raise ValueError(f"region logit scale init must lie in [0, ln(100)], got {init_logit_scale}")
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.hard_negative_logit_scale = (
            nn.Parameter(torch.tensor(float(init_logit_scale))) if hard_negatives else None
        )

    @torch.no_grad()
    def clamp_(self) -> None:
        self.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        if self.hard_negative_logit_scale is not None:
            self.hard_negative_logit_scale.clamp_(0, MAX_LOGIT_SCALE)


def _scatter_rows(values: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
    """(len(index), D) -> (rows, D) with zeros in the padding rows (fixed shapes concatenate under
    ``--accum-freq``)."""
    return values.new_zeros(rows, values.shape[1]).index_copy(0, index, values)


def region_forward(
    model: nn.Module,
    image: torch.Tensor,
    text: torch.Tensor,
    boxes: torch.Tensor,
    valid: torch.Tensor,
    region_text: torch.Tensor,
    hard_negative_text: torch.Tensor | None = None,
    hard_negative_valid: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """open_clip ``CLIP.forward`` outputs plus region features, in one pass of each tower.

    The image tower runs through ``forward_intermediates`` (its pooled output equals ``encode_image``);
    the last block's patch tokens after ``ln_post`` are pooled per box with roi_align and projected with
    the tower's own ``proj``, as FG-CLIP does. Region captions go through the text tower together with the
    batch captions. ``boxes`` (B, R, 4) normalized xyxy, ``valid`` (B, R) and ``region_text`` (B, R, L) are
    padded to R regions per image; padding rows of the outputs are zero and ``region_valid`` is False.
    With ``hard_negative_text`` (B, R, M, L) and ``hard_negative_valid`` (B, R, M), the valid negative
    captions go through the text tower in the same pass and come back as ``hard_negative_text_features``
    (B * R * M, D) with ``hard_negative_valid`` (B * R * M,), flat so that ``--accum-freq`` can concatenate
    them like every other entry.
    """
    visual = model.visual
    out = visual.forward_intermediates(image, indices=1, normalize_intermediates=True, output_fmt="NCHW")
    patch_map = out["image_intermediates"][-1]
    flat_valid = valid.reshape(-1)
    # the valid rows' index, read once (the one host sync the variable region count needs; one more for the
    # hard negatives); the image index stays int64 until region_features makes it fp32 (exact to 2**24)
    index = flat_valid.nonzero().squeeze(1)
    n_valid = index.shape[0]
    image_of_row = torch.arange(boxes.shape[0], device=boxes.device).repeat_interleave(boxes.shape[1])
    pooled = region_features(patch_map, boxes.reshape(-1, 4).index_select(0, index),
                             batch_index=image_of_row.index_select(0, index))  # fmt: skip
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    parts = [text, region_text.reshape(-1, text.shape[-1]).index_select(0, index)]
    if hard_negative_text is not None:
        flat_hn_valid = hard_negative_valid.reshape(-1) & flat_valid.repeat_interleave(
            hard_negative_valid.shape[-1]
        )
        hn_index = flat_hn_valid.nonzero().squeeze(1)
        parts.append(hard_negative_text.reshape(-1, text.shape[-1]).index_select(0, hn_index))
    texts = model.encode_text(torch.cat(parts), normalize=True)
    rows = flat_valid.shape[0]
    result = {
        "image_features": F.normalize(out["image_features"], dim=-1),
        "text_features": texts[: text.shape[0]],
        "logit_scale": model.logit_scale.exp(),
        "region_features": _scatter_rows(F.normalize(pooled, dim=-1), index, rows),
        "region_text_features": _scatter_rows(texts[text.shape[0] : text.shape[0] + n_valid], index, rows),
        "region_valid": flat_valid,
    }
    if hard_negative_text is not None:
        first = text.shape[0] + n_valid
        result["hard_negative_text_features"] = _scatter_rows(texts[first:], hn_index, flat_hn_valid.shape[0])
        result["hard_negative_valid"] = flat_hn_valid
    if getattr(model, "logit_bias", None) is not None:
        result["logit_bias"] = model.logit_bias
    return result
