"""Composed-image-retrieval recall, computed from target ranks without sorting the gallery.

The rank of the target is the number of gallery items scored strictly above it (ties count in the
query's favour), so a query costs one pass over its similarity row instead of a full argsort; with
chunking over queries, memory stays at chunk x N even for a 100k-image gallery.

CIRR (Liu et al., ICCV 2021) removes the reference image from the ranking; its subset recall ranks only
the other members of the query's ``img_set``; the headline is (R@5 + R_s@1) / 2. FashionIQ (Wu et al.,
CVPR 2021) reports R@10 and R@50 per category and their mean. Values are percentages, as SPRC prints them.
"""

from __future__ import annotations

import torch

__all__ = [
    "CIRR_KS",
    "CIRR_SUBSET_KS",
    "FASHIONIQ_KS",
    "cirr_metrics",
    "fashioniq_metrics",
    "subset_ranks",
    "target_ranks",
]

CIRR_KS = (1, 5, 10, 50)
CIRR_SUBSET_KS = (1, 2, 3)
FASHIONIQ_KS = (10, 50)


def _check(sim: torch.Tensor, index: torch.Tensor, name: str) -> None:
    if sim.dim() != 2:
        raise ValueError(f"similarity must be (queries, gallery), got shape {tuple(sim.shape)}")
    if index.shape != (sim.size(0),):
        raise ValueError(
            f"{name} must hold one gallery index per query ({sim.size(0)}), got {tuple(index.shape)}"
        )
    if index.numel() and (index.min() < 0 or index.max() >= sim.size(1)):
        raise ValueError(f"{name} has gallery indices outside [0, {sim.size(1)})")


def target_ranks(
    sim: torch.Tensor, target: torch.Tensor, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """0-based rank of each query's target in its similarity row, optionally ignoring one item per query."""
    _check(sim, target, "target")
    target_score = sim.gather(1, target[:, None])
    above = sim > target_score
    if exclude is not None:
        _check(sim, exclude, "exclude")
        above.scatter_(1, exclude[:, None], False)
    return above.sum(1)


def subset_ranks(
    sim: torch.Tensor, target: torch.Tensor, members: torch.Tensor, exclude: torch.Tensor
) -> torch.Tensor:
    """Rank of the target among ``members`` (queries x M gallery indices, -1 = padding), reference excluded."""
    _check(sim, target, "target")
    _check(sim, exclude, "exclude")
    if members.dim() != 2 or members.size(0) != sim.size(0):
        raise ValueError(f"members must be (queries, M) gallery indices, got {tuple(members.shape)}")
    valid = (members >= 0) & (members != exclude[:, None])
    scores = sim.gather(1, members.clamp_min(0))
    target_score = sim.gather(1, target[:, None])
    return ((scores > target_score) & valid).sum(1)


def _recall(ranks: torch.Tensor, k: int) -> float:
    return 100.0 * (ranks < k).float().mean().item()


def cirr_metrics(ranks: torch.Tensor, ranks_subset: torch.Tensor) -> dict[str, float]:
    metrics = {f"recall_at_{k}": _recall(ranks, k) for k in CIRR_KS}
    metrics.update({f"recall_subset_at_{k}": _recall(ranks_subset, k) for k in CIRR_SUBSET_KS})
    metrics["r_mean"] = (metrics["recall_at_5"] + metrics["recall_subset_at_1"]) / 2
    metrics["agg_metrics"] = metrics["r_mean"]
    return metrics


def fashioniq_metrics(ranks_by_category: dict[str, torch.Tensor]) -> dict[str, float]:
    if not ranks_by_category:
        raise ValueError("fashioniq_metrics needs at least one category (dress, shirt, toptee)")
    metrics: dict[str, float] = {}
    for category, ranks in ranks_by_category.items():
        for k in FASHIONIQ_KS:
            metrics[f"{category}_recall_at_{k}"] = _recall(ranks, k)
    for k in FASHIONIQ_KS:
        metrics[f"average_recall_at_{k}"] = sum(
            metrics[f"{c}_recall_at_{k}"] for c in ranks_by_category
        ) / len(ranks_by_category)
    metrics["agg_metrics"] = (metrics["average_recall_at_10"] + metrics["average_recall_at_50"]) / 2
    return metrics
