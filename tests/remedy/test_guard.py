"""NonFiniteGuard and localize: bad steps are skipped and named, parameters stay finite."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradguard.remedy.guard import NonFiniteGuard, localize


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2)).to(dtype)


def _train(model, guard, opt, steps=8, bad_steps=(3,), poison="grad", dtype=torch.float32, scaler=None):
    """Train with NaN injected at ``bad_steps``; returns parameter snapshots after each step."""
    x, y = torch.randn(32, 8, dtype=dtype), torch.randn(32, 2, dtype=dtype)
    snapshots = []
    for step in range(steps):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        if step in bad_steps and poison == "loss":
            loss = loss * math.nan
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        if step in bad_steps and poison == "grad":
            model[2].weight.grad[0, 0] = math.inf if scaler is not None else math.nan
        guard.step(loss)
        snapshots.append([p.detach().clone() for p in model.parameters()])
    return snapshots


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_skip_policy(fused, dtype):
    model = _model(dtype)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused or None)
    guard = NonFiniteGuard(opt, model=model)
    assert guard._sync_free == fused
    snaps = _train(model, guard, opt, dtype=dtype)
    assert all(torch.isfinite(p).all() for snap in snaps for p in snap)
    assert all(torch.equal(a, b) for a, b in zip(snaps[2], snaps[3]))  # the bad step changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(snaps[3], snaps[4]))  # clean steps go on
    assert guard.skipped == 1
    (event,) = guard.events
    assert (event.step, event.kind, event.layers, event.loss_finite) == (3, "step_skipped", ["2"], True)


def test_skip_keeps_optimizer_state_as_if_the_step_never_happened():
    def run(bad):
        model = _model()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        guard = NonFiniteGuard(opt, model=model)
        x, y = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)), torch.zeros(32, 2)
        for step in range(6):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            if bad and step == 2:
                model[0].bias.grad[0] = math.nan
                guard.step()
                opt.zero_grad()
                ((model(x) - y) ** 2).mean().backward()
            guard.step()
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(run(True), run(False)))


def test_nan_loss_is_skipped_and_reported():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = NonFiniteGuard(opt, model=model)
    snaps = _train(model, guard, opt, poison="loss")
    assert all(torch.isfinite(p).all() for snap in snaps for p in snap)
    assert guard.skipped == 1 and guard.events[0].loss_finite is False


def test_backoff_policy_halves_and_recovers_the_learning_rate():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = NonFiniteGuard(opt, model=model, policy="backoff", backoff=0.5, recover_after=3)
    _train(model, guard, opt, steps=9, bad_steps=(1, 2))
    kinds = [e.kind for e in guard.events]
    assert kinds.count("lr_backoff") == 2 and "lr_recovered" in kinds
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)  # recovered to, never above, the original
    assert [e.detail["lr"][0] for e in guard.events if e.kind == "lr_backoff"] == [0.05, 0.025]


def test_restore_policy_loads_the_last_good_snapshot():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = NonFiniteGuard(opt, model=model, policy="restore", restore_after=2, snapshot_every=2)
    snaps = _train(model, guard, opt, steps=7, bad_steps=(4, 5))
    restored = [e for e in guard.events if e.kind == "restored"]
    assert len(restored) == 1 and restored[0].step == 5
    # the last snapshot was taken after the 4th clean step (step 3)
    assert all(torch.equal(a, b) for a, b in zip(snaps[5], snaps[3]))


@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16])
def test_grad_scaler_names_the_overflowing_layer(amp_dtype):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    guard = NonFiniteGuard(opt, model=model, scaler=scaler)
    x, y = torch.randn(32, 8), torch.randn(32, 2)
    scales = []
    for step in range(5):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=amp_dtype):
            loss = ((model(x).float() - y) ** 2).mean()
        scaler.scale(loss).backward()
        if step == 2:
            model[2].weight.grad[1, 1] = math.inf
        guard.step(loss)
        scaler.update()
        scales.append(scaler.get_scale())
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert guard.skipped == 1 and guard.events[0].layers == ["2"] and guard.events[0].step == 2
    assert scales[2] < scales[1]  # the scaler saw the overflow too and backed off


def test_events_name_parameters_without_a_model():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = NonFiniteGuard(opt)
    _train(model, guard, opt)
    assert guard.events[0].layers == ["param[2] (16, 16)"]


def test_bad_input():
    opt = torch.optim.SGD(_model().parameters(), lr=0.1)
    opt.param_groups[0]["params"] = []
    with pytest.raises(ValueError, match="no parameters"):
        NonFiniteGuard(opt)
    opt = torch.optim.SGD(_model().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="policy"):
        NonFiniteGuard(opt, policy="ignore")
    with pytest.raises(TypeError, match="Optimizer"):
        NonFiniteGuard(_model())


# -- localize -------------------------------------------------------------------------


class Blowup(nn.Module):
    def forward(self, x):
        return x * 1e39  # float32 overflows to inf


class NaNBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.nan


class BadGrad(nn.Module):
    def forward(self, x):
        return NaNBackward.apply(x)


def test_localize_forward_inf():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), Blowup(), nn.Linear(8, 2))
    found = localize(model, (torch.randn(3, 4), torch.randn(3, 2)), nn.functional.mse_loss)
    assert (found.module, found.phase, found.kind) == ("2", "forward", "nonfinite")


def test_localize_backward_nan_only():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), BadGrad(), nn.Linear(8, 2))
    found = localize(model, (torch.randn(3, 4), torch.randn(3, 2)), nn.functional.mse_loss)
    assert (found.module, found.phase, found.kind) == ("2", "backward", "nonfinite")
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


def test_localize_healthy_model():
    model = _model()
    found = localize(model, (torch.randn(3, 8), torch.randn(3, 2)), nn.functional.mse_loss)
    assert found.module is None


@pytest.mark.parametrize("clipper", ["norm", "value", "agc", "autoclip", "zscore"])
def test_each_clipper_with_the_guard_keeps_every_parameter_finite(clipper):
    from gradguard.remedy.clip import AutoClip, ZScoreClip, adaptive_clip_grad_, clip_grad_norm_, clip_grad_value_

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = NonFiniteGuard(opt, model=model)
    stateful = {"autoclip": AutoClip(10), "zscore": ZScoreClip(warmup=2)}
    clip = {
        "norm": lambda: clip_grad_norm_(model.parameters(), 0.5),
        "value": lambda: clip_grad_value_(model.parameters(), 0.05),
        "agc": lambda: adaptive_clip_grad_(model.parameters()),
        "autoclip": lambda: stateful["autoclip"](model.parameters()),
        "zscore": lambda: stateful["zscore"](model.parameters()),
    }[clipper]
    x, y = torch.randn(32, 8), torch.randn(32, 2)
    for step in range(10):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        if step in (4, 7):
            model[2].weight.grad[0, 0] = math.nan
        clip()
        guard.step(loss)
        assert all(torch.isfinite(p).all() for p in model.parameters()), step
    assert [e.step for e in guard.events] == [4, 7] and all(e.layers == ["2"] for e in guard.events)


def test_nan_in_a_frozen_layer():
    model = _model()
    model[2].requires_grad_(False)
    with torch.no_grad():
        model[2].weight[0, 0] = math.nan  # a frozen layer has no gradient, but poisons the forward
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    guard = NonFiniteGuard(opt, model=model)
    before = [p.detach().clone() for p in opt.param_groups[0]["params"]]
    loss = ((model(torch.randn(4, 8)) - 1) ** 2).mean()
    loss.backward()
    guard.step(loss)
    assert all(torch.equal(a, b) for a, b in zip(before, opt.param_groups[0]["params"]))
    (event,) = guard.events
    assert event.loss_finite is False
