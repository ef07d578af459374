"""vanishing_gradient: a layer's gradient is orders of magnitude below the best-flowing layer's."""

from __future__ import annotations

import numpy as np

from ..trace import Trace
from ._common import grad_rms
from .finding import Finding
from .fixes import BATCHNORM, RELU_HE, RESIDUAL, XAVIER
from .thresholds import Thresholds


def vanishing_gradient(trace: Trace, th: Thresholds) -> list[Finding]:
    """One finding naming the worst layer, with every affected layer in the evidence."""
    rms, step = grad_rms(trace, th.window)
    if step is None or np.all(np.isnan(rms)) or not np.nanmax(rms) > 0:
        return []
    best = int(np.nanargmax(rms))
    ratio = rms / rms[best]
    low = np.flatnonzero(ratio < th.vanishing_warning)
    if len(low) == 0:
        return []
    worst = int(low[np.argmin(ratio[low])])
    severity = "error" if ratio[worst] < th.vanishing_error else "warning"
    name = trace.layers[worst]
    return [
        Finding(
            kind="vanishing_gradient",
            severity=severity,
            layer=name,
            step=step,
            message=(
                f"the gradient reaching {name} is {ratio[worst]:.1e} of the one reaching "
                f"{trace.layers[best]} (per-element RMS {rms[worst]:.2e} vs {rms[best]:.2e}); "
                f"{len(low)} layer(s) are below {th.vanishing_warning:g}, so they barely learn"
            ),
            evidence={
                "ratio": float(ratio[worst]),
                "rms": float(rms[worst]),
                "reference_layer": trace.layers[best],
                "reference_rms": float(rms[best]),
                "affected": {trace.layers[i]: float(ratio[i]) for i in low},
                "window": th.window,
            },
            fixes=(RELU_HE, BATCHNORM, RESIDUAL, XAVIER),
        )
    ]
