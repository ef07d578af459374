"""saturated_activation and dead_units: read from the sampled activation statistics."""

from __future__ import annotations

import numpy as np

from ..trace import Trace
from ._common import last_measured
from .finding import Finding, Fix
from .fixes import BATCHNORM, BIAS_RESET, HE_INIT, LEAKY, NORMALISE_INPUT, RELU_HE, XAVIER
from .thresholds import Thresholds


def _per_layer(
    trace: Trace, metric: str, warn: float, err: float, kind: str, what: str, fixes: tuple[Fix, ...]
) -> list[Finding]:
    value, at = last_measured(trace.metric(metric), trace.steps)
    out = []
    for j in np.flatnonzero(np.nan_to_num(value, nan=-1.0) >= warn):
        name = trace.layers[int(j)]
        out.append(
            Finding(
                kind=kind,
                severity="error" if value[j] >= err else "warning",
                layer=name,
                step=int(at[j]),
                message=what.format(frac=f"{value[j]:.0%}", name=name),
                evidence={metric: float(value[j])},
                fixes=fixes,
            )
        )
    return out


def saturated_activation(trace: Trace, th: Thresholds) -> list[Finding]:
    """Layers whose sigmoid/tanh-like activation sits in its flat tails."""
    return _per_layer(
        trace, "act_saturated", th.saturation_warning, th.saturation_error, "saturated_activation",
        "{frac} of the activations of {name} are saturated (derivative near 0), so little gradient passes",
        (NORMALISE_INPUT, XAVIER, BATCHNORM, RELU_HE),
    )


def dead_units(trace: Trace, th: Thresholds) -> list[Finding]:
    """Layers whose rectifier leaves units inactive for every sample of a window of batches."""
    return _per_layer(
        trace, "act_dead", th.dead_warning, th.dead_error, "dead_units",
        "{frac} of the units of {name} are dead: inactive for every sample of the last sampled batches",
        (BIAS_RESET, LEAKY, HE_INIT),
    )
