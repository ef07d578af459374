"""Under DDP with 2 real processes (gloo), every clipper gives the same total norm and factor on each rank."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
from ranks import spawn
from torch import nn

from gradguard.remedy.clip import AutoClip, ZScoreClip, clip_grad_norm_

pytestmark = pytest.mark.slow
WORLD = 2


def _worker(rank: int, folder: str) -> None:
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 2)))
    auto, zscore = AutoClip(25), ZScoreClip(warmup=2)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    rows = []
    for _ in range(6):
        model.zero_grad()
        model(torch.randn(16, 8, generator=g)).square().mean().backward()
        norm = clip_grad_norm_(model.parameters(), 0.3)
        a, z = auto(model.parameters()), zscore(model.parameters())
        rows.append([float(norm), float(a.total_norm), float(a.clip_coef), float(z.total_norm), float(z.clip_coef)])
    mine = torch.tensor(rows, dtype=torch.float64)
    gathered = [torch.zeros_like(mine) for _ in range(WORLD)]
    dist.all_gather(gathered, mine)
    if rank == 0:
        np.save(os.path.join(folder, "clip.npy"), torch.stack(gathered).numpy())


def test_clippers_agree_across_ranks(tmp_path):
    spawn(_worker, str(tmp_path), world=WORLD)
    gathered = np.load(tmp_path / "clip.npy")
    np.testing.assert_array_equal(gathered[0], gathered[1])
    assert (gathered[0][:, 2] < 1).any()  # something was clipped
