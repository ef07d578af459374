"""Every clipper, and the guard with an optimizer that can skip on the device, never reads a value back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradguard.remedy.clip import AutoClip, ZScoreClip, adaptive_clip_grad_, clip_grad_norm_, clip_grad_value_
from gradguard.remedy.guard import NonFiniteGuard

_AUTO, _ZSCORE = AutoClip(10, history=16), ZScoreClip(warmup=2)  # stateful: one each across steps
def _step(model):
    model.zero_grad()
    model(torch.randn(16, 8)).square().mean().backward()


@pytest.mark.parametrize(
    "clip",
    [
        lambda m: clip_grad_norm_(m.parameters(), 0.1),
        lambda m: clip_grad_value_(m.parameters(), 0.01),
        lambda m: adaptive_clip_grad_(m.parameters()),
        lambda m, c=_AUTO: c(m.parameters()),
        lambda m, c=_ZSCORE: c(m.parameters()),
    ],
    ids=["norm", "value", "agc", "autoclip", "zscore"],
)
def test_clippers_do_not_synchronise(count_reads, clip):
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    for _ in range(4):
        _step(model)
        before = dict(count_reads)
        clip(model)
        assert count_reads == before


def test_guard_with_a_fused_optimizer_does_not_synchronise(count_reads):
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    guard = NonFiniteGuard(opt, model=model)
    for _ in range(5):
        _step(model)
        before = dict(count_reads)
        guard.step(model(torch.randn(2, 8)).sum())
        assert count_reads == before
    assert guard.skipped == 0  # reading the events back is where it synchronises, once
