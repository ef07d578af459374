"""Theory beside measurement: mean-field predictions for the plain MLP chain of a model, and what was measured.

For a chain of square ``nn.Linear`` layers with one elementwise activation, mean-field
theory (Poole et al. 2016, Schoenholz et al. 2017) predicts the pre-activations' second
moment q* and the per-layer factor chi_1 of the back-propagated gradient's squared norm
from the weight and bias variances alone. Measured: the mean square of the last hidden
layer's output, and the geometric mean of ``||dL/dy_l||^2 / ||dL/dy_{l+1}||^2`` over the
second half of the chain (the first half is where q is still converging to q*).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..probe.layers import LayerIndex
from ..theory import derivative_bound, mean_field
from .jsonsafe import plain
from .profile import Profile

MIN_HIDDEN = 3


def theory_name(module: nn.Module | None) -> str | None:
    """The mean-field name of an activation module, or None where the theory has no exact match."""
    if module is None:
        return "linear"
    if isinstance(module, nn.LeakyReLU):
        return "leaky_relu" if module.negative_slope == 0.01 else None
    if isinstance(module, nn.ELU):
        return "elu" if module.alpha == 1.0 else None
    if isinstance(module, nn.GELU):
        return "gelu" if module.approximate == "none" else None
    exact = {nn.Tanh: "tanh", nn.ReLU: "relu", nn.Sigmoid: "sigmoid", nn.SiLU: "silu"}
    return exact.get(type(module))


@dataclass(frozen=True)
class Prediction:
    """Mean-field prediction and measurement for the longest plain chain of equal-width hidden layers."""

    activation: str
    layers: list[str]
    sigma_w2: float
    sigma_b2: float
    q_star: float
    chi1: float
    xi_q: float
    xi_c: float
    phase: str
    measured_q: float
    measured_chi1: float
    predicted_ratio: float  # RMS of dL/dy at the first hidden layer over the last: chi1 ** ((n - 1) / 2)
    measured_ratio: float
    derivative_product: float  # max|phi'| ** (n - 1): the bound from the activation's derivative alone

    @property
    def depth(self) -> int:
        return len(self.layers)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["depth"] = self.depth
        return plain(d)

    def __str__(self) -> str:
        return (
            f"mean-field theory for {self.depth} {self.activation} layers (sigma_w^2 = {self.sigma_w2:.3g}, "
            f"sigma_b^2 = {self.sigma_b2:.3g}, {self.phase} phase): chi_1 = {self.chi1:.4g} per layer "
            f"(measured {self.measured_chi1:.4g}), q* = {self.q_star:.4g} (measured {self.measured_q:.4g}); "
            f"gradient first/last {self.predicted_ratio:.2e} predicted, {self.measured_ratio:.2e} measured"
        )


def _hidden_run(index: LayerIndex, profile: Profile) -> tuple[list[int], str] | None:
    """The longest run of chained, square Linear layers followed by the same supported activation."""
    best: tuple[list[int], str] | None = None
    for chain in profile.chains():
        run: list[int] = []
        name: str | None = None
        for i in chain + [-1]:
            m = index.modules[i] if i >= 0 else None
            act = profile.activation_modules[i] if i >= 0 else None
            this = theory_name(act) if isinstance(m, nn.Linear) and m.in_features == m.out_features else None
            if this is not None and (not run or this == name):
                run.append(i)
                name = this
                continue
            if name is not None and len(run) >= MIN_HIDDEN and (best is None or len(run) > len(best[0])):
                best = (run, name)
            run = [i] if this is not None else []
            name = this
    return best


def predict(index: LayerIndex, profile: Profile) -> Prediction | None:
    """The prediction for the model's longest plain MLP chain; None when it has none of at least 3 layers."""
    found = _hidden_run(index, profile)
    if found is None:
        return None
    run, act = found
    linears = [m for m in (index.modules[i] for i in run) if isinstance(m, nn.Linear)]
    w2 = [float(torch.mean(m.weight.detach().to(torch.float64) ** 2)) * m.in_features for m in linears]
    b2 = [
        float(torch.mean(m.bias.detach().to(torch.float64) ** 2)) if m.bias is not None else 0.0
        for m in linears
    ]
    sigma_w2, sigma_b2 = float(np.mean(w2)), float(np.mean(b2))
    mf = mean_field(act, sigma_w2, sigma_b2)
    g = profile.grad_ms[run]
    with np.errstate(divide="ignore", invalid="ignore"):
        factors = g[:-1] / g[1:]
    half = factors[len(factors) // 2:]
    half = half[np.isfinite(half) & (half > 0)]
    measured_chi1 = float(np.exp(np.mean(np.log(half)))) if len(half) else math.nan
    n = len(run)
    with np.errstate(divide="ignore", invalid="ignore"):
        measured_ratio = float(np.sqrt(g[0] / g[-1]))
    return Prediction(
        activation=act,
        layers=[index.names[i] for i in run],
        sigma_w2=sigma_w2,
        sigma_b2=sigma_b2,
        q_star=mf.q_star,
        chi1=mf.chi1,
        xi_q=mf.xi_q,
        xi_c=mf.xi_c,
        phase=mf.phase,
        measured_q=float(profile.out_ms[run[-1]]),
        measured_chi1=measured_chi1,
        predicted_ratio=float(mf.chi1 ** ((n - 1) / 2)),
        measured_ratio=measured_ratio,
        derivative_product=float(derivative_bound(act) ** (n - 1)),
    )
