"""Peak memory of one call, on CPU or CUDA, measured in-process.

CUDA: ``torch.cuda.max_memory_allocated`` over the call, minus what was allocated before it.

CPU: torch allocates CPU tensors with the C heap, so the bytes in use by ``malloc`` (glibc ``mallinfo2``:
``uordblks`` in arenas plus ``hblkhd`` in mmapped blocks, which is where large tensors go) are the live tensor
memory plus the rest of the process. A ``TorchDispatchMode`` samples that figure after every aten op and keeps
the maximum; the peak rise over the value before the call is the call's peak memory at op granularity
(scratch freed inside a single op is not seen). Resident-set figures (ru_maxrss, VmHWM) are not used: the
allocator keeps freed pages, so they vary by +-15% from run to run and hide the peak behind model building.
The first call under the mode allocates the dispatcher's own tables, so ``peak_bytes`` runs ``fn`` once
under the mode before measuring.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["peak_bytes"]


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split())
    ]


_libc = None


def _heap_in_use() -> int:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        if not hasattr(libc, "mallinfo2"):
            raise RuntimeError("CPU peak memory needs glibc >= 2.33 (mallinfo2); measure on CUDA instead")
        libc.mallinfo2.restype = _MallInfo2
        _libc = libc
    info = _libc.mallinfo2()
    return info.uordblks + info.hblkhd


class _HeapPeak(TorchDispatchMode):
    def __enter__(self):
        self.base = _heap_in_use()
        self.peak = self.base
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, _heap_in_use())
        return out


def peak_bytes(fn: Callable[[], object], device: str = "cpu") -> int:
    """Bytes by which memory in use rises at the peak of ``fn()`` (its result is dropped before returning)."""
    if str(device).startswith("cuda"):
        fn()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with _HeapPeak():
        fn()
    with _HeapPeak() as mode:
        fn()
    return mode.peak - mode.base
