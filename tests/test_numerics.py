"""flush_denormals flushes subnormal numbers inside its block and leaves the process as it found it."""

from __future__ import annotations

import torch

from gradguard.numerics import denormals_flushed, flush_denormals


def test_flushes_inside_and_restores_after():
    assert not denormals_flushed()  # the default of a fresh process
    tiny = torch.tensor([1e-310], dtype=torch.float64)
    with flush_denormals():
        assert denormals_flushed()
        assert (tiny * 1.0).item() == 0.0
    assert not denormals_flushed()
    assert (tiny * 1.0).item() == 1e-310


def test_restores_after_an_exception_and_keeps_an_outer_setting():
    try:
        with flush_denormals():
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert not denormals_flushed()
    torch.set_flush_denormal(True)
    try:
        with flush_denormals():
            pass
        assert denormals_flushed()  # it was on before the block: it stays on
    finally:
        torch.set_flush_denormal(False)
