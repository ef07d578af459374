"""A Diagnosis as readable plain text: findings first, then what was measured."""

from __future__ import annotations

import math
import textwrap
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .run import Diagnosis


def _g(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.3g}"


def render_text(d: Diagnosis) -> str:
    """The whole diagnosis as text: findings with their fixes, then theory, curvature, time, inputs, fixes tried."""
    s = d.settings
    out = [
        f"gradguard diagnosis of {s.get('model', 'the model')}: {s['layers']} layers, {s['parameters']:,} parameters; "
        f"{s['steps']} steps of {s['optimizer']}",
    ]
    if not d.findings:
        out.append("no findings: gradients flow at initialisation and through the short run")
    for n, f in enumerate(d.findings, 1):
        where = f" in {f.layer}" if f.layer else ""
        out.append(f"\n{n}. [{f.severity}] {f.kind}{where}")
        out.append(textwrap.indent(textwrap.fill(f.message, 100), "   "))
        for fix in f.fixes[:3]:
            out.append(f"   fix: {fix.title}")
            out.append(textwrap.indent(fix.code, "        "))
    out.append("")
    ratio = d.gradient_ratio()
    out.append(f"gradient first/last layer at initialisation (RMS of dL/dy): {_g(ratio)}")
    if d.theory is not None:
        out.append(str(d.theory))
    if d.curvature is not None:
        limit, rule = d.stability
        out.append(
            f"largest Hessian eigenvalue: {d.curvature.value:.4g}"
            + (f" (stable below {limit:.4g}: {rule})" if limit is not None else f" ({rule})")
        )
    else:
        out.append(f"largest Hessian eigenvalue: {d.curvature_note}")
    for t in d.through_time:
        out.append(f"gradient through time in {t.layer} ({t.kind}): ||dL/dh_0|| / ||dL/dh_T|| = {_g(t.ratio)}")
    if d.inputs is not None:
        i = d.inputs
        out.append(f"inputs {i.shape}: RMS {_g(i.rms)}, feature RMS {_g(i.feature_rms_min)} to {_g(i.feature_rms_max)}")
    if len(d.losses):
        finite = np.isfinite(d.losses)
        end = f"{d.losses[-1]:.4g}" if finite[-1] else "non-finite"
        out.append(f"loss: {d.losses[0]:.4g} at step 0, {end} at step {len(d.losses) - 1}")
    if d.fix_results:
        from .whatif import format_fix_table

        out.append("\nfixes tried (each on a copy of the model, same data and seed), best first:")
        out.append(textwrap.indent(format_fix_table(d.fix_results, d.settings["steps"]), "  "))
    return "\n".join(out)
