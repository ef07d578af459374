"""Process-wide numeric settings that long CPU runs need, applied for a block and then put back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def denormals_flushed() -> bool:
    """Whether the CPU currently flushes subnormal numbers to zero (torch has no getter: test one)."""
    tiny = torch.tensor([1e-310], dtype=torch.float64)
    return bool((tiny * 1.0).item() == 0.0)


@contextmanager
def flush_denormals() -> Iterator[None]:
    """Flush subnormal floats to zero inside the block, then restore the previous setting.

    Vanishing signals and gradients are subnormal numbers, which x86 CPUs handle tens of
    times slower than normal ones; flushing them to zero changes values below 1e-308
    (float64) / 1e-38 (float32) only.
    """
    before = denormals_flushed()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)
