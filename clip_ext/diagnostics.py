"""Runtime diagnostics (``--diag``): the checks of the training notes' ENABLE_RUNTIME_DIAG, as scalars.

A collapsing run shows up here first: a logit scale pinned at the clamp, logits saturating, a bank that
never switches on, or image features of zero norm (a dead tower or NaN-guarded normalisation). The region
and hard-negative losses (unweighted) and their temperatures say whether the fine-grained terms learn; the
bank's share of the softmax mass (``bank_mass_image_to_text``: mean over rows of the probability on bank
columns) says whether the bank's negatives matter at all: near 0 they add nothing, near 1 they dominate.
"""

from __future__ import annotations

import torch

__all__ = ["collect"]


@torch.no_grad()
def collect(model: torch.nn.Module, loss, bank=None) -> dict[str, float]:
    stats: dict[str, float] = {}
    if hasattr(model, "logit_scale"):
        stats["logit_scale"] = model.logit_scale.exp().item()
    head = getattr(model, "clip_ext_region", None)
    if head is not None:
        stats["region_logit_scale"] = head.logit_scale.exp().item()
        if getattr(head, "hard_negative_logit_scale", None) is not None:
            stats["hard_negative_logit_scale"] = head.hard_negative_logit_scale.exp().item()
    for name in ("region_loss", "hard_negative_loss"):
        value = getattr(loss, f"last_{name}", None)
        if value is not None:
            stats[name] = float(value)
    mass = getattr(loss, "last_bank_mass", None)
    if mass is not None:
        stats["bank_mass_image_to_text"], stats["bank_mass_text_to_image"] = float(mass[0]), float(mass[1])
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
