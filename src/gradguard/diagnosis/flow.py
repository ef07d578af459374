"""Gradient flow through depth at initialisation: the back-propagated gradient dL/dy, layer by layer.

Weight gradients ``dL/dW = dL/dy x^T`` can look level across depth while the signal and
the back-propagated gradient both shrink (Glorot & Bengio 2010): the product stays flat
as each factor vanishes. So diagnose judges flow on dL/dy, per-element RMS, with the
same thresholds the training-time rules use on weight gradients.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from ..detect.finding import Finding
from ..detect.fixes import BATCHNORM, CLIP, HE_INIT, RELU_HE, RESIDUAL, SMALLER_INIT, XAVIER
from ..detect.thresholds import Thresholds
from .prediction import Prediction
from .profile import Profile

# Upper bounds of |phi'| for the saturating activations the seeds discuss.
_DERIVATIVE_BOUND = {"Sigmoid": 0.25, "Tanh": 1.0, "Hardsigmoid": 1 / 6, "Softsign": 1.0}


def _cause(profile: Profile, between: list[int], prediction: Prediction | None) -> str:
    """One sentence on why the gradient changes between two layers."""
    acts = Counter(a for a in (profile.activation[i] for i in between) if a)
    parts = []
    if acts:
        name, count = acts.most_common(1)[0]
        bound = _DERIVATIVE_BOUND.get(name)
        if bound is not None and bound < 1:
            parts.append(
                f"the {count} {name} layers on the way each scale it by at most {bound:g} "
                f"({bound:g}^{count} = {bound**count:.1e}, before the weights are counted)"
            )
    if prediction is not None and set(prediction.layers) & {profile.names[i] for i in between}:
        parts.append(
            f"mean-field theory predicts {prediction.chi1:.3g} per layer in squared norm for {prediction.activation} "
            f"with sigma_w^2 = {prediction.sigma_w2:.3g} ({prediction.phase} phase): {prediction.predicted_ratio:.1e} "
            f"across the chain, measured {prediction.measured_ratio:.1e}"
        )
    return "; ".join(parts)


def flowing(profile: Profile, vanishing_error: float = Thresholds.vanishing_error) -> list[int]:
    """The layers whose gradient the depth rules compare, in execution order.

    An exactly zero gradient is usually structural: a block behind a zero-initialised gate
    (SkipInit's alpha) or units that are all inactive (the dead_units rule names them); such
    layers are left out. The exception is underflow: when the gradients that are not zero
    already fall below ``vanishing_error`` of the largest, zeros at the input end mean the
    gradient vanished past the floating-point range, and they are kept.
    """
    g = profile.grad_ms
    measured = [i for i in profile.order if np.isfinite(g[i])]
    positive = [g[i] for i in measured if g[i] > 0]
    if not positive:
        return measured
    underflow = min(positive) / max(positive) < vanishing_error**2  # mean squares: the ratio of RMS squared
    first = next(k for k, i in enumerate(measured) if g[i] > 0)
    return [i for k, i in enumerate(measured) if g[i] > 0 or (underflow and k < first)]


def flow_findings(profile: Profile, th: Thresholds, prediction: Prediction | None = None) -> list[Finding]:
    """vanishing_gradient / exploding_gradient from the back-propagated gradient's RMS across depth."""
    order = flowing(profile, th.vanishing_error)
    if len(order) < 2:
        return []
    rms = np.sqrt(profile.grad_ms[order])
    found: list[Finding] = []
    evidence_base = {"measure": "RMS of dL/dy (the gradient reaching each layer's output) at initialisation"}
    if np.nanmax(rms) > 0:
        best = int(np.argmax(rms))
        ratio = rms / rms[best]
        low = np.flatnonzero(ratio < th.vanishing_warning)
        if len(low):
            worst = int(low[np.argmin(ratio[low])])
            name, ref = profile.names[order[worst]], profile.names[order[best]]
            cause = _cause(profile, order[min(worst, best):max(worst, best) + 1], prediction)
            if ratio[worst] == 0:
                zero = ("it is exactly zero: it fell below the floating-point range on the way down, or every path "
                        "back is blocked by units that are all inactive")
                cause = f"{zero}; {cause}" if cause else zero
            found.append(Finding(
                kind="vanishing_gradient",
                severity="error" if ratio[worst] < th.vanishing_error else "warning",
                layer=name,
                step=0,
                message=(
                    f"the gradient reaching {name} is {ratio[worst]:.1e} of the one reaching {ref} "
                    f"(RMS {rms[worst]:.2e} vs {rms[best]:.2e}) at initialisation"
                    + (f": {cause}" if cause else "")
                    + f"; {len(low)} layer(s) are below {th.vanishing_warning:g} and barely learn"
                ),
                evidence={
                    **evidence_base,
                    "ratio": float(ratio[worst]),
                    "rms": float(rms[worst]),
                    "reference_layer": ref,
                    "reference_rms": float(rms[best]),
                    "affected": {profile.names[order[i]]: float(ratio[i]) for i in low},
                    **({"theory": prediction.to_dict()} if prediction is not None else {}),
                },
                fixes=_vanishing_fixes(profile, order),
            ))
    last = len(order) - 1
    if len(order) >= 2 and rms[last] > 0:
        ratio = rms / rms[last]
        high = np.flatnonzero(ratio > th.exploding_warning)
        if len(high):
            worst = int(high[np.argmax(ratio[high])])
            name, ref = profile.names[order[worst]], profile.names[order[last]]
            cause = _cause(profile, order[worst:], prediction)
            found.append(Finding(
                kind="exploding_gradient",
                severity="error" if ratio[worst] > th.exploding_error else "warning",
                layer=name,
                step=0,
                message=(
                    f"the gradient reaching {name} is {ratio[worst]:.1e} times the one at the output layer {ref} "
                    "at initialisation: it grows on its way back through depth" + (f": {cause}" if cause else "")
                ),
                evidence={
                    **evidence_base,
                    "ratio": float(ratio[worst]),
                    "rms": float(rms[worst]),
                    "reference_layer": ref,
                    "reference_rms": float(rms[last]),
                    "affected": {profile.names[order[i]]: float(ratio[i]) for i in high},
                    **({"theory": prediction.to_dict()} if prediction is not None else {}),
                },
                fixes=(SMALLER_INIT, BATCHNORM, CLIP, RESIDUAL),
            ))
    return found


def _vanishing_fixes(profile: Profile, order: list[int]) -> tuple:
    acts = {profile.activation[i] for i in order}
    if acts & {"Sigmoid", "Tanh", "Hardsigmoid", "Softsign"}:
        return (RELU_HE, BATCHNORM, RESIDUAL, XAVIER)
    return (HE_INIT, BATCHNORM, RESIDUAL)
