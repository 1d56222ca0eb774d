"""Logit-scale initialisation that respects pretrained checkpoints.

CLIP starts from scratch at ln(1/0.07) = 2.6592 and learns up to the clamp ln(100) = 4.6052, where
pretrained CLIPs end. A fine-tune must keep the checkpoint's value: resetting it to 2.6592 (or forcing
4.6052 onto a model trained elsewhere) changes the softmax temperature of every logit at step 0.
"""

from __future__ import annotations

import logging
import math

import torch

__all__ = ["FROM_SCRATCH", "MAX_LOGIT_SCALE", "init_logit_scale"]

FROM_SCRATCH = math.log(1 / 0.07)  # 2.6592
MAX_LOGIT_SCALE = math.log(100)  # 4.6052, open_clip's clamp


def init_logit_scale(model: torch.nn.Module, value: float | None, pretrained: str | None) -> float | None:
    """Set ``model.logit_scale`` (log space); returns the value set, or None when the checkpoint's is kept.

    ``value`` None means "not given on the command line": a model from scratch gets 2.6592, a pretrained
    model keeps its own. An explicit value is applied in both cases (with a log line when it overrides).
    """
    if value is not None and not (0.0 <= value <= MAX_LOGIT_SCALE):
        raise ValueError(
            f"--logit-scale-init must lie in [0, ln(100) = {MAX_LOGIT_SCALE:.4f}] (log space), got {value}"
        )
    if not hasattr(model, "logit_scale"):
        raise ValueError(f"{type(model).__name__} has no logit_scale to initialise")
    if value is None:
        if pretrained:
            logging.info("logit scale: keeping the pretrained value %.4f", model.logit_scale.item())
            return None
        value = FROM_SCRATCH
    elif pretrained:
        logging.info(
            "logit scale: --logit-scale-init %.4f overrides the pretrained value %.4f",
            value,
            model.logit_scale.item(),
        )
    with torch.no_grad():
        model.logit_scale.fill_(value)
    return value
