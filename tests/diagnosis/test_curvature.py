"""Largest Hessian eigenvalue by power iteration, the optimizer's stability limit, and the learning-rate finding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_diabetes
from torch import nn
from torch.func import functional_call

from gradguard.detect.thresholds import Thresholds
from gradguard.diagnosis.curvature import (
    Curvature,
    hessian_top_eigenvalue,
    learning_rate_findings,
    stability_limit,
)


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def full_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn) -> np.ndarray:
    """The Hessian over all parameters (flattened in parameter order), by torch.autograd.functional.hessian."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(w: torch.Tensor) -> torch.Tensor:
        ps, i = {}, 0
        for n, s in zip(names, shapes):
            ps[n] = w[i : i + s.numel()].reshape(s)
            i += s.numel()
        return loss_fn(functional_call(model, ps, (x,)), y)

    return torch.autograd.functional.hessian(loss_of, flat).numpy()


def top_by_magnitude(h: np.ndarray) -> tuple[float, float]:
    """The eigenvalue of largest magnitude and |second| / |first| (how fast power iteration converges)."""
    ev = np.linalg.eigvalsh(h)
    order = np.argsort(-np.abs(ev))
    return float(ev[order[0]]), float(abs(ev[order[1]]) / abs(ev[order[0]]))


def linear_regression(n: int = 64) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    # Unequal column scales: a clear gap between the top two eigenvalues of X^T X.
    scales = torch.tensor([3.0, 1.0, 0.7, 0.5, 0.2], dtype=torch.float64)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64) * scales
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    return nn.Linear(5, 1).double(), x, y


# ---------------------------------------------------------------- the eigenvalue


@pytest.mark.parametrize("reduction, factor", [("mean", "2/N"), ("sum", "2")])
def test_linear_regression_matches_closed_form(reduction: str, factor: str) -> None:
    model, x, y = linear_regression()
    n = x.shape[0]
    # Parameters (w, b): the loss is sum_i (a_i . theta - y_i)^2 (/ N) with a_i = (x_i, 1).
    a = np.hstack([x.numpy(), np.ones((n, 1))])
    h = (2.0 / n if factor == "2/N" else 2.0) * a.T @ a
    expected = float(np.linalg.eigvalsh(h)[-1])
    c = hessian_top_eigenvalue(model, x, y, nn.MSELoss(reduction=reduction))
    assert rel(c.value, expected) < 1e-3
    assert c.converged and c.iterations <= 20


def test_negative_curvature_keeps_its_sign() -> None:
    model, x, y = linear_regression()
    n = x.shape[0]
    a = np.hstack([x.numpy(), np.ones((n, 1))])
    expected = -float(np.linalg.eigvalsh(2.0 / n * a.T @ a)[-1])
    c = hessian_top_eigenvalue(model, x, y, lambda out, t: -nn.functional.mse_loss(out, t))
    assert c.value < 0
    assert rel(c.value, expected) < 1e-3


def test_small_tanh_mlp_matches_full_hessian() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 2)).double()
    x = torch.randn(40, 6, dtype=torch.float64)
    y = torch.randn(40, 2, dtype=torch.float64)
    loss_fn = nn.MSELoss()
    h = full_hessian(model, x, y, loss_fn)
    assert h.shape == (266, 266)
    expected, gap = top_by_magnitude(h)
    assert gap < 0.9  # power iteration separates the top eigenvalue quickly
    c = hessian_top_eigenvalue(model, x, y, loss_fn, iters=1000, tol=1e-10)
    assert c.converged
    assert rel(c.value, expected) < 1e-4
    # The default budget already gets close.
    assert rel(hessian_top_eigenvalue(model, x, y, loss_fn).value, expected) < 1e-2


def test_float32_model_agrees_with_float64_reference() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 10), nn.Tanh(), nn.Linear(10, 3))
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    expected, _ = top_by_magnitude(full_hessian(model.double(), x.double(), y, nn.CrossEntropyLoss()))
    c = hessian_top_eigenvalue(model.float(), x, y, nn.CrossEntropyLoss(), iters=300, tol=1e-7)
    assert rel(c.value, expected) < 1e-3


