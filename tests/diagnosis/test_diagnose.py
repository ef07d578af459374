"""diagnose's contract: nothing passed in changes, results are reproducible and serialisable, bad input is named."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradguard
from gradguard.detect import KINDS
from gradguard.diagnosis.profile import measure_profile
from gradguard.probe.layers import find_layers


def small(seed: int = 0, depth: int = 6, act: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(8, 16), act()]
    for _ in range(depth - 2):
        layers += [nn.Linear(16, 16), act()]
    layers.append(nn.Linear(16, 3))
    return nn.Sequential(*layers)


@pytest.fixture()
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)


def test_model_optimizer_and_random_state_are_left_alone(batch):
    model = small()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    d = gradguard.diagnose(model, batch, F.cross_entropy, steps=5, optimizer=opt)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's random stream is where it was
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert opt.state == {}  # the short run used a rebuilt optimizer
    assert "lr 0.05" in d.settings["optimizer"] and "momentum 0.5" in d.settings["optimizer"]
    assert len(d.losses) == 5 and len(d.trace) == 5


def test_short_run_trains_with_the_given_hyperparameters(batch):
    model = small()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    d = gradguard.diagnose(model, batch, F.cross_entropy, steps=3, optimizer=opt, hessian=False)
    # reproduce the three steps by hand on a copy
    import copy

    ref = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    losses = []
    for _ in range(3):
        ref_opt.zero_grad()
        loss = F.cross_entropy(ref(batch[0]), batch[1])
        loss.backward()
        losses.append(float(loss.detach()))
        ref_opt.step()
    np.testing.assert_allclose(d.losses, losses, rtol=1e-6)
    np.testing.assert_allclose(d.trace.loss, losses, rtol=1e-6)


def test_same_seed_same_numbers(batch):
    a = gradguard.diagnose(small(), batch, F.cross_entropy, steps=4)
    b = gradguard.diagnose(small(), batch, F.cross_entropy, steps=4)
    assert a.to_json() == b.to_json()


def test_json_is_strict_and_complete(batch):
    d = gradguard.diagnose(small(depth=12, act=nn.Sigmoid), batch, F.cross_entropy, steps=3)
    data = json.loads(d.to_json())  # allow_nan=False inside: NaN/inf would have raised
    assert data["findings"], "a 12-layer sigmoid MLP has findings"
    for f in data["findings"]:
        assert set(f) >= {"kind", "layer", "step", "severity", "message", "evidence", "fixes"}
        assert f["kind"] in KINDS
        assert all(set(fix) >= {"title", "code", "name"} for fix in f["fixes"])
    assert [f["kind"] for f in data["findings"]] == [f.kind for f in d.findings]
    assert len(data["profile"]["layers"]) == 12
    assert data["curvature"]["value"] == pytest.approx(d.curvature.value)
    assert data["theory"]["activation"] == "sigmoid"


def test_findings_are_ranked_worst_first(batch):
    d = gradguard.diagnose(small(depth=12, act=nn.Sigmoid), (batch[0] * 500, batch[1]), F.cross_entropy, steps=3)
    ranks = [("info", "warning", "error").index(f.severity) for f in d.findings]
    assert ranks == sorted(ranks, reverse=True)
    assert {"vanishing_gradient", "unnormalized_input"} <= set(d.kinds)


def test_text_names_kind_layer_and_fix(batch):
    d = gradguard.diagnose(small(depth=12, act=nn.Sigmoid), batch, F.cross_entropy, steps=3)
    text = str(d)
    first = d.findings[0]
    assert f"[{first.severity}] {first.kind} in {first.layer}" in text
    assert first.fixes[0].code.splitlines()[0] in text
    assert "largest Hessian eigenvalue" in text


def test_steps_zero_measures_initialisation_only(batch):
    model = small()
    d = gradguard.diagnose(model, batch, F.cross_entropy, steps=0, hessian=False)
    assert len(d.trace) == 1 and len(d.losses) == 1
    assert d.curvature is None and "hessian=False" in d.curvature_note


def test_profile_matches_hand_computed_gradients(batch):
    model = small()
    x, y = batch
    index = find_layers(model)
    profile, _ = measure_profile(model, index, lambda: F.cross_entropy(model(x), y), x)
    # dL/dy of every Linear by hand: retain the outputs
    outs = []
    h = x
    for m in model:
        h = m(h)
        if isinstance(m, nn.Linear):
            h.retain_grad()
            outs.append(h)
    F.cross_entropy(h, y).backward()
    for i, out in enumerate(outs):
        assert profile.grad_ms[i] == pytest.approx(float((out.grad.double() ** 2).mean()), rel=1e-6)
        assert profile.out_ms[i] == pytest.approx(float((out.detach().double() ** 2).mean()), rel=1e-6)
    assert profile.activation == ["Tanh"] * 5 + [None]
    assert profile.chains() == [list(range(6))]


def test_residual_connections_break_the_chain():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.act = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.act(self.fc(x))

    model = nn.Sequential(Block(), Block(), nn.Linear(8, 2))
    x = torch.randn(4, 8)
    profile, _ = measure_profile(model, find_layers(model), lambda: model(x).sum(), x)
    assert profile.chains() == [[0], [1], [2]]  # each Linear reads the residual stream, not the previous ReLU


@pytest.mark.parametrize("sigma_w2", [1.0, 1.76, 4.0])
def test_measured_gradient_factor_matches_chi1_at_width_1000_depth_60(sigma_w2):
    # tanh, sigma_b^2 = 0.05: the measured per-layer factor of ||dL/dy||^2 is within 3% of mean-field chi_1
    width, depth, sigma_b2 = 1000, 60, 0.05
    g = torch.Generator().manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        lin = nn.Linear(width, width)
        with torch.no_grad():
            lin.weight.normal_(0, math.sqrt(sigma_w2 / width), generator=g)
            lin.bias.normal_(0, math.sqrt(sigma_b2), generator=g)
        layers += [lin, nn.Tanh()]
    layers.append(nn.Linear(width, 1))
    model = nn.Sequential(*layers)
    x, y = torch.randn(32, width, generator=g), torch.randn(32, 1, generator=g)
    d = gradguard.diagnose(model, (x, y), F.mse_loss, steps=0, hessian=False)
    theory = gradguard.theory.mean_field("tanh", sigma_w2, sigma_b2)
    assert d.theory is not None and d.theory.depth == depth
    assert d.theory.sigma_w2 == pytest.approx(sigma_w2, rel=0.01)
    assert d.theory.chi1 == pytest.approx(theory.chi1, rel=0.01)
    assert d.theory.measured_chi1 == pytest.approx(d.theory.chi1, rel=0.03)
    assert d.theory.measured_q == pytest.approx(theory.q_star, rel=0.05)


def test_bad_arguments_are_named(batch):
    model = small()
    with pytest.raises(TypeError, match="torch.nn.Module"):
        gradguard.diagnose(model.parameters(), batch, F.cross_entropy)
    with pytest.raises(TypeError, match=r"pair \(inputs, targets\)"):
        gradguard.diagnose(model, batch[0], F.cross_entropy)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        gradguard.diagnose(model, batch, "ce")
    with pytest.raises(ValueError, match="steps must be"):
        gradguard.diagnose(model, batch, F.cross_entropy, steps=-1)
    with pytest.raises(ValueError, match="has no parameters"):
        gradguard.diagnose(nn.ReLU(), batch, F.cross_entropy)
    with pytest.raises(ValueError, match="could not run on the batch"):
        gradguard.diagnose(model, (torch.randn(4, 5), batch[1][:4]), F.cross_entropy)
    with pytest.raises(ValueError, match="scalar"):
        gradguard.diagnose(model, batch, lambda out, y: out)
    with pytest.raises(ValueError, match="optimizer must be"):
        gradguard.diagnose(model, batch, F.cross_entropy, optimizer="lbfgs")
    other = torch.optim.SGD(small(seed=1).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not the model's"):
        gradguard.diagnose(model, batch, F.cross_entropy, optimizer=other)
    with pytest.raises(ValueError, match="lr must be"):
        gradguard.diagnose(model, batch, F.cross_entropy, lr=-1.0)


def test_every_fix_names_gradguard_functions_that_exist():
    import re

    from gradguard.detect import fixes

    found = [v for v in vars(fixes).values() if isinstance(v, gradguard.Fix)]
    assert len(found) >= 15
    for fix in found:
        assert fix.name, fix.title
        for attr in re.findall(r"gradguard\.(\w+)", fix.code):
            assert hasattr(gradguard, attr), f"{fix.name}: gradguard.{attr} does not exist"
