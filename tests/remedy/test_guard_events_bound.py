"""NonFiniteGuard keeps its last max_events events and counts them all: memory stays bounded on a long run."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradguard.remedy.guard import NonFiniteGuard


@pytest.mark.parametrize("fused", [False, True])  # one read per step, and flags read back in batches
def test_events_keep_the_last_max_events_and_counts_stay_exact(fused):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, fused=fused or None)
    guard = NonFiniteGuard(opt, model=model, max_events=3)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    bad = [1, 4, 5, 9, 12, 17]
    for step in range(20):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        if step in bad:
            loss = loss * math.nan
        loss.backward()
        guard.step(loss)
    assert [e.step for e in guard.events] == bad[-3:]
    assert guard.skipped == guard.events_total == len(bad)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_max_events_must_be_positive():
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="max_events must be a positive integer"):
        NonFiniteGuard(opt, max_events=0)
