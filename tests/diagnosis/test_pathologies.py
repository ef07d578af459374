"""diagnose on a suite of broken models: each gets the right kind at the right layer; healthy ones get no error."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradguard
from gradguard.demo import load_digits_tensors
from gradguard.remedy import prepend_standardizer


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y, _, _ = load_digits_tensors(seed=0)
    return x[:256], y[:256]


def mlp(widths: list[int], act: type[nn.Module], init: str | None = None, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        lin = nn.Linear(a, b)
        if init == "xavier":
            nn.init.xavier_normal_(lin.weight)
            nn.init.zeros_(lin.bias)
        elif init == "he":
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
            nn.init.zeros_(lin.bias)
        layers.append(lin)
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def kinds_at(d: gradguard.Diagnosis) -> dict[str, list[str | None]]:
    out: dict[str, list[str | None]] = {}
    for f in d.findings:
        out.setdefault(f.kind, []).append(f.layer)
    return out


def test_deep_sigmoid_mlp_vanishes_at_the_first_layer(digits):
    model = mlp([64] + [64] * 20 + [10], nn.Sigmoid)
    d = gradguard.diagnose(model, digits, F.cross_entropy, steps=10)
    found = kinds_at(d)
    assert found["vanishing_gradient"] == ["0"]
    f = d.by_kind("vanishing_gradient")[0]
    assert f.severity == "error"
    assert "Sigmoid" in f.message and "0.25" in f.message  # the cause, from the seeds' bound
    assert f.fixes[0].name == "relu_he"
    # the reference is the best-flowing layer, near the output; the ratio is the measured one
    rms = np.sqrt(d.profile.grad_ms)
    assert f.evidence["ratio"] == pytest.approx(rms[0] / np.nanmax(rms), rel=1e-9)


def test_relu_with_xavier_init_vanishes_and_he_init_fixes_it(digits):
    widths = [64] + [64] * 30 + [10]
    d = gradguard.diagnose(mlp(widths, nn.ReLU, "xavier"), digits, F.cross_entropy, steps=10)
    assert kinds_at(d)["vanishing_gradient"] == ["0"]
    assert "bad_init_scale" in d.kinds  # the cause: variance x fan_in 1 where ReLU needs 2
    assert len(d.by_kind("dead_units")) <= 1  # per-layer findings of a kind come as one, every layer in its evidence
    audit = d.by_kind("bad_init_scale")[0]
    assert audit.evidence["per_layer_ratio"] == pytest.approx(0.5, rel=0.15)
    # mean-field theory for ReLU at sigma_w^2 = 1: chi_1 = 1/2 per layer, beside the measurement
    assert d.theory is not None and d.theory.activation == "relu"
    assert d.theory.chi1 == pytest.approx(0.5, rel=0.05)
    assert d.theory.measured_chi1 == pytest.approx(d.theory.chi1, rel=0.3)
    fixed = gradguard.diagnose(mlp(widths, nn.ReLU, "he"), digits, F.cross_entropy, steps=10)
    assert "vanishing_gradient" not in fixed.kinds and "bad_init_scale" not in fixed.kinds
    assert fixed.gradient_ratio() > 100 * d.gradient_ratio()


def test_tanh_with_variance_four_over_fan_in_explodes(digits):
    torch.manual_seed(0)
    model = mlp([64] + [128] * 50 + [10], nn.Tanh)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.normal_(0, math.sqrt(4.0 / m.in_features))
                m.bias.zero_()
    d = gradguard.diagnose(model, digits, F.cross_entropy, steps=5)
    assert kinds_at(d)["exploding_gradient"][0] in ("0", "2")  # the input-side layers receive the largest gradient
    assert d.theory is not None and d.theory.phase == "chaotic"
    assert d.theory.measured_chi1 == pytest.approx(d.theory.chi1, rel=0.1)


def test_one_layer_scaled_by_100_is_named(digits):
    model = mlp([64] + [64] * 8 + [10], nn.ReLU, "he")
    with torch.no_grad():
        model[8].weight.mul_(100)
    d = gradguard.diagnose(model, digits, F.cross_entropy, steps=5)
    bad = d.by_kind("bad_init_scale")
    assert [f.layer for f in bad] == ["8"]
    assert bad[0].severity == "error"
    assert bad[0].evidence["ratio"] == pytest.approx(1e4, rel=0.3)


def test_bias_of_minus_ten_kills_the_units_of_that_layer(digits):
    model = mlp([64] + [64] * 6 + [10], nn.ReLU, "he")
    with torch.no_grad():
        model[6].bias.fill_(-10.0)
    d = gradguard.diagnose(model, digits, F.cross_entropy, steps=8)
    assert kinds_at(d)["dead_units"] == ["6"]
    assert d.by_kind("dead_units")[0].severity == "error"


def test_inputs_times_1000_are_unnormalized(digits):
    x, y = digits
    model = mlp([64, 64, 64, 10], nn.ReLU, "he")
    d = gradguard.diagnose(model, (x * 1000, y), F.cross_entropy, steps=5)
    f = d.by_kind("unnormalized_input")
    assert [g.layer for g in f] == ["0"] and f[0].severity == "error"
    assert f[0].evidence["first_layer_grad_ratio"] > 10
    clean = gradguard.diagnose(model, (x, y), F.cross_entropy, steps=5)
    assert "unnormalized_input" not in clean.kinds


def test_learning_rate_three_times_above_two_over_lambda_max():
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.tensor(data.target, dtype=torch.float32).reshape(-1, 1)
    y = (y - y.mean()) / y.std()
    # Linear regression with MSE: the Hessian is 2/N [x 1]^T [x 1], known in closed form.
    xb = torch.cat([x, torch.ones(len(x), 1)], dim=1).double()
    lam = float(torch.linalg.eigvalsh(2.0 / len(x) * xb.T @ xb).max())
    model = nn.Linear(10, 1)
    too_high = torch.optim.SGD(model.parameters(), lr=3 * 2 / lam)
    d = gradguard.diagnose(model, (x, y), F.mse_loss, steps=30, optimizer=too_high)
    f = d.by_kind("learning_rate_too_high")
    assert len(f) == 1 and f[0].severity == "error"
    assert d.curvature is not None and d.curvature.value == pytest.approx(lam, rel=1e-2)
    fine = torch.optim.SGD(model.parameters(), lr=0.5 * 2 / lam)
    assert "learning_rate_too_high" not in gradguard.diagnose(model, (x, y), F.mse_loss, steps=30,
                                                               optimizer=fine).kinds


class Recurrent(nn.Module):
    def __init__(self, hidden: int = 64, scale: float | None = None) -> None:
        super().__init__()
        self.rnn = nn.RNN(2, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)
        if scale is not None:
            with torch.no_grad():
                q, _ = torch.linalg.qr(torch.randn(hidden, hidden))
                self.rnn.weight_hh_l0.copy_(scale * q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def adding_problem(n: int = 64, length: int = 100, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(n, length, generator=g)
    marks = torch.zeros(n, length)
    for i in range(n):
        a, b = torch.randperm(length, generator=g)[:2]
        marks[i, a] = marks[i, b] = 1
    return torch.stack([values, marks], dim=2), (values * marks).sum(1, keepdim=True)


def test_vanilla_tanh_rnn_vanishes_through_time():
    torch.manual_seed(0)
    d = gradguard.diagnose(Recurrent(), adding_problem(), F.mse_loss, steps=5)
    assert kinds_at(d)["vanishing_through_time"] == ["rnn"]
    assert d.through_time[0].ratio < 1e-3


def test_recurrent_weights_three_times_orthogonal_explode_through_time():
    torch.manual_seed(0)
    x, y = adding_problem()
    d = gradguard.diagnose(Recurrent(scale=3.0), (x * 0.01, y), F.mse_loss, steps=5)
    assert kinds_at(d)["exploding_through_time"] == ["rnn"]
    assert d.through_time[0].ratio > 1e2


class LogOfNegative(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x - 10.0)  # every input below 10 gives NaN


def test_nan_from_one_module_is_localized(digits):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(64, 32))
    model.add_module("act", nn.ReLU())
    model.add_module("broken", LogOfNegative())
    model.add_module("fc2", nn.Linear(32, 10))
    d = gradguard.diagnose(model, digits, F.cross_entropy, steps=3)
    assert d.findings[0].kind == "nonfinite" and d.findings[0].layer == "broken"
    assert d.findings[0].evidence["phase"] == "forward"


class ResidualMLP(nn.Module):
    def __init__(self, width: int = 64, blocks: int = 12) -> None:
        super().__init__()
        self.inp = nn.Linear(64, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
            for _ in range(blocks)
        )
        self.out = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


def test_healthy_residual_mlp_has_no_error(digits):
    torch.manual_seed(0)
    d = gradguard.diagnose(ResidualMLP(), digits, F.cross_entropy, steps=20)
    assert d.errors == []
    assert d.final_loss() < d.losses[0]


class PreLNTransformer(nn.Module):
    def __init__(self, vocab: int = 32, dim: int = 64, layers: int = 4, length: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(tokens) + self.pos)
        return self.head(self.norm(h)).flatten(0, 1)


def test_healthy_pre_ln_transformer_has_no_error():
    torch.manual_seed(0)
    tokens = torch.randint(0, 32, (32, 16))
    targets = tokens.flip(1).flatten()  # reverse the sequence: needs attention across positions
    d = gradguard.diagnose(PreLNTransformer(), (tokens, targets), F.cross_entropy, steps=20)
    assert d.errors == []
    assert d.inputs is None  # token ids have no scale to judge
    assert d.final_loss() < d.losses[0]


def test_try_fixes_ranks_a_real_fix_above_doing_nothing(digits):
    d = gradguard.diagnose(mlp([64] + [64] * 30 + [10], nn.ReLU, "xavier"), digits, F.cross_entropy, steps=30)
    results = d.try_fixes()
    names = [r.name for r in results if r.applied]
    none = next(r for r in results if r.name == "none")
    assert none.loss_after == pytest.approx(d.final_loss())
    assert none.ratio_after == pytest.approx(d.gradient_ratio())
    structural = [r for r in results if r.name in ("he_init", "batchnorm", "residual")]
    assert {r.name for r in structural} == {"he_init", "batchnorm", "residual"}  # all proposed, all measured
    best = names.index(structural[0].name) if structural else len(names)
    assert best < names.index("none")
    for r in structural:
        assert r.ratio_after > 100 * r.ratio_before  # each of them restores the flow at initialisation
    he = next(r for r in results if r.name == "he_init")
    assert he.loss_after < none.loss_after and he.errors_after == 0
    # the table shows the measured numbers, before and after
    text = str(d)
    assert "fixes tried" in text and f"{he.ratio_after:.2e}" in text and f"{none.loss_after:.4g}" in text
    assert json.loads(d.to_json())["fixes_tried"][0]["name"] == results[0].name


def test_try_fixes_rejects_unknown_names_and_reports_inapplicable_ones(digits):
    d = gradguard.diagnose(mlp([64, 32, 10], nn.ReLU, "he"), digits, F.cross_entropy, steps=3, hessian=False)
    with pytest.raises(ValueError, match="unknown fix"):
        d.try_fixes(["more_layers"])
    results = d.try_fixes(["gated_rnn", "lower_lr"])
    gated = next(r for r in results if r.name == "gated_rnn")
    assert not gated.applied and "no vanilla nn.RNN" in gated.note
    assert next(r for r in results if r.name == "lower_lr").applied


def test_a_model_that_standardises_its_own_inputs_is_not_flagged(digits):
    x, y = digits
    raw = x * 1000 + 50
    model = prepend_standardizer(mlp([64, 64, 64, 10], nn.ReLU, "he"), raw)
    d = gradguard.diagnose(model, (raw, y), F.cross_entropy, steps=3, hessian=False)
    assert "unnormalized_input" not in d.kinds
    assert d.inputs is not None and d.inputs.feature_rms_max < 2  # judged at the first layer's input
    assert d.inputs.first_layer_grad_ratio == pytest.approx(1.0, rel=0.05)
