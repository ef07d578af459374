"""DDP with 2 real processes on gloo: ranks agree, equal the single-process full batch, rank 0 writes.

Activation statistics are pooled over the ranks' batches; the guard's skip decision is the same on all ranks.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
from ranks import free_port, spawn
from torch import nn

import gradguard

ACT_METRICS = ("act_mean", "act_std", "act_saturated", "act_dead")

pytestmark = pytest.mark.slow
WORLD = 2
STEPS = 4


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 200), nn.ReLU(), nn.Linear(200, 64), nn.Tanh(), nn.Linear(64, 10))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 256, generator=g), torch.randint(0, 10, (32,), generator=g)


def _train(model, x, y, store, opt_model=None):
    opt = torch.optim.SGD((opt_model or model).parameters(), lr=0.05)
    with gradguard.watch(model, optimizer=opt, store=store, activations_every=1, weights_every=1) as w:
        for _ in range(STEPS):
            opt.zero_grad()
            # mean over the local batch; DDP averages across ranks = mean over the full batch
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            w.step(loss=loss)
            opt.step()
    return w


def _worker(rank: int, folder: str) -> None:
    x, y = _data()
    shard = slice(rank * 16, (rank + 1) * 16)
    ddp = nn.parallel.DistributedDataParallel(_model())
    w = _train(ddp, x[shard], y[shard], os.path.join(folder, f"rank{rank}.db"))
    assert w._grads is None  # closed
    for name in ("grad_norm", *ACT_METRICS):
        values = torch.from_numpy(w.trace.metric(name))
        gathered = [torch.zeros_like(values) for _ in range(WORLD)]
        dist.all_gather(gathered, values)
        if rank == 0:
            np.save(os.path.join(folder, f"{name}.npy"), torch.stack(gathered).numpy())
    if rank == 0:
        np.save(os.path.join(folder, "layers.npy"), np.array(w.layers))
    _guard(ddp, x[shard], y[shard], rank, folder)


def _guard(ddp, x, y, rank: int, folder: str) -> None:
    """A NaN loss on rank 1 only (its gradients are finite): both ranks must skip, then both step."""
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    guard = gradguard.NonFiniteGuard(opt, model=ddp)
    changed = []
    for bad in (True, False):
        before = [p.detach().clone() for p in ddp.parameters()]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(ddp(x), y)
        loss.backward()
        guard.step(loss * float("nan") if bad and rank == 1 else loss)
        changed.append(any(not torch.equal(p, b) for p, b in zip(ddp.parameters(), before)))
    np.save(os.path.join(folder, f"guard{rank}.npy"), np.array([guard.skipped, *changed]))


def test_ddp_two_processes(tmp_path):
    spawn(_worker, str(tmp_path), world=WORLD)
    gathered = np.load(tmp_path / "grad_norm.npy")
    assert list(np.load(tmp_path / "layers.npy")) == ["0", "2", "4"]  # no "module." prefix
    np.testing.assert_array_equal(gathered[0], gathered[1])  # all ranks agree exactly
    # equal to one process on the full batch
    x, y = _data()
    single = _train(_model(), x, y, store=None)
    np.testing.assert_allclose(gathered[0], single.trace.metric("grad_norm"), rtol=1e-5)
    # activation statistics: those of the full batch, on every rank (each rank saw half of it);
    # measured in float32, so a mean near 0 agrees to fp32 rounding of the elements' size (atol)
    for name in ACT_METRICS:
        acts = np.load(tmp_path / f"{name}.npy")
        np.testing.assert_array_equal(acts[0], acts[1], err_msg=name)
        want = single.trace.metric(name)
        assert not np.isnan(want).all(), name
        np.testing.assert_allclose(acts[0], want, rtol=1e-6, atol=1e-7, err_msg=name)
    # the guard: a NaN loss on rank 1 alone made both ranks skip (no divergence); the clean step stepped
    for rank in range(WORLD):
        assert np.load(tmp_path / f"guard{rank}.npy").tolist() == [1, 0, 1]
    # only rank 0 wrote a store
    assert (tmp_path / "rank0.db").exists() and not (tmp_path / "rank1.db").exists()
    stored = gradguard.load(tmp_path / "rank0.db")
    np.testing.assert_allclose(stored.metric("grad_norm"), gathered[0], rtol=0)


def test_torchrun_example(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "ddp_torchrun.py"
    store = tmp_path / "run.db"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(script), "--store", str(store), "--steps", "60"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("60 steps recorded") == 1  # rank 0 alone prints
    assert "vanishing_gradient" in done.stdout
    assert len(gradguard.load(store)) == 60