def test_leaves_parameters_grads_buffers_and_mode_alone() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    nn.functional.mse_loss(model(x), y).backward()
    model[3].bias.grad = None  # one parameter without a .grad: it must stay without one
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}

    first = hessian_top_eigenvalue(model, x, y, nn.MSELoss(), seed=7)

    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():  # parameters and BatchNorm running statistics
        assert torch.equal(v, before[k]), k
    for n, p in model.named_parameters():
        if grads[n] is None:
            assert p.grad is None, n
        else:
            assert torch.equal(p.grad, grads[n]), n
    assert hessian_top_eigenvalue(model, x, y, nn.MSELoss(), seed=7) == first  # deterministic for a seed

    model.eval()
    hessian_top_eigenvalue(model, x, y, nn.MSELoss())
    assert not model.training and not model[1].training


def test_only_parameters_that_require_grad() -> None:
    model, x, y = linear_regression()
    model.bias.requires_grad_(False)
    n = x.shape[0]
    expected = float(np.linalg.eigvalsh(2.0 / n * x.numpy().T @ x.numpy())[-1])  # the bias row/column left out
    assert rel(hessian_top_eigenvalue(model, x, y, nn.MSELoss()).value, expected) < 1e-3


class _NoBackward(torch.autograd.Function):
    """Multiplication by (1 - out^2) with no backward of its own."""

    @staticmethod
    def forward(ctx, grad, out):
        return grad * (1 - out * out)


