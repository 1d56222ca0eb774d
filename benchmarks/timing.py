"""Interleaved medians: how every benchmark here times its variants on a shared machine."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def seconds(fn: Callable[[], object]) -> float:
    """Wall seconds of one call of ``fn``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_medians(variants: dict, repeats: int, measure: Callable = seconds) -> dict:
    """The median of ``measure(variant)`` for each variant, measured in turn (A, B, A, B, ...) so that load
    drifting on a shared machine hits every variant alike, after one warm-up measurement each.

    ``measure`` defaults to the seconds one call of the variant takes; pass another (a loader's samples per
    second over one epoch, say) to take the median of that instead.
    """
    for variant in variants.values():
        measure(variant)
    values = {name: [] for name in variants}
    for _ in range(repeats):
        for name, variant in variants.items():
            values[name].append(measure(variant))
    return {name: statistics.median(v) for name, v in values.items()}
