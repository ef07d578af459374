"""Each detector on a real model that has the problem, and silence on a healthy one."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import mlp
from torch import nn

import gradguard


def _run(model, x, y, steps=5, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    kw.setdefault("activations_every", 1)
    with gradguard.watch(model, optimizer=opt, **kw) as w:
        for _ in range(steps):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            w.step(loss=loss)
            opt.step()
    return w


def _kinds(w):
    return {f.kind: f for f in w.findings}


@pytest.fixture
def data():
    return torch.randn(128, 32), torch.randint(0, 10, (128,))


def test_vanishing_in_20_layer_sigmoid_mlp(data):
    w = _run(mlp(20, 64, act=nn.Sigmoid, d_in=32), *data)
    f = _kinds(w)["vanishing_gradient"]
    assert f.severity == "error"
    assert f.layer in {"0", "2", "4"}  # the input-side layers are the worst
    assert f.evidence["ratio"] < 1e-6
    assert f.evidence["reference_layer"] == "40"
    g = w.trace.metric("grad_norm")[-1]
    assert g[0] / g[-1] < 1e-6  # orders of magnitude below the last layer
    assert f.fixes and "kaiming" in f.fixes[0].code


def test_exploding_in_tanh_mlp_with_variance_4_over_fan_in(data):
    model = mlp(50, 64, act=nn.Tanh, d_in=32)
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=math.sqrt(4.0 / m.in_features))
            nn.init.zeros_(m.bias)
    w = _run(model, *data, steps=3)
    f = _kinds(w)["exploding_gradient"]
    assert f.layer in {"0", "2", "4", "6"}
    assert f.evidence["ratio"] > 1e2
    assert "vanishing_gradient" not in _kinds(w)


def test_nonfinite_names_the_step_and_layer_where_it_was_injected(data):
    model = mlp(4, 32, d_in=32)
    target = model[4]  # layer "4"
    state = {"step": 0}

    def poison(grad):
        if state["step"] == 7:
            grad = grad.clone()
            grad[0, 0] = float("nan")
        return grad

    target.weight.register_hook(poison)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x, y = data
    with gradguard.watch(model, optimizer=opt, flush_every=4, activations_every=0) as w:
        for step in range(12):
            state["step"] = step
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            w.step()
            opt.step()
    f = _kinds(w)["nonfinite"]
    assert (f.step, f.layer, f.severity) == (7, "4", "error")
    assert f.evidence["counts"] == {"4": 1}
    assert w.trace.metric("grad_nonfinite")[7, 2] == 1
    assert w.trace.metric("grad_nonfinite")[:7].sum() == 0
    # lr=0 does not protect the weights: 0 * NaN = NaN, so every later step is poisoned
    assert w.trace.metric("grad_nonfinite")[8].sum() > 1


def test_nonfinite_loss_is_reported(data):
    model = mlp(2, 16, d_in=32)
    with gradguard.watch(model, activations_every=0) as w:
        for step in range(3):
            out = model(data[0])
            loss = nn.functional.cross_entropy(out, data[1]) * (float("nan") if step == 1 else 1.0)
            loss.backward()
            w.step(loss=loss)
    loss_findings = [f for f in w.findings if f.kind == "nonfinite" and f.layer is None]
    assert loss_findings and loss_findings[0].step == 1


def test_dead_units_where_bias_is_minus_ten(data):
    model = mlp(3, 64, d_in=32)
    with torch.no_grad():
        model[2].bias.fill_(-10.0)
    w = _run(model, *data)
    dead = {f.layer: f for f in w.findings if f.kind == "dead_units"}
    assert dead["2"].severity == "error" and dead["2"].evidence["act_dead"] > 0.9
    assert "0" not in dead  # the layer before it is fine
    # layer 4 then sees only zeros, so its units are relu(bias): about half of them dead too
    healthy = _run(mlp(3, 64, d_in=32), *data)
    assert not [f for f in healthy.findings if f.kind == "dead_units"]


def test_saturation_in_sigmoid_net_with_large_inputs(data):
    x, y = data
    w = _run(mlp(3, 64, act=nn.Sigmoid, d_in=32), x * 100, y)
    sat = {f.layer: f for f in w.findings if f.kind == "saturated_activation"}
    assert "0" in sat and sat["0"].evidence["act_saturated"] > 0.5
    w_small = _run(mlp(3, 64, act=nn.Sigmoid, d_in=32), x, y)
    assert not [f for f in w_small.findings if f.kind == "saturated_activation"]


class ResidualMLP(nn.Module):
    def __init__(self, depth=20, width=64):
        super().__init__()
        self.inp = nn.Linear(32, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
            for _ in range(depth)
        )
        self.out = nn.Linear(width, 10)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h) / math.sqrt(len(self.blocks))
        return self.out(h)


def test_healthy_residual_mlp_with_he_init_is_silent(data):
    w = _run(ResidualMLP(), *data, steps=20)
    assert [f for f in w.findings if f.severity in ("warning", "error")] == []
    assert len(w.trace.layers) == 1 + 20 * 3 + 1
