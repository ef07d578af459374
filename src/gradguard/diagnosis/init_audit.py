"""Initialisation audit: each layer's weight variance times fan-in against what its activation needs.

A layer ``y = W x`` with ``Var(W) * fan_in = v`` multiplies the second moment of its
input by ``v``, and the activation after it multiplies it back by ``1 / gain^2`` on
average (``gain = torch.nn.init.calculate_gain``: ReLU sqrt(2), tanh 5/3, linear 1).
So ``v`` should be about ``gain^2``-ish: 2 before a ReLU (He et al. 2015), 1 before
tanh/linear/SELU (LeCun; Xavier's ``2 / (fan_in + fan_out) * fan_in`` is 1 for a square
layer). The audit reports the ratio ``v / needed`` per layer and, over a plain chain of
layers, its product: the factor by which the forward signal's second moment (and the
back-propagated gradient's) is scaled from one end of the chain to the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..detect.finding import Finding
from ..detect.fixes import BATCHNORM, HE_INIT, RESIDUAL, SMALLER_INIT
from ..probe.layers import LayerIndex
from ..remedy.init import _act_of_module
from .profile import Profile

_AUDITED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Variance * fan_in of torch's default Linear/Conv init (kaiming_uniform with a = sqrt(5)): 1/3.
TORCH_DEFAULT = 1.0 / 3.0
# Beyond these the audit speaks up: one layer off by more than 10x in variance (3.2x in scale), or a chain whose
# compounded factor is beyond 1e3 (warning) / 1e6 (error) in second moment.
LAYER_WARNING, LAYER_ERROR = 10.0, 100.0
CHAIN_WARNING, CHAIN_ERROR = 1e3, 1e6
MIN_CHAIN = 4


@dataclass(frozen=True)
class LayerInit:
    """One audited layer: measured ``var * fan_in``, what its activation needs, and their ratio."""

    layer: str
    activation: str | None
    fan_in: int
    fan_out: int
    variance_fan_in: float
    needed: float
    scheme: str

    @property
    def ratio(self) -> float:
        return self.variance_fan_in / self.needed

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer, "activation": self.activation, "fan_in": self.fan_in, "fan_out": self.fan_out,
            "variance_fan_in": self.variance_fan_in, "needed": self.needed, "scheme": self.scheme,
            "ratio": self.ratio,
        }


def _needed(module: nn.Module | None) -> tuple[float, str]:
    """``var * fan_in`` the activation after a layer needs, and the name of the scheme that gives it."""
    act = _act_of_module(module) if module is not None else None
    if act is None or act.kind in ("linear", "selu"):
        return 1.0, "LeCun (1/fan_in)"
    if act.kind in ("relu", "leaky_relu"):
        slope = act.slope or 0.0
        return 2.0 / (1.0 + slope * slope), "He (2/fan_in)"
    return 1.0, "Xavier/LeCun (1/fan_in)"  # tanh, sigmoid: unit variance, in the linear regime of tanh


def audit(index: LayerIndex, profile: Profile) -> list[LayerInit]:
    """Audit every Linear/Conv layer that ran, in execution order."""
    out = []
    for i in profile.order:
        module = index.modules[i]
        if not isinstance(module, _AUDITED):
            continue
        w = module.weight.detach()
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(w)
        # Second moment around zero, as the schemes define it: a non-zero mean also scales the signal.
        v = float(torch.mean(w.to(torch.float64) ** 2)) * fan_in
        needed, scheme = _needed(profile.activation_modules[i] if profile.activation_modules else None)
        out.append(LayerInit(profile.names[i], profile.activation[i], fan_in, fan_out, v, needed, scheme))
    return out


def init_findings(audited: list[LayerInit], profile: Profile) -> list[Finding]:
    """bad_init_scale: single layers far off, and plain chains whose compounded scale is far off."""
    by_name = {a.layer: a for a in audited}
    found: list[Finding] = []
    flagged: set[str] = set()
    for a in audited:
        off = max(a.ratio, 1.0 / a.ratio) if a.ratio > 0 else math.inf
        if off < LAYER_WARNING:
            continue
        flagged.add(a.layer)
        direction = "larger" if a.ratio > 1 else "smaller"
        after = f"the {a.activation} after it" if a.activation else "a linear layer"
        found.append(Finding(
            kind="bad_init_scale",
            severity="error" if off >= LAYER_ERROR else "warning",
            layer=a.layer,
            message=(
                f"{a.layer}'s weights have variance x fan_in = {a.variance_fan_in:.3g}, {off:.3g}x {direction} than "
                f"the {a.needed:g} that {after} needs ({a.scheme}): this one layer scales the signal "
                f"and the gradient passing through it by about {math.sqrt(a.ratio):.3g}x"
            ),
            evidence=a.to_dict(),
            fixes=(SMALLER_INIT if a.ratio > 1 else HE_INIT, BATCHNORM),
        ))
    for chain in profile.chains():
        members = [by_name[profile.names[i]] for i in chain if profile.names[i] in by_name]
        # The last layer's scale compounds nothing after it: the product runs over the layers feeding another.
        inner = members[:-1]
        if len(inner) < MIN_CHAIN - 1 or any(m.layer in flagged for m in inner):
            continue
        factor = float(np.prod([m.ratio for m in inner]))
        off = max(factor, 1.0 / factor) if factor > 0 else math.inf
        if off < CHAIN_WARNING:
            continue
        typical = float(np.exp(np.mean(np.log([m.ratio for m in inner]))))
        v_typical = float(np.exp(np.mean(np.log([m.variance_fan_in for m in inner]))))
        first = inner[0]
        needs = sorted({f"{m.needed:g} ({m.scheme}, before {m.activation or 'nothing'})" for m in inner})
        shrinks = "shrinks" if factor < 1 else "grows"
        found.append(Finding(
            kind="bad_init_scale",
            severity="error" if off >= CHAIN_ERROR else "warning",
            layer=first.layer,
            message=(
                f"the {len(members)} chained layers from {first.layer} to {members[-1].layer} have variance x fan_in "
                f"about {v_typical:.3g} where {', '.join(needs)} is needed: the signal's second "
                f"moment {shrinks} by {typical:.3g} per layer, {factor:.2g} over the chain, and the back-propagated "
                "gradient with it"
            ),
            evidence={
                "layers": [m.layer for m in members],
                "per_layer_ratio": typical,
                "compounded": factor,
                "variance_fan_in": [m.variance_fan_in for m in inner],
                "needed": [m.needed for m in inner],
            },
            fixes=(HE_INIT, BATCHNORM, RESIDUAL),
        ))
    return found
