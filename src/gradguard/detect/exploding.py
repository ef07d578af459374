"""exploding_gradient: the gradient grows on its way back through depth, or over time."""

from __future__ import annotations

import numpy as np

from ..trace import Trace
from ._common import grad_rms, nanmedian
from .finding import Finding
from .fixes import BATCHNORM, CLIP, LOWER_LR, SMALLER_INIT
from .thresholds import Thresholds


def exploding_gradient(trace: Trace, th: Thresholds) -> list[Finding]:
    """Depth growth (vs the output-side layer) and growth over time of the total norm."""
    return _through_depth(trace, th) + _over_time(trace, th)


def _through_depth(trace: Trace, th: Thresholds) -> list[Finding]:
    rms, step = grad_rms(trace, th.window)
    measured = np.flatnonzero(~np.isnan(rms) & (rms > 0))
    if step is None or len(measured) < 2:
        return []
    out_layer = int(measured[-1])  # the layer nearest the loss, in registration order
    ratio = rms / rms[out_layer]
    high = np.flatnonzero(ratio > th.exploding_warning)
    if len(high) == 0:
        return []
    worst = int(high[np.argmax(ratio[high])])
    name = trace.layers[worst]
    return [
        Finding(
            kind="exploding_gradient",
            severity="error" if ratio[worst] > th.exploding_error else "warning",
            layer=name,
            step=step,
            message=(
                f"the gradient reaching {name} is {ratio[worst]:.1e} times the one at the "
                f"output layer {trace.layers[out_layer]}: it grows on its way back through depth"
            ),
            evidence={
                "ratio": float(ratio[worst]),
                "rms": float(rms[worst]),
                "reference_layer": trace.layers[out_layer],
                "reference_rms": float(rms[out_layer]),
                "affected": {trace.layers[i]: float(ratio[i]) for i in high},
            },
            fixes=(SMALLER_INIT, CLIP, BATCHNORM, LOWER_LR),
        )
    ]


def _over_time(trace: Trace, th: Thresholds) -> list[Finding]:
    norms = trace.metric("grad_norm")
    if norms.shape[0] <= th.growth_min_history:
        return []
    measured = ~np.all(np.isnan(norms), axis=1)
    total = np.sqrt(np.nansum(norms**2, axis=1))
    total[~measured] = np.nan
    steps = trace.steps
    for i in range(th.growth_min_history, len(total)):
        base = nanmedian(total[:i])
        if np.isfinite(total[i]) and base > 0 and total[i] > th.growth_warning * base:
            layer = int(np.nanargmax(norms[i]))
            return [
                Finding(
                    kind="exploding_gradient",
                    severity="error",
                    layer=None,
                    step=int(steps[i]),
                    message=(
                        f"the total gradient norm jumped to {total[i]:.2e}, {total[i] / base:.1e} "
                        f"times its median so far ({base:.2e}); largest in {trace.layers[layer]}"
                    ),
                    evidence={"total_norm": float(total[i]), "median_before": float(base),
                              "largest_layer": trace.layers[layer]},
                    fixes=(CLIP, LOWER_LR, BATCHNORM),
                )
            ]
    return []
