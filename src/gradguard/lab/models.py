"""Models the cases share: plain MLPs with a chosen activation, width, depth and initialisation."""

from __future__ import annotations

import math

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU, "linear": nn.Identity, "gelu": nn.GELU,
    "leaky_relu": nn.LeakyReLU, "elu": nn.ELU, "selu": nn.SELU, "silu": nn.SiLU,
}


def mlp(
    widths: list[int],
    activation: str = "relu",
    *,
    sigma_w2: float | None = None,
    sigma_b2: float = 0.0,
    init: str | None = None,
    seed: int = 0,
) -> nn.Sequential:
    """``Linear(widths[i], widths[i+1])`` layers with ``activation`` between them (not after the last).

    Initialisation: PyTorch's default, or ``init`` (a scheme of :func:`gradguard.init_`), or
    ``sigma_w2``: weights ``N(0, sigma_w2 / fan_in)`` and biases ``N(0, sigma_b2)`` as in the
    mean-field papers. Seeded: the same seed gives the same weights.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; known: {sorted(ACTIVATIONS)}")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        lin = nn.Linear(a, b)
        if sigma_w2 is not None:
            with torch.no_grad():
                lin.weight.normal_(0.0, math.sqrt(sigma_w2 / a), generator=g)
                if sigma_b2 > 0:
                    lin.bias.normal_(0.0, math.sqrt(sigma_b2), generator=g)
                else:
                    lin.bias.zero_()
        layers.append(lin)
        if i < len(widths) - 2:
            layers.append(ACTIVATIONS[activation]())
    model = nn.Sequential(*layers)
    if init is not None:
        from ..remedy.init import init_

        init_(model, init)
    return model