class _Tanh(torch.autograd.Function):
    """tanh whose backward is an op that cannot be differentiated (as in a hand-written kernel)."""

    @staticmethod
    def forward(ctx, x):
        out = torch.tanh(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return _NoBackward.apply(grad, out)


class _CustomTanh(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Tanh.apply(x)


class _Prototypes(nn.Module):
    """Logits from the distances to learned class prototypes (torch.cdist has no double backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.prototypes = nn.Parameter(torch.randn(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -torch.cdist(x, self.prototypes)


@pytest.mark.parametrize("layer", [_CustomTanh, _Prototypes])
def test_no_double_backward_raises_value_error(layer) -> None:
    model = nn.Sequential(nn.Linear(3, 3), layer(), nn.Linear(3 if layer is _CustomTanh else 4, 2))
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    with pytest.raises(ValueError, match="does not support double backward"):
        hessian_top_eigenvalue(model, x, y, nn.CrossEntropyLoss())


def test_non_scalar_loss_raises_value_error() -> None:
    model, x, y = linear_regression()
    with pytest.raises(ValueError, match="scalar"):
        hessian_top_eigenvalue(model, x, y, nn.MSELoss(reduction="none"))


def test_non_finite_loss_raises_value_error() -> None:
    model, x, y = linear_regression()
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        hessian_top_eigenvalue(model, x, y, nn.MSELoss())


def test_curvature_to_dict_is_json() -> None:
    d = Curvature(value=2.5, iterations=7, converged=True).to_dict()
    assert json.loads(json.dumps(d)) == {"value": 2.5, "iterations": 7, "converged": True}


# ---------------------------------------------------------------- the optimizer's limit


def run_quadratic(lam: float, make_opt, steps: int = 600) -> float:
    """|w| after gradient steps on f(w) = lam w^2 / 2 from w = 1."""
    w = nn.Parameter(torch.ones(1, dtype=torch.float64))
    opt = make_opt([w])
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * lam * w * w).sum().backward()
        opt.step()
    return float(w.detach().abs())


SGD_CASES = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.1, momentum=0.9),
    "nesterov": dict(lr=0.1, momentum=0.9, nesterov=True),
    "dampening": dict(lr=0.1, momentum=0.5, dampening=0.5),
    "weight_decay": dict(lr=0.1, momentum=0.9, weight_decay=5.0),  # limit 38 - 5
}


@pytest.mark.parametrize("case", list(SGD_CASES))
def test_limit_separates_convergence_from_divergence(case: str) -> None:
    kwargs = SGD_CASES[case]
    limit, rule = stability_limit(torch.optim.SGD([nn.Parameter(torch.zeros(1))], **kwargs))
    assert limit is not None and limit > 0 and "lr" in rule
    assert run_quadratic(0.97 * limit, lambda ps: torch.optim.SGD(ps, **kwargs)) < 1e-6
    assert run_quadratic(1.03 * limit, lambda ps: torch.optim.SGD(ps, **kwargs)) > 1e6


def test_limit_values_by_hand() -> None:
    def limit(**kw):
        return stability_limit(torch.optim.SGD([nn.Parameter(torch.zeros(1))], **kw))

    assert limit(lr=0.01)[0] == pytest.approx(200.0)  # 2/lr
    assert limit(lr=0.1, momentum=0.9)[0] == pytest.approx(38.0)  # 2 * 1.9 / 0.1
    assert limit(lr=0.1, momentum=0.9, nesterov=True)[0] == pytest.approx(38.0 / 2.8)  # 2 * 1.9 / (0.1 * 2.8)
    value, rule = limit(lr=0.1, momentum=0.9)
    assert "2(1+momentum)/lr" in rule and "0.9" in rule
    assert limit(lr=0.0)[0] is None


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad])
def test_adaptive_optimizers_have_no_limit(cls) -> None:
    limit, why = stability_limit(cls([nn.Parameter(torch.zeros(1))], lr=1e-3))
    assert limit is None and cls.__name__ in why


# ---------------------------------------------------------------- findings


def sgd(lr: float, **kw) -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr, **kw)


def as_json(finding) -> dict:
    return json.loads(json.dumps(finding.to_dict(), allow_nan=False))


def test_sharpness_beyond_twice_the_limit_is_an_error_with_the_numbers() -> None:
    c = Curvature(value=812.0, iterations=12, converged=True)
    (f,) = learning_rate_findings(c, sgd(0.01), np.array([]), Thresholds())
    assert (f.kind, f.severity, f.layer) == ("learning_rate_too_high", "error", None)
    assert "lambda_max = 812 exceeds 2/lr = 200 (lr = 0.01)" in f.message
    assert "2/lambda_max = 0.00246" in f.message  # 2 / 812
    ev = as_json(f)["evidence"]
    assert ev["lambda_max"] == 812.0 and ev["lr"] == 0.01 and ev["momentum"] == 0.0
    assert ev["limit"] == pytest.approx(200.0) and ev["max_stable_lr"] == pytest.approx(2 / 812)
    assert ev["iterations"] == 12 and ev["converged"] is True
    names = [x.name for x in f.fixes]
    assert names[0] == "lower_lr" and "adam" in names


def test_sharpness_just_over_the_limit_is_a_warning() -> None:
    # momentum 0.9, lr 0.1: limit 38; 50 is over it but under twice it (the catapult range).
    opt = sgd(0.1, momentum=0.9)
    (f,) = learning_rate_findings(Curvature(50.0, 20, False), opt, np.array([1.0, 0.9]), Thresholds())
    assert f.severity == "warning"
    assert "2(1+momentum)/lr = 38" in f.message and "momentum 0.9" in f.message
    assert as_json(f)["evidence"]["max_stable_lr"] == pytest.approx(3.8 / 50)


def test_no_finding_under_the_limit_or_without_one() -> None:
    assert learning_rate_findings(Curvature(150.0, 5, True), sgd(0.01), np.array([2.0, 1.5, 1.0]), Thresholds()) == []
    assert learning_rate_findings(Curvature(-900.0, 5, True), sgd(0.01), np.array([]), Thresholds()) == []
    adam = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=1.0)
    assert learning_rate_findings(Curvature(1e6, 5, True), adam, np.array([1.0, 0.8]), Thresholds()) == []
    assert learning_rate_findings(None, sgd(0.01), np.array([]), Thresholds()) == []


def test_nonfinite_run_is_an_error_for_any_optimizer() -> None:
    adam = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=1.0)
    losses = np.array([1.0, 3.0, 40.0, np.inf, np.nan, np.nan])
    (f,) = learning_rate_findings(None, adam, losses, Thresholds())
    assert (f.kind, f.severity) == ("learning_rate_too_high", "error")
    ev = as_json(f)["evidence"]  # allow_nan=False: no NaN or inf in the evidence
    assert ev["first_nonfinite_step"] == 3 and ev["initial_loss"] == 1.0 and ev["steps"] == 6
    assert "step 3" in f.message
    assert "adam" not in [x.name for x in f.fixes]  # it already is Adam


def test_growing_run_is_an_error_and_mild_growth_is_not() -> None:
    grown = np.array([1.0, 2.0, 5.0, 20.0, 30.0, 25.0, 40.0])
    (f,) = learning_rate_findings(None, sgd(0.5), grown, Thresholds())
    ev = as_json(f)["evidence"]
    assert f.severity == "error" and ev["final_loss"] == pytest.approx(25.0)  # median of the last five
    assert ev["first_nonfinite_step"] is None
    assert learning_rate_findings(None, sgd(0.5), np.array([1.0, 2.0, 5.0, 4.0, 5.0]), Thresholds()) == []
    # Negative losses (log-likelihoods) that rise a little: no blow-up.
    assert learning_rate_findings(None, sgd(0.5), np.array([-5.0, -3.0, -1.0]), Thresholds()) == []
    # A loss that is already bad before any step says nothing about the step size.
    assert learning_rate_findings(None, sgd(0.5), np.array([np.nan, np.nan]), Thresholds()) == []


def test_sharpness_and_divergence_merge_into_one_finding() -> None:
    losses = np.array([1.0, 5.0, 200.0, 1e5, np.nan])
    found = learning_rate_findings(Curvature(250.0, 9, True), sgd(0.01), losses, Thresholds())
    assert len(found) == 1
    f = found[0]
    assert f.severity == "error"  # 250 is under twice the limit, but the run diverged
    ev = as_json(f)["evidence"]
    assert ev["lambda_max"] == 250.0 and ev["first_nonfinite_step"] == 4 and ev["final_loss"] == "nan"
    assert "exceeds 2/lr = 200" in f.message and "non-finite" in f.message
    assert len({x.name for x in f.fixes}) == len(f.fixes)


# ---------------------------------------------------------------- acceptance: a real run on real data


def diabetes() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_diabetes(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean()) / y.std()
    return torch.tensor(x), torch.tensor(y)[:, None]


def diabetes_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 1)).double()


@pytest.mark.parametrize("factor", [3.0, 0.5])
def test_lr_beyond_the_limit_diverges_and_is_reported(factor: float) -> None:
    x, y = diabetes()
    loss_fn = nn.MSELoss()
    lam, _ = top_by_magnitude(full_hessian(diabetes_mlp(), x, y, loss_fn))
    assert lam > 0

    model = diabetes_mlp()
    curvature = hessian_top_eigenvalue(model, x, y, loss_fn)  # measured before training, as diagnose does
    assert rel(curvature.value, lam) < 1e-2
    opt = torch.optim.SGD(model.parameters(), lr=factor * 2 / lam)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        losses.append(loss.item())
        loss.backward()
        opt.step()
    run = np.array(losses)
    found = learning_rate_findings(curvature, opt, run, Thresholds())

    if factor > 1:
        assert not np.isfinite(run).all() or run[-1] > 10 * run[0]  # the run really diverged
        assert [(f.kind, f.severity) for f in found] == [("learning_rate_too_high", "error")]
        ev = as_json(found[0])["evidence"]
        assert ev["max_stable_lr"] == pytest.approx(2 / lam, rel=1e-2)
        assert ev["lr"] == pytest.approx(factor * 2 / lam)
    else:
        assert np.isfinite(run).all() and run[-1] < run[0]  # the run really converged
        assert found == []
