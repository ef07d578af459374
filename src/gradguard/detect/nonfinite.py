"""nonfinite: the first step, and the layer, where NaN or inf appeared."""

from __future__ import annotations

import numpy as np

from ..trace import Trace
from .finding import Finding
from .fixes import CLIP, LOWER_LR, SKIP_NONFINITE
from .thresholds import Thresholds


def nonfinite(trace: Trace, th: Thresholds) -> list[Finding]:
    """A finding for the first non-finite gradient and one for the first non-finite loss."""
    out: list[Finding] = []
    steps = trace.steps
    counts = trace.metric("grad_nonfinite")
    bad = np.nan_to_num(counts, nan=0.0) > 0
    rows = np.flatnonzero(bad.any(axis=1))
    if len(rows):
        r = int(rows[0])
        cols = np.flatnonzero(bad[r])
        first = trace.layers[int(cols[0])]
        out.append(
            Finding(
                kind="nonfinite",
                severity="error",
                layer=first,
                step=int(steps[r]),
                message=(
                    f"{int(counts[r, cols[0]])} non-finite gradient value(s) in {first} at step "
                    f"{int(steps[r])}" + (f", and in {len(cols) - 1} other layer(s)" if len(cols) > 1 else "")
                ),
                evidence={"counts": {trace.layers[int(c)]: int(counts[r, c]) for c in cols},
                          "steps_affected": int(len(rows))},
                fixes=(SKIP_NONFINITE, CLIP, LOWER_LR),
            )
        )
    loss = trace.loss
    lbad = np.flatnonzero(trace.loss_given & ~np.isfinite(loss))
    if len(lbad):
        r = int(lbad[0])
        out.append(
            Finding(
                kind="nonfinite",
                severity="error",
                layer=None,
                step=int(steps[r]),
                message=f"the loss is {loss[r]} at step {int(steps[r])}",
                evidence={"loss": str(loss[r]), "steps_affected": int(len(lbad))},
                fixes=(SKIP_NONFINITE, LOWER_LR, CLIP),
            )
        )
    return out

