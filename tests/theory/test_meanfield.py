"""Mean-field theory and derivative bounds: closed forms, published values, Monte Carlo and a real random MLP."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradguard.theory import (
    ACTIVATIONS,
    MeanField,
    critical_sigma_w2,
    derivative_bound,
    gradient_factor,
    mean_field,
    product_bound,
)


def _mc_tanh(sigma_w2: float, sigma_b2: float, n: int = 2_000_000) -> tuple[float, float]:
    """q* by iterating the length map with Monte Carlo expectations, and chi1 there (no quadrature)."""
    z = np.random.default_rng(1234).standard_normal(n)
    q = 1.0
    for _ in range(200):
        q = sigma_w2 * float(np.mean(np.tanh(math.sqrt(q) * z) ** 2)) + sigma_b2
    chi1 = sigma_w2 * float(np.mean((1.0 - np.tanh(math.sqrt(q) * z) ** 2) ** 2))
    return q, chi1


# --- the order-to-chaos boundary ----------------------------------------------------------------------------------


def test_critical_tanh_no_bias_is_one():
    assert critical_sigma_w2("tanh", 0.0) == pytest.approx(1.0, rel=1e-4)


def test_critical_relu_is_he():
    assert critical_sigma_w2("relu", 0.0) == pytest.approx(2.0, rel=1e-4)


def test_critical_rises_with_bias_and_chi1_is_one_there():
    w = critical_sigma_w2("tanh", 0.05)
    assert w > 1.0 + 0.1
    assert abs(mean_field("tanh", w, 0.05).chi1 - 1.0) <= 1e-6
    assert critical_sigma_w2("tanh", 0.2) > w  # Poole et al.: the boundary keeps rising with sigma_b2


def test_published_tanh_values():
    # Poole et al. 2016 / Schoenholz et al. 2017, as quoted in issue 4: tanh, sigma_b2 = 0.05
    assert critical_sigma_w2("tanh", 0.05) == pytest.approx(1.761, abs=0.005)
    mf = mean_field("tanh", 1.5, 0.05)
    assert mf.q_star == pytest.approx(0.4180, abs=5e-5)
    assert mf.chi1 == pytest.approx(0.9386, abs=5e-5)
    assert mf.phase == "ordered"


# --- closed forms -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sigma_w2", "sigma_b2"), [(1.0, 0.1), (1.5, 0.05), (0.5, 0.3), (1.9, 0.01)])
def test_relu_closed_form(sigma_w2, sigma_b2):
    # E[relu(sqrt(q) z)^2] = q/2 and E[relu'(.)^2] = 1/2
    mf = mean_field("relu", sigma_w2, sigma_b2)
    assert mf.q_star == pytest.approx(sigma_b2 / (1.0 - sigma_w2 / 2.0), rel=1e-9)
    assert mf.chi1 == pytest.approx(sigma_w2 / 2.0, rel=1e-12)
    assert mf.xi_c == pytest.approx(-1.0 / math.log(sigma_w2 / 2.0), rel=1e-9)
    # the length map of ReLU is linear in q with slope sigma_w2 / 2
    assert mf.chi_q == pytest.approx(sigma_w2 / 2.0, rel=1e-9)
    assert mf.xi_q == pytest.approx(-1.0 / math.log(sigma_w2 / 2.0), rel=1e-9)


def test_relu_above_he_diverges_to_infinity():
    mf = mean_field("relu", 2.5, 0.0)
    assert mf.q_star == math.inf
    assert mf.chi1 == pytest.approx(1.25, rel=1e-12)
    assert mf.phase == "chaotic"


@pytest.mark.parametrize(("sigma_w2", "sigma_b2"), [(0.3, 0.2), (0.9, 0.05), (0.5, 1.0)])
def test_linear_closed_form(sigma_w2, sigma_b2):
    mf = mean_field("linear", sigma_w2, sigma_b2)
    assert mf.chi1 == sigma_w2
    assert mf.q_star == pytest.approx(sigma_b2 / (1.0 - sigma_w2), rel=1e-9)


def test_tanh_no_bias_ordered_signal_dies():
    mf = mean_field("tanh", 0.5, 0.0)
    assert mf.q_star == 0.0
    assert mf.chi1 == pytest.approx(0.5, rel=1e-9)  # tanh'(0)^2 = 1


def test_chaotic_phase_has_correlation_below_one():
    mf = mean_field("tanh", 4.0, 0.05)
    assert mf.phase == "chaotic"
    assert 0.0 <= mf.c_star < 1.0
    assert 0.0 < mf.xi_c < math.inf


def test_xi_c_infinite_at_the_boundary():
    w = critical_sigma_w2("tanh", 0.05)
    assert mean_field("tanh", w, 0.05).xi_c > 1e4
    assert mean_field("tanh", 1.0, 0.0).xi_c == math.inf


def test_gradient_factor_is_chi1_to_the_depth():
    chi1 = mean_field("tanh", 1.5, 0.05).chi1
    assert gradient_factor("tanh", 1.5, 0.05, 10) == pytest.approx(chi1**10, rel=1e-12)
    mf = mean_field("relu", 1.0, 0.1, depth=4)
    assert mf.depth == 4
    assert mf.gradient_factor == pytest.approx(0.5**4, rel=1e-12)
    assert mean_field("relu", 1.0, 0.1).gradient_factor is None


# --- callables, Monte Carlo, a real network -----------------------------------------------------------------------


@pytest.mark.parametrize(("sigma_w2", "sigma_b2"), [(1.5, 0.05), (4.0, 0.1), (0.8, 0.0)])
def test_callable_matches_name(sigma_w2, sigma_b2):
    named = mean_field("tanh", sigma_w2, sigma_b2)
    fn = mean_field(np.tanh, sigma_w2, sigma_b2)
    assert fn.activation == "tanh"
    for field in ("q_star", "chi1"):
        assert getattr(fn, field) == pytest.approx(getattr(named, field), rel=1e-6, abs=1e-12)
    assert fn.xi_q == pytest.approx(named.xi_q, rel=1e-5)  # phi'' by central differences


def test_every_named_activation_matches_its_torch_callable():
    from torch.nn import functional as F

    torch_fns = {
        "tanh": torch.tanh,
        "relu": F.relu,
        "sigmoid": torch.sigmoid,
        "linear": lambda t: t,
        "erf": torch.erf,
        "gelu": F.gelu,
        "silu": F.silu,
        "elu": F.elu,
        "leaky_relu": F.leaky_relu,
    }
    assert set(torch_fns) == set(ACTIVATIONS)
    for name, f in torch_fns.items():

        def fn(x, f=f):
            return f(torch.from_numpy(np.asarray(x, dtype=np.float64))).numpy()

        a, b = mean_field(name, 1.3, 0.1), mean_field(fn, 1.3, 0.1)
        assert b.q_star == pytest.approx(a.q_star, rel=1e-6), name
        # kinks (relu, leaky_relu, elu) are smoothed by the finite differences at a handful of nodes only
        assert b.chi1 == pytest.approx(a.chi1, rel=1e-3), name


def test_monte_carlo_tanh():
    mf = mean_field("tanh", 1.76, 0.05)
    q_mc, chi1_mc = _mc_tanh(1.76, 0.05)
    assert mf.q_star == pytest.approx(q_mc, rel=0.01)
    assert mf.chi1 == pytest.approx(chi1_mc, rel=0.01)


def test_random_tanh_mlp_reaches_q_star():
    # One width-1000 network's second moment scatters by ~2.5% (its weights are shared by the whole batch), so
    # average over 8 independent networks (~1%), leaving the 5% tolerance for the theory.
    sigma_w2, sigma_b2, width, depth, batch, nets = 1.5, 0.05, 1000, 10, 4, 8
    g = torch.Generator().manual_seed(0)
    moments = []
    for _ in range(nets):
        h = torch.randn(batch, width, generator=g, dtype=torch.float64)  # pre-activations with q0 = 1
        for _ in range(depth):
            w = torch.randn(width, width, generator=g, dtype=torch.float64) * math.sqrt(sigma_w2 / width)
            b = torch.randn(width, generator=g, dtype=torch.float64) * math.sqrt(sigma_b2)
            h = torch.tanh(h) @ w.T + b
        moments.append(float(h.pow(2).mean()))
    q_star = mean_field("tanh", sigma_w2, sigma_b2).q_star
    assert float(np.mean(moments)) == pytest.approx(q_star, rel=0.05)


# --- bounds -------------------------------------------------------------------------------------------------------


def test_derivative_bounds():
    assert derivative_bound("sigmoid") == pytest.approx(0.25, abs=1e-6)
    assert derivative_bound("tanh") == pytest.approx(1.0, abs=1e-6)
    assert derivative_bound("relu") == pytest.approx(1.0, abs=1e-6)
    assert derivative_bound("erf") == pytest.approx(2.0 / math.sqrt(math.pi), abs=1e-6)
    assert derivative_bound(lambda x: 1.0 / (1.0 + np.exp(-x))) == pytest.approx(0.25, abs=1e-6)
    assert derivative_bound(lambda x: 3.0 * np.sin(x)) == pytest.approx(3.0, abs=1e-6)


def test_product_bounds():
    assert product_bound("sigmoid", 10) == pytest.approx(0.25**10, rel=1e-6)
    assert product_bound("sigmoid", 10) == pytest.approx(9.5e-7, rel=0.01)
    assert product_bound(None, 5, factor=0.5) == pytest.approx(0.03125, rel=1e-12)


# --- errors -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: mean_field("tanh", 0.0), ValueError, "sigma_w2"),
        (lambda: mean_field("tanh", -1.0), ValueError, "sigma_w2"),
        (lambda: mean_field("tanh", float("nan")), ValueError, "sigma_w2"),
        (lambda: mean_field("tanh", 1.0, -0.1), ValueError, "sigma_b2"),
        (lambda: mean_field("tanh", 1.0, 0.0, depth=0), ValueError, "depth"),
        (lambda: mean_field("tanh", 1.0, 0.0, depth=2.5), TypeError, "depth"),
        (lambda: mean_field("swish_x", 1.0), ValueError, "unknown activation 'swish_x'.*tanh, relu"),
        (lambda: mean_field(3, 1.0), TypeError, "activation"),
        (lambda: mean_field(lambda x: x.sum(), 1.0), ValueError, "elementwise"),
        (lambda: critical_sigma_w2("tanh", -1.0), ValueError, "sigma_b2"),
        (lambda: gradient_factor("tanh", 1.0, 0.0, 0), ValueError, "depth"),
        (lambda: product_bound("sigmoid", 0), ValueError, "depth"),
        (lambda: product_bound("sigmoid", 3, factor=0.5), ValueError, "not both"),
        (lambda: product_bound(None, 3), ValueError, "factor"),
        (lambda: product_bound(None, 3, factor=-1.0), ValueError, "factor"),
        (lambda: derivative_bound("nope"), ValueError, "unknown activation"),
    ],
)
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_result_is_frozen():
    mf = mean_field("tanh", 1.0, 0.1)
    assert isinstance(mf, MeanField)
    with pytest.raises(AttributeError):
        mf.q_star = 2.0  # type: ignore[misc]
