"""Scheduled sampling: how strongly the grounding acts at each denoising step.

GLIGEN (Li et al., CVPR 2023, Sec. 3.3) turns the gated layers off for the later steps: the layout is
decided early, and the last steps then refine details with the original model alone, which keeps image
quality close to the base model's. Two published forms are supported:

- GLIGEN's ``[a, b, c]`` (fractions of the steps, summing to 1): scale 1 for the first ``int(a*T)`` steps,
  a linear decay over the next ``int(b*T)`` steps (``(s-1)/s, ..., 1/s, 0`` for ``s`` decay steps, as in
  the official sampler) and 0 for the rest;
- diffusers' ``beta`` (``gligen_scheduled_sampling_beta`` of the deprecated GLIGEN pipeline): scale 1 for
  the first ``int(beta*T)`` steps and 0 after, which is ``[beta, 0, 1 - beta]``.

The runtime ``gate_scale`` multiplies the schedule, so ``gate_scale=2, beta=0.3`` means 2 then 0.

Default. ``GLIGEN_BETA = 0.3`` is the default of diffusers' GLIGEN pipeline
(``gligen_scheduled_sampling_beta``), and GLIGEN's box-text example ``[0.3, 0.0, 0.7]`` is the same
schedule: grounding on for the first 30 % of the steps, off after. ``generation.generate`` uses it
unless told otherwise; ``schedule=None`` (or ``beta=1.0``) keeps the grounding on for every step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["GLIGEN_BETA", "grounding_schedule"]

GLIGEN_BETA = 0.3


def _check_fraction(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"scheduled sampling: {name} must be a fraction of the steps in [0, 1], got {value}")
    return value


def grounding_schedule(
    num_steps: int, abc: Sequence[float] | None = None, beta: float | None = None
) -> list[float]:
    """Per-step multipliers of the gates for ``num_steps`` denoising steps (all 1.0 when neither form is
    given). Give at most one of ``abc`` and ``beta``."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"scheduled sampling: num_steps must be a positive int, got {num_steps!r}")
    if abc is not None and beta is not None:
        raise ValueError(
            f"scheduled sampling: give either GLIGEN's abc={list(abc)} or diffusers' beta={beta}, not both "
            f"(beta is the same as abc=[beta, 0, 1 - beta])"
        )
    if beta is not None:
        on = int(_check_fraction("beta", beta) * num_steps)
        return [1.0] * on + [0.0] * (num_steps - on)
    if abc is None:
        return [1.0] * num_steps
    abc = list(abc)
    if len(abc) != 3:
        raise ValueError(f"scheduled sampling: abc must be three fractions [a, b, c], got {abc}")
    a, b, c = (_check_fraction(n, v) for n, v in zip("abc", abc, strict=True))
    if abs(a + b + c - 1.0) > 1e-6:
        raise ValueError(
            f"scheduled sampling: abc={abc} must sum to 1 (full scale, linear decay, off), sums to {a + b + c}"
        )
    full, decay = int(a * num_steps), int(b * num_steps)
    ramp = [(decay - 1 - k) / decay for k in range(decay)]
    return [1.0] * full + ramp + [0.0] * (num_steps - full - decay)
