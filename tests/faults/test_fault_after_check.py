"""Faults the guard's gradient check cannot see: a NaN in the optimizer's state (the gradient is
finite, the update is not), and a gradient that goes bad after ``GradScaler.unscale_``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradguard

STEPS, BAD = 30, 12


def model_and_data() -> tuple[nn.Sequential, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(STEPS):
        x = torch.randn(16, 8, generator=g)
        data.append((x, x[:, :4] * 0.5))
    return model, data


def adam_run(state_value: float, store, **guard_kwargs):
    """Adam under guard and watch; ``state_value`` lands in layer 2's exp_avg_sq before step BAD."""
    model, data = model_and_data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = gradguard.NonFiniteGuard(opt, model=model, **guard_kwargs)
    losses = []
    with gradguard.watch(model, optimizer=opt, store=store, flush_every=4, weights_every=1) as w:
        for step, (x, y) in enumerate(data):
            if step == BAD:
                opt.state[model[2].weight]["exp_avg_sq"][0, 0] = state_value
            opt.zero_grad(set_to_none=True)
            loss = F.mse_loss(model(x), y)
            loss.backward()
            w.step(loss=loss)
            guard.step(loss)
            losses.append(float(loss.detach()))
    return model, guard, w, losses


def test_nan_in_optimizer_state_gets_past_the_gradient_check(tmp_path):
    """Documents the gap: every gradient is finite at the bad step, so the default guard steps, and
    the parameters go NaN. From the next step on every loss is NaN and every step is skipped."""
    model, guard, w, _ = adam_run(float("nan"), tmp_path / "run.db")
    assert not torch.isfinite(model[2].weight).all()
    assert [e.step for e in guard.events if e.kind == "step_skipped"] == list(range(BAD + 1, STEPS))
    # watch sees the first consequence: the gradients of step BAD + 1 (its norms are of finite
    # elements, so the NaN update of step BAD itself shows in no statistic).
    assert (w.trace.metric("grad_nonfinite")[: BAD + 1] == 0).all()
    first = [f for f in w.findings if f.kind == "nonfinite" and f.layer is not None]
    assert [f.step for f in first] == [BAD + 1]
    assert len(gradguard.load(tmp_path / "run.db")) == STEPS


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_check_params_undoes_the_step_and_training_goes_on(value, tmp_path):
    model, guard, w, losses = adam_run(value, tmp_path / "run.db", check_params=True, snapshot_every=1)
    events = [e for e in guard.events if e.kind == "step_skipped"]
    assert [(e.step, e.layers, e.detail["after_step"], e.detail["restored_to_step"]) for e in events] == [
        (BAD, ["2"], True, BAD)
    ]
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    for state in guard.optimizer.state.values():
        assert all(torch.isfinite(t).all() for t in state.values() if isinstance(t, torch.Tensor))
    # Training went on from the restored state: the loss keeps falling after the undone step.
    assert np.isfinite(losses).all() and losses[-1] < losses[BAD] < losses[0]
    assert not [f for f in w.findings if f.kind == "nonfinite"]  # no gradient was ever bad
    assert len(gradguard.load(tmp_path / "run.db")) == STEPS


def test_check_params_with_a_sparse_snapshot_rolls_back_to_it(tmp_path):
    _, guard, _, _ = adam_run(float("nan"), tmp_path / "run.db", check_params=True, snapshot_every=5)
    (event,) = [e for e in guard.events if e.kind == "step_skipped"]
    # Snapshots after 5 and 10 clean steps (steps 0-4 and 5-9): step 10 is the first they have not seen.
    assert (event.step, event.detail["restored_to_step"]) == (BAD, 10)


def test_fp16_gradient_gone_bad_after_unscale_is_skipped_and_the_scale_backs_off():
    """The scaler's own inf check ran in unscale_, before the fault: the guard must make it skip."""
    model, data = model_and_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    guard = gradguard.NonFiniteGuard(opt, model=model, scaler=scaler)
    scales = []
    for step, (x, y) in enumerate(data):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        if step == BAD:
            model[4].weight.grad[0, 0] = float("nan")  # as a faulty gradient transform would
        guard.step(loss)
        scaler.update()
        scales.append(scaler.get_scale())
    assert [(e.step, e.layers) for e in guard.events] == [(BAD, ["4"])]
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    assert scales[BAD] == scales[BAD - 1] / 2  # the scaler backed off as for an overflow
