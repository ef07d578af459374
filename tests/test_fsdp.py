"""FSDP2 (fully_shard) with 2 real processes on gloo: global per-layer statistics, clippers and guard.

One spawn runs every scenario (processes are the slow part); each test checks one of its results
against a single process on the full batch.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from ranks import spawn
from torch import nn

import gradguard
from gradguard.probe.layers import find_layers

pytestmark = pytest.mark.slow
WORLD = 2
STEPS = 3
METRICS = ("grad_norm", "grad_absmax", "weight_norm", "update_norm", "act_mean", "act_std", "act_saturated", "act_dead")


def _model() -> nn.Module:
    torch.manual_seed(0)
    # 9 outputs: the last layer's rows split unevenly (5 + 4) over the two ranks
    return nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 9))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 32, generator=g), torch.randint(0, 9, (16,), generator=g)


def _loss(model, x, y):
    return nn.functional.cross_entropy(model(x), y)  # mean; FSDP averages over ranks = full batch


def _train(model, x, y, store=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradguard.watch(model, optimizer=opt, store=store, weights_every=1, activations_every=1, flush_every=2) as w:
        for _ in range(STEPS):
            opt.zero_grad()
            loss = _loss(model, x, y)
            loss.backward()
            w.step(loss=loss)
            opt.step()
    return w


def _full(t: torch.Tensor) -> np.ndarray:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().numpy()


def _clip_runs(make, x, y) -> dict:
    """The clippers on one backward each: total norms and clipped gradients (whole tensors)."""
    out: dict = {}
    m = make()
    _loss(m, x, y).backward()
    out["clip_total"] = float(gradguard.clip_grad_norm_(m.parameters(), max_norm=0.05))
    out["clip_grads"] = [_full(p.grad).tolist() for p in m.parameters()]
    m = make()
    clip = gradguard.AutoClip(percentile=50)
    for _ in range(2):
        m.zero_grad()
        _loss(m, x, y).backward()
        res = clip(m.parameters())
    out["auto_total"] = float(res.total_norm)
    out["auto_grads"] = [_full(p.grad).tolist() for p in m.parameters()]
    m = make()
    _loss(m, x, y).backward()
    out["agc_fraction"] = float(gradguard.adaptive_clip_grad_(m.parameters(), clipping=0.1))
    out["agc_grads"] = [_full(p.grad).tolist() for p in m.parameters()]
    return out


def _sharded() -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer)
    fully_shard(model)
    return model


def _guard_run(rank: int, x, y) -> dict:
    """A NaN on rank 1 only (a gradient shard, then the loss): every rank must skip both steps."""
    from gradguard.probe.distributed import local

    model = _sharded()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.NonFiniteGuard(opt, model=model)
    before = [_full(p).copy() for p in model.parameters()]
    out = {}
    for kind in ("grad", "loss", None):
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        if rank == 1 and kind == "grad":
            local(model[2].weight.grad)[0, 0] = float("nan")
        if rank == 1 and kind == "loss":
            loss = loss * float("nan")
        guard.step(loss)
        changed = any(not np.array_equal(_full(p), b) for p, b in zip(model.parameters(), before))
        out[str(kind)] = {"skipped": guard.skipped, "changed": changed}
    out["events"] = [(e.step, e.kind, e.layers, e.loss_finite) for e in guard.events]
    return out


def _worker(rank: int, folder: str) -> None:
    x, y = _data()
    shard = slice(rank * 8, (rank + 1) * 8)
    model = _sharded()
    layers = find_layers(model)
    w = _train(model, x[shard], y[shard], os.path.join(folder, f"rank{rank}.db"))
    w.trace.save(os.path.join(folder, f"trace{rank}.npz"))
    result: dict = {"layers": layers.names}
    result.update(_clip_runs(_sharded, x[shard], y[shard]))
    result["guard"] = _guard_run(rank, x[shard], y[shard])
    with open(os.path.join(folder, f"result{rank}.json"), "w") as f:
        json.dump(result, f)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp")
    spawn(_worker, str(folder), world=WORLD)
    results = [json.loads((folder / f"result{r}.json").read_text()) for r in range(WORLD)]
    traces = [gradguard.Trace.load(folder / f"trace{r}.npz") for r in range(WORLD)]
    return folder, results, traces


@pytest.fixture(scope="module")
def single():
    torch.set_num_threads(1)
    x, y = _data()
    return _train(_model(), x, y).trace, _clip_runs(_model, x, y)


def test_layer_names_are_the_models(fsdp_run):
    _, results, _ = fsdp_run
    assert results[0]["layers"] == ["0", "2", "4"]


def test_per_layer_statistics_equal_one_process_on_the_full_batch(fsdp_run, single):
    _, _, traces = fsdp_run
    ref, _ = single
    for name in METRICS:
        got, want = traces[0].metric(name), ref.metric(name)
        assert not np.isnan(want).all(), name
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12, err_msg=name)


def test_every_rank_holds_the_same_trace(fsdp_run):
    _, _, traces = fsdp_run
    for name in ("grad_norm", "grad_absmax", "grad_nonfinite", "weight_norm", "update_norm", "act_mean", "act_std"):
        np.testing.assert_array_equal(traces[0].metric(name), traces[1].metric(name), err_msg=name)


def test_only_rank_zero_writes_the_store(fsdp_run):
    folder, _, traces = fsdp_run
    assert (folder / "rank0.db").exists() and not (folder / "rank1.db").exists()
    stored = gradguard.load(folder / "rank0.db")
    np.testing.assert_array_equal(stored.metric("grad_norm"), traces[0].metric("grad_norm"))


@pytest.mark.parametrize("kind", ["clip", "auto"])
def test_norm_clippers_use_the_global_norm(fsdp_run, single, kind):
    _, results, _ = fsdp_run
    _, ref = single
    for r in results:
        assert r[f"{kind}_total"] == pytest.approx(ref[f"{kind}_total"], rel=1e-6)
        for got, want in zip(r[f"{kind}_grads"], ref[f"{kind}_grads"]):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
    assert results[0][f"{kind}_total"] == results[1][f"{kind}_total"]  # the same number on every rank
    # the clip really clipped: otherwise equal gradients would prove nothing
    assert ref["clip_total"] > 0.05


def test_adaptive_clipping_on_shards_equals_one_process(fsdp_run, single):
    _, results, _ = fsdp_run
    _, ref = single
    assert 0 < ref["agc_fraction"] < 1
    for r in results:
        assert r["agc_fraction"] == pytest.approx(ref["agc_fraction"], rel=1e-6)
        for got, want in zip(r["agc_grads"], ref["agc_grads"]):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)


def test_guard_skips_on_every_rank_when_one_rank_has_a_nan(fsdp_run):
    _, results, _ = fsdp_run
    for r in results:
        g = r["guard"]
        assert g["grad"] == {"skipped": 1, "changed": False}
        assert g["loss"] == {"skipped": 2, "changed": False}
        assert g["None"] == {"skipped": 2, "changed": True}  # the clean step steps
        assert [e[:2] for e in g["events"]] == [[0, "step_skipped"], [1, "step_skipped"]]
        assert g["events"][0][2] == ["2"]  # the layer whose shard went bad, named on both ranks
        assert g["events"][1][3] is False  # the loss was not finite (on rank 1)
