"""``--logit-scale-init``: an explicit logit-scale override, and nothing when not given.

open_clip already initialises the scale right for each case: CLIP from scratch at ln(1/0.07) = 2.6592,
SigLIP at ln 10 with bias -10 (``--siglip``), a model config's own ``init_logit_scale``, and a
``--pretrained`` checkpoint's learnt value (pretrained CLIPs end at the clamp ln(100) = 4.6052). Forcing one
value on all of them changes the softmax temperature of every logit at step 0, so the flag only applies when
given.
"""

from __future__ import annotations

import logging
import math

import torch

__all__ = ["FROM_SCRATCH", "MAX_LOGIT_SCALE", "init_logit_scale"]

logger = logging.getLogger(__name__)

FROM_SCRATCH = math.log(1 / 0.07)  # 2.6592
MAX_LOGIT_SCALE = math.log(100)  # 4.6052, open_clip's clamp


def init_logit_scale(model: torch.nn.Module, value: float | None, pretrained: str | None) -> float | None:
    """Set ``model.logit_scale`` (log space) to ``value``; returns the value set, or None when ``value`` is
    None ("not given on the command line"), which leaves open_clip's own init or the checkpoint's value.
    An explicit value overrides either, with a log line naming what it replaced.
    """
    if value is not None and not (0.0 <= value <= MAX_LOGIT_SCALE):
        raise ValueError(
            f"--logit-scale-init must lie in [0, ln(100) = {MAX_LOGIT_SCALE:.4f}] (log space), got {value}"
        )
    if not hasattr(model, "logit_scale"):
        raise ValueError(f"{type(model).__name__} has no logit_scale to initialise")
    if value is None:
        logger.info(
            "logit scale: keeping the %s value %.4f",
            "pretrained" if pretrained else "model's initial",
            model.logit_scale.item(),
        )
        return None
    logger.info(
        "logit scale: --logit-scale-init %.4f overrides the %s value %.4f",
        value,
        "pretrained" if pretrained else "model's initial",
        model.logit_scale.item(),
    )
    with torch.no_grad():
        model.logit_scale.fill_(value)
    return value
