"""What a change of world size does to the batch, the steps and the negatives, said or undone.

LAVIS reads ``run.batch_size_train`` per GPU: SPRC's recipe (one GPU, batch 128, OneCycle over the steps of
its epochs) run on 8 GPUs trains with a global batch of 1024 and one-cycle over 1/8 of the steps at the same
lr, and each GPU's contrastive loss sees 128 in-batch negatives unless ``model.gather_negatives`` is on;
nothing said so. Two ways out, each named in the log:

- ``run.batch_size_train_global: 128`` (the SPRC recipes use it): the per-GPU batch is the global batch over
  the world size, so steps per epoch, the schedule and the lr mean the same on any number of GPUs (with
  ``model.gather_negatives: True`` the negatives are the same global batch too);
- ``run.batch_size_train`` (per GPU, LAVIS's meaning): kept, and on more than one process a warning names
  the global batch, the steps per epoch and how both differ from one process.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from lavis_ext.config_check import ConfigError

__all__ = ["apply_batch_plan", "describe_batch_plan"]

logger = logging.getLogger(__name__)


def apply_batch_plan(run: DictConfig, world_size: int) -> dict:
    """Set ``run.batch_size_train`` (per GPU) from ``run.batch_size_train_global`` when given; return the plan
    ``{"per_gpu", "world_size", "global", "scaled"}``. Refuses a global batch the world size does not divide and
    a config that gives both keys (which one would win is not obvious)."""
    world_size = int(world_size)
    total = run.get("batch_size_train_global")
    if total is None:
        per_gpu = run.get("batch_size_train")
        if per_gpu is None:
            return {"per_gpu": None, "world_size": world_size, "global": None, "scaled": False}
        return {
            "per_gpu": int(per_gpu),
            "world_size": world_size,
            "global": int(per_gpu) * world_size,
            "scaled": False,
        }
    if isinstance(total, bool) or not isinstance(total, int) or total <= 0:
        raise ConfigError(f"run.batch_size_train_global must be an int > 0, got {total!r}")
    if run.get("batch_size_train") is not None:
        raise ConfigError(
            f"run.batch_size_train={run.batch_size_train} (per GPU) and run.batch_size_train_global={total} are "
            "both given; give one: the global batch (split over the processes) or the per-GPU batch"
        )
    if total % world_size:
        raise ConfigError(
            f"run.batch_size_train_global={total} does not split evenly over {world_size} processes; use a "
            f"world size that divides it, or give the per-GPU run.batch_size_train instead"
        )
    run.batch_size_train = total // world_size
    return {"per_gpu": total // world_size, "world_size": world_size, "global": total, "scaled": True}


def describe_batch_plan(
    plan: dict, steps_per_epoch: int, n_train: int, gather_negatives: bool
) -> tuple[str, bool]:
    """The log line naming per-GPU batch, world size, global batch, steps per epoch and negatives, and whether
    the run differs from what the same config does in one process (then it is logged as a warning)."""
    per_gpu, world, total = plan["per_gpu"], plan["world_size"], plan["global"]
    negatives = total if (gather_negatives and world > 1) else per_gpu
    line = (
        f"batch: {per_gpu} per GPU x world size {world} = global batch {total}; {steps_per_epoch} steps/epoch over "
        f"{n_train} training triplets; {negatives} contrastive negatives per query"
    )
    if world == 1:
        return line, False
    if plan["scaled"]:
        line += f" (run.batch_size_train_global={total}: the same global batch and steps as on one process"
        if not gather_negatives:
            line += (
                f"; but model.gather_negatives is off, so each GPU's loss sees {per_gpu} negatives, not "
                f"{total}: set model.gather_negatives=True for one process's loss"
            )
        return line + ")", not gather_negatives
    one_process = n_train // per_gpu
    line += (
        f". This differs from the recipe on one process: run.batch_size_train={per_gpu} is per GPU, so the global "
        f"batch is {world}x larger and an epoch has {steps_per_epoch} steps instead of {one_process}, at the same "
        f"lr (a one-cycle schedule runs over 1/{world} of the steps). To keep the one-process recipe set "
        f"run.batch_size_train_global={per_gpu} (and model.gather_negatives=True)"
    )
    return line, True
