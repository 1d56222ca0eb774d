"""Pinned CPU numerics: the demo's and the seeds tool's figures are the same on every x86-64 machine with AVX2.

A float sum or matrix product is computed in another order by another kernel: ATen picks its vectorised
kernels by the widest instruction set it finds (AVX-512 on the development machine, AVX2 on an AMD EPYC),
MKL and oneDNN pick their own code paths the same way, and a reduction split over two threads adds in yet
another order. The last bits differ before the first training step (issue 27: ``output_layer_norm_start``
differed in the 7th digit) and, over hundreds of steps, the recalls and IoU of the toy demo moved by several
points. Each library reads one environment variable, once, when it starts; so every process that computes a
figure gets :data:`PINNED` (and a fixed thread count) in its environment before torch is imported:

- ``ATEN_CPU_CAPABILITY=avx2``: ATen's CPU kernels (``torch.backends.cpu.get_cpu_capability()``).
- ``MKL_CBWR=AVX2``: MKL's conditional numerical reproducibility, the AVX2 code path on any newer CPU.
- ``ONEDNN_MAX_CPU_ISA=AVX2`` (and its older name ``DNNL_MAX_CPU_ISA``): oneDNN's convolutions and matmuls.
- ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``: the thread count (``--threads``, default 1).

These are the variables under which ``../shared/repro/quick_pinned_avx2.json`` was written on an AVX2-only
machine; the development machine (AVX-512) prints the same quick demo with them. A CPU without AVX2, or
another architecture (ARM), ignores the request and runs its own kernels: its figures may differ.

The price is speed on CPUs with wider vectors; ``--native-kernels`` on ``vlext.demo`` and ``vlext.seeds``
(or ``VLEXT_NATIVE_KERNELS=1`` in the environment) leaves the kernels to each library, and the run's
``summary.json`` / ``seeds.json`` then records ``"pinned": false``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

__all__ = ["NATIVE_VARIABLE", "PINNED", "numerics_record", "pin_this_process", "pinned_environment"]

PINNED = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "DNNL_MAX_CPU_ISA": "AVX2",  # the name oneDNN read before 2.x; harmless beside the new one
}
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
NATIVE_VARIABLE = "VLEXT_NATIVE_KERNELS"


def native_requested(environ: Mapping[str, str] | None = None) -> bool:
    """True when the environment asks for this machine's own kernels (``VLEXT_NATIVE_KERNELS=1``)."""
    value = (os.environ if environ is None else environ).get(NATIVE_VARIABLE, "")
    return value.strip().lower() in ("1", "true", "yes")


def pinned_environment(
    base: Mapping[str, str] | None = None, threads: int = 1, native: bool = False
) -> dict[str, str]:
    """``base`` (default ``os.environ``) with the thread count and, unless ``native``, :data:`PINNED` set.

    A pinned environment overrides what the caller had (an ``ATEN_CPU_CAPABILITY=avx512`` left in a shell
    would otherwise change the figures); a native one removes the pins, so a child does not inherit half of
    them, and carries ``VLEXT_NATIVE_KERNELS=1`` so that its own children stay native too.
    """
    env = dict(os.environ if base is None else base)
    native = native or native_requested(env)
    for name in THREAD_VARIABLES:
        env[name] = str(threads)
    if native:
        for name in PINNED:
            env.pop(name, None)
        env[NATIVE_VARIABLE] = "1"
    else:
        env.update(PINNED)
        env.pop(NATIVE_VARIABLE, None)
    return env


def pin_this_process(threads: int = 1, native: bool = False) -> dict:
    """Pin this process's numerics (:func:`pinned_environment` into ``os.environ``) before torch is imported.

    Raises:
        RuntimeError: torch is already imported, so the pins could no longer take effect; the message says
            what to do (set the variables in the shell, or import this module's caller first).
    """
    wanted = pinned_environment(os.environ, threads, native)
    if "torch" in sys.modules and any(os.environ.get(k) != v for k, v in wanted.items()):
        raise RuntimeError(
            "vlext.numerics: torch was imported before the CPU numerics were pinned, so "
            f"{sorted(k for k in wanted if os.environ.get(k) != wanted[k])} would not take effect; run the "
            "command as its own process (python -m ...) or set them in the environment first"
        )
    for name in set(os.environ) - set(wanted):
        del os.environ[name]
    os.environ.update(wanted)
    return numerics_record(os.environ)


def numerics_record(environ: Mapping[str, str] | None = None) -> dict:
    """What a results file records about the numerics it was computed with (``pinned`` and the variables)."""
    environ = os.environ if environ is None else environ
    names = (*PINNED, *THREAD_VARIABLES)
    return {
        "pinned": not native_requested(environ) and all(environ.get(k) == v for k, v in PINNED.items()),
        "environment": {name: environ[name] for name in names if name in environ},
    }
