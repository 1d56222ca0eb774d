"""Runtime diagnostics (``--diag``): the checks of the training notes' ENABLE_RUNTIME_DIAG, as scalars.

A collapsing run shows up here first: a logit scale pinned at the clamp, logits saturating, a bank that
never switches on, or image features of zero norm (a dead tower or NaN-guarded normalisation).
"""

from __future__ import annotations

import torch

__all__ = ["collect"]


@torch.no_grad()
def collect(model: torch.nn.Module, loss, bank=None) -> dict[str, float]:
    stats: dict[str, float] = {}
    if hasattr(model, "logit_scale"):
        stats["logit_scale"] = model.logit_scale.exp().item()
    region_scale = getattr(getattr(model, "clip_ext_region", None), "logit_scale", None)
    if region_scale is not None:
        stats["region_logit_scale"] = region_scale.exp().item()
    logits = getattr(loss, "last_logits", None)
    if logits is not None:
        per_image = logits[0].float()
        finite = per_image[torch.isfinite(per_image)]
        stats.update(
            logits_min=finite.min().item(), logits_max=finite.max().item(), logits_mean=finite.mean().item()
        )
    pending = getattr(loss, "pending", None) or getattr(loss, "last_batch", None)
    if pending is not None:
        norms = pending[0].float().norm(dim=-1)
        stats["zero_norm_image_share"] = (norms < 1e-6).float().mean().item()
    if bank is not None:
        stats.update(
            bank_ptr=int(bank.ptr), bank_filled=int(bank.filled), bank_enabled=float(bool(bank.enabled))
        )
    return stats
