"""benchmarks/peak_memory.py measures the live-tensor peak of a call, not the allocator's history."""

import torch

from benchmarks.peak_memory import peak_bytes

MB = 2**20


def test_cpu_peak_is_the_largest_set_of_live_tensors():
    x = torch.randn(512, 1024)  # 2 MB, allocated before the call: not counted

    def two_live_then_one():
        a = x * 2  # +2 MB
        b = a + 1  # +2 MB: peak 4 MB
        del a
        return b.sum()

    def one_at_a_time():
        for _ in range(3):
            (x * 2).sum()  # each 2 MB temporary is freed before the next

    peak_two = peak_bytes(two_live_then_one)
    peak_one = peak_bytes(one_at_a_time)
    assert 3.9 * MB < peak_two < 4.3 * MB
    assert 1.9 * MB < peak_one < 2.3 * MB
