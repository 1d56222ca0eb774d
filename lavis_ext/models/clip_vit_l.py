"""CLIP ViT-L/14 for BLIP-2 at a chosen depth, and the depth a checkpoint holds.

CLIP ViT-L has 24 residual blocks; BLIP-2 drops the last one and reads the penultimate output. LAVIS 1.0.2's
``create_clip_vit_L`` passes ``layers=22`` to a ``VisionTransformer`` that builds ``layers - 1`` blocks, so it
keeps 21 (LAVIS issues #216 and #609: the BLIP-2 ``pretrain_vitL`` models hold 21 blocks, while
``clip_vit_L.pth`` holds 23 and LAVIS drops two of them with a non-strict load). SPRC's vendored LAVIS builds 23,
the paper's count, and its ViT-L releases hold ``visual_encoder.transformer.resblocks.0-22``. The depth is
therefore the config key ``vit_depth`` (23 by default for ``pretrain_vitL``, 21 for LAVIS's own BLIP-2 ViT-L),
and a checkpoint of another depth is refused by :func:`check_vit_depth` instead of losing or inventing blocks.
"""

from __future__ import annotations

import logging
import re

from torch import nn

__all__ = ["CLIP_VIT_L_WEIGHTS", "SPRC_VIT_L_DEPTH", "LAVIS_VIT_L_DEPTH", "build_clip_vit_l", "vit_depth_of"]

logger = logging.getLogger(__name__)

CLIP_VIT_L_WEIGHTS = (
    "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/clip_vit_L.pth"
)
SPRC_VIT_L_DEPTH = 23
LAVIS_VIT_L_DEPTH = 21
_BLOCK = re.compile(r"^(?:transformer\.resblocks|blocks)\.(\d+)\.")


def vit_depth_of(state_dict, prefix: str = "") -> int | None:
    """Number of ViT blocks in ``state_dict`` (CLIP ``transformer.resblocks.N`` or EVA ``blocks.N`` under
    ``prefix``), or None when it holds no ViT blocks."""
    indices = set()
    for key in state_dict:
        if key.startswith(prefix):
            match = _BLOCK.match(key[len(prefix) :])
            if match:
                indices.add(int(match.group(1)))
    return max(indices) + 1 if indices else None


def build_clip_vit_l(
    img_size: int,
    depth: int,
    use_grad_checkpoint: bool = False,
    precision: str = "fp16",
    weights: str | None = CLIP_VIT_L_WEIGHTS,
) -> nn.Module:
    """LAVIS's CLIP ViT-L with ``depth`` residual blocks, loaded from ``weights`` (None: random init)."""
    from lavis.models.clip_vit import VisionTransformer, convert_weights_to_fp16, interpolate_pos_embed

    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= 23:
        raise ValueError(
            f"vit_depth must be an int in [1, 23] for clip_L (CLIP ViT-L has 24 blocks, BLIP-2 drops the last), "
            f"got {depth!r}; SPRC uses {SPRC_VIT_L_DEPTH}, LAVIS's BLIP-2 pretrain_vitL {LAVIS_VIT_L_DEPTH}"
        )
    # LAVIS's VisionTransformer builds ``layers - 1`` blocks.
    model = VisionTransformer(
        input_resolution=img_size,
        patch_size=14,
        width=1024,
        layers=depth + 1,
        heads=16,
        use_grad_checkpointing=use_grad_checkpoint,
    )
    if weights is not None:
        from lavis_ext.models.checkpoint_io import read_state_dict

        state_dict, meta = read_state_dict(weights)
        in_file = vit_depth_of(state_dict)
        if in_file is None or in_file < depth:
            raise ValueError(
                f"ViT-L weights {meta['path']} hold {in_file or 0} blocks, fewer than vit_depth={depth}"
            )
        interpolate_pos_embed(model, state_dict)
        result = model.load_state_dict(state_dict, strict=False)
        if result.missing_keys:
            raise ValueError(f"ViT-L weights {meta['path']} lack {result.missing_keys[:8]}")
        if in_file > depth:
            logger.info(
                "clip_L: using %d of the %d blocks in %s (vit_depth=%d)", depth, in_file, meta["path"], depth
            )
    if precision == "fp16":
        convert_weights_to_fp16(model)
    return model
