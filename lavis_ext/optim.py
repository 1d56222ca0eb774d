"""The one-cycle learning-rate schedule SPRC trains with, as a LAVIS ``lr_sched`` (``one_cycle_lr``).

SPRC (``src/blip_fine_tune_2.py``) steps ``torch.optim.lr_scheduler.OneCycleLR`` once per batch: CIRR with
``pct_start=1/50`` over an 80-epoch cycle while training 50 epochs, FashionIQ with ``pct_start=1.5/epochs`` and
``div_factor=100``. OneCycleLR also cycles AdamW's beta1 between 0.95 and 0.85 (``cycle_momentum`` is on by
default), so SPRC's effective beta1 is not the 0.9 it passes. LAVIS's runner builds schedulers that only know
epochs and call ``step(cur_epoch, cur_step)`` before each batch, so this class computes torch's curve from the
position ``cur_epoch * iters_per_epoch + cur_step``; the task tells it ``iters_per_epoch`` when an epoch
starts (:meth:`start_epoch`). Being a function of the position, it resumes exactly.

Run keys (defaults are torch's): ``init_lr`` is the peak (``max_lr``); ``one_cycle_pct_start`` (0.3),
``one_cycle_div_factor`` (25), ``one_cycle_final_div_factor`` (1e4), ``one_cycle_epochs`` (cycle length,
default ``max_epoch``), ``one_cycle_momentum`` (True). ``min_lr`` and the warmup keys are not used.
"""

from __future__ import annotations

import math

from lavis.common.registry import registry

__all__ = ["OneCycleLRScheduler", "one_cycle_lr", "one_cycle_momentum"]

_BASE_MOMENTUM, _MAX_MOMENTUM = 0.85, 0.95  # torch's defaults


def _cos(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def _phase_pct(step: int, total_steps: int, pct_start: float) -> tuple[int, float]:
    """(phase, fraction of the phase done) for torch's two-phase cycle with phase ends at pct*total - 1."""
    if not 0 <= step < total_steps:
        raise ValueError(f"one-cycle step {step} is outside the cycle of {total_steps} steps")
    warm_end = float(pct_start * total_steps) - 1
    if step <= warm_end:
        return 0, step / warm_end
    return 1, (step - warm_end) / (total_steps - 1 - warm_end)


def one_cycle_lr(
    step: int, total_steps: int, max_lr: float, pct_start=0.3, div_factor=25.0, final_div_factor=1e4
) -> float:
    """Learning rate at ``step`` (0-based) of torch's OneCycleLR with cosine annealing."""
    initial = max_lr / div_factor
    phase, pct = _phase_pct(step, total_steps, pct_start)
    return _cos(initial, max_lr, pct) if phase == 0 else _cos(max_lr, initial / final_div_factor, pct)


def one_cycle_momentum(step: int, total_steps: int, pct_start=0.3) -> float:
    """beta1 at ``step``: torch's momentum cycle, max -> base while the lr rises, back while it falls."""
    phase, pct = _phase_pct(step, total_steps, pct_start)
    return (
        _cos(_MAX_MOMENTUM, _BASE_MOMENTUM, pct) if phase == 0 else _cos(_BASE_MOMENTUM, _MAX_MOMENTUM, pct)
    )


@registry.register_lr_scheduler("one_cycle_lr")
class OneCycleLRScheduler:
    """LAVIS scheduler interface (``step(cur_epoch, cur_step)``) over torch's OneCycleLR curve."""

    def __init__(self, optimizer, max_epoch, init_lr, **kwargs):
        if not init_lr or init_lr <= 0:
            raise ValueError(f"one_cycle_lr needs run.init_lr > 0 (the peak learning rate), got {init_lr!r}")
        self.optimizer = optimizer
        self.max_epoch = int(max_epoch)
        self.max_lr = float(init_lr)
        self.pct_start, self.div_factor, self.final_div_factor = 0.3, 25.0, 1e4
        self.cycle_epochs = self.max_epoch
        self.cycle_momentum = True
        self.iters_per_epoch: int | None = None

    def configure(self, run_cfg) -> None:
        """Read the ``one_cycle_*`` run keys (the task passes its run config)."""
        self.pct_start = float(run_cfg.get("one_cycle_pct_start", 0.3))
        self.div_factor = float(run_cfg.get("one_cycle_div_factor", 25.0))
        self.final_div_factor = float(run_cfg.get("one_cycle_final_div_factor", 1e4))
        self.cycle_epochs = int(run_cfg.get("one_cycle_epochs", self.max_epoch))
        self.cycle_momentum = bool(run_cfg.get("one_cycle_momentum", True))
        if not 0 < self.pct_start < 1:
            raise ValueError(f"run.one_cycle_pct_start must be in (0, 1), got {self.pct_start}")
        if self.cycle_epochs < self.max_epoch:
            raise ValueError(
                f"run.one_cycle_epochs ({self.cycle_epochs}) must be >= run.max_epoch ({self.max_epoch}): the "
                "cycle cannot end before training does (SPRC's CIRR recipe: 80-epoch cycle, 50 epochs trained)"
            )
        if self.cycle_momentum and any("betas" not in g for g in self.optimizer.param_groups):
            raise ValueError("run.one_cycle_momentum needs an optimizer with betas (AdamW)")

    def start_epoch(self, iters_per_epoch: int, run_cfg=None) -> None:
        if run_cfg is not None:
            self.configure(run_cfg)
        if iters_per_epoch <= 0:
            raise ValueError(f"one_cycle_lr: an epoch of {iters_per_epoch} iterations")
        self.iters_per_epoch = int(iters_per_epoch)

    @property
    def total_steps(self) -> int:
        return self.cycle_epochs * self.iters_per_epoch

    def step(self, cur_epoch: int, cur_step: int) -> None:
        if self.iters_per_epoch is None:
            raise RuntimeError(
                "one_cycle_lr does not know the epoch length: it works with run.task composed_image_retrieval, "
                "whose train_epoch reports it"
            )
        position = cur_epoch * self.iters_per_epoch + cur_step
        lr = one_cycle_lr(
            position, self.total_steps, self.max_lr, self.pct_start, self.div_factor, self.final_div_factor
        )
        momentum = (
            one_cycle_momentum(position, self.total_steps, self.pct_start) if self.cycle_momentum else None
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if momentum is not None:
                group["betas"] = (momentum, *group["betas"][1:])
