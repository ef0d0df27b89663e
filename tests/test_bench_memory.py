"""The benchmarks' memory measurement (peak live heap bytes) against allocations of known size."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_hessian  # noqa: E402

MiB = 2**20

pytestmark = pytest.mark.skipif(bench_hessian._LIVE is None, reason="glibc mallinfo2 is not available here")


def test_peak_counts_live_tensors_and_not_freed_ones():
    def two_in_turn():               # 64 MiB, freed, then 64 MiB again: the peak is one of them
        for _ in range(2):
            a = torch.ones(16 * MiB)      # 64 MiB of float32
            del a

    def two_at_once():
        a = torch.ones(16 * MiB)
        b = torch.ones(16 * MiB)
        return a, b

    one = bench_hessian.peak_memory(two_in_turn)
    both = bench_hessian.peak_memory(lambda: two_at_once() and None)
    assert 64 * MiB <= one < 66 * MiB
    assert 128 * MiB <= both < 131 * MiB


def test_peak_sees_the_buffers_of_a_backward_pass():
    """A 32 MiB intermediate that lives only inside autograd's backward pass is counted."""
    x = torch.ones(8 * MiB, requires_grad=True)        # 32 MiB, allocated before: not counted

    def backward():
        (x.exp() * 2).sum().backward()   # exp's result is saved; the grads are 32 MiB each
        x.grad = None

    peak = bench_hessian.peak_memory(backward)
    assert 64 * MiB <= peak < 140 * MiB
