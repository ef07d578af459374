"""A Diagnosis as a self-contained HTML page: findings, the gradient profile beside theory, and every measurement."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .jsonsafe import plain

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .run import Diagnosis


def _profile_figure(d: Diagnosis) -> Figure:
    """RMS of dL/dy and of the output, layer by layer in execution order, with the mean-field prediction."""
    from ..report.html import new_figure

    p = d.profile
    order = p.order
    fig = new_figure(7.0, 3.6)
    ax = fig.add_subplot()
    x = np.arange(len(order))
    grad = np.sqrt(p.grad_ms[order])
    out = np.sqrt(p.out_ms[order])
    ax.semilogy(x, np.where(grad > 0, grad, np.nan), "o-", ms=3, label="gradient reaching the layer (RMS of dL/dy)")
    ax.semilogy(x, np.where(out > 0, out, np.nan), "s--", ms=3, alpha=0.7, label="layer output (RMS)")
    if d.theory is not None:
        pos = [order.index(p.names.index(name)) for name in d.theory.layers]
        last = grad[pos[-1]]
        k = np.arange(len(pos))[::-1]  # layers below the last hidden one
        ax.semilogy(pos, last * d.theory.chi1 ** (k / 2), ":", color="k",
                    label=f"mean-field prediction (chi_1 = {d.theory.chi1:.3g})")
    ax.set_xlabel("layer, in the order the forward pass runs them")
    ax.set_ylabel("RMS")
    ax.legend(fontsize=8)
    ax.grid(True, which="major", alpha=0.3)
    return fig


def _loss_figure(d: Diagnosis) -> Figure:
    from ..report.html import new_figure

    fig = new_figure(7.0, 2.8)
    ax = fig.add_subplot()
    finite = np.where(np.isfinite(d.losses), d.losses, np.nan)
    ax.plot(np.arange(len(finite)), finite, "o-", ms=3)
    bad = np.flatnonzero(~np.isfinite(d.losses))
    if len(bad):
        ax.axvline(bad[0], color="r", ls="--", label=f"non-finite loss at step {bad[0]}")
        ax.legend(fontsize=8)
    ax.set_xlabel("step of the short run")
    ax.set_ylabel("training loss")
    ax.grid(True, alpha=0.3)
    return fig


def _time_figure(d: Diagnosis) -> Figure:
    from ..report.html import new_figure

    fig = new_figure(7.0, 2.8)
    ax = fig.add_subplot()
    for t in d.through_time:
        if len(t.norms):
            ax.semilogy(np.arange(len(t.norms)), np.where(t.norms > 0, t.norms, np.nan), label=f"{t.layer} ({t.kind})")
    ax.set_xlabel("time step t (0: initial state)")
    ax.set_ylabel("||dL/dh_t||")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    return fig


def write_html(d: Diagnosis, path: str | Path) -> Path:
    """Render the page to ``path`` (parent folders created)."""
    from ..report.html import figure_svg, write

    data = d.to_dict()
    figures = {"profile": figure_svg(_profile_figure(d)),
               "loss": figure_svg(_loss_figure(d)) if len(d.losses) else None}
    if any(len(t.norms) for t in d.through_time):
        figures["time"] = figure_svg(_time_figure(d))
    layers = [
        [row["layer"], row["type"], row["activation"], row["output_rms"], row["grad_rms"]]
        for row in data["profile"]["layers"]
    ]
    init = [[a.layer, a.activation, a.fan_in, a.variance_fan_in, a.needed, a.scheme, a.ratio] for a in d.init]
    fixes = [
        [r.name, r.note, plain(r.ratio_before), plain(r.ratio_after), plain(r.loss_before), plain(r.loss_after),
         r.errors_after if r.applied else None]
        for r in d.fix_results
    ]
    time_rows = [[t.layer, t.kind, len(t.norms) - 1 if len(t.norms) else None, plain(t.ratio), t.skipped]
                 for t in d.through_time]
    toc = [("findings", "Findings"), ("profile", "Gradient through depth"), ("theory", "Theory"),
           ("init", "Initialisation"), ("stability", "Learning-rate stability"), ("run", "Short run")]
    if d.through_time:
        toc.insert(4, ("time", "Through time"))
    if d.fix_results:
        toc.append(("fixes", "Fixes tried"))
    s = d.settings
    return write(
        path,
        "diagnosis.html.j2",
        title=f"Diagnosis of {s.get('model', 'a model')}",
        subtitle=(f"{s['layers']} layers, {s['parameters']:,} parameters; {s['steps']} steps of {s['optimizer']}, "
                  f"seed {s.get('seed')}"),
        toc=toc,
        d=data,
        figures=figures,
        layers=layers,
        init=init,
        fixes=fixes,
        time_rows=time_rows,
        gradient_ratio=plain(d.gradient_ratio()),
        final_loss=plain(d.final_loss()),
    )
