"""A terminal summary of a Trace: per-layer statistics and the findings (rich tables)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

from ..detect import Finding, detect
from ..detect._common import last_measured
from ..trace import Trace

_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def _fmt(x: float) -> str:
    if np.isnan(x):
        return "-"
    return f"{x:.3g}" if 1e-2 <= abs(x) < 1e4 or x == 0 else f"{x:.1e}"


def _median(a: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(a, axis=0) if len(a) else np.full(a.shape[1], np.nan)


def print_summary(
    trace: Trace, findings: Sequence[Finding] | None = None, *, last: int = 20, console: Console | None = None
) -> None:
    """Print the per-layer table (median over the last ``last`` steps) and the findings."""
    console = console or Console()
    n = len(trace)
    run = trace.meta
    console.print(
        f"[bold]{run.get('model', 'model')}[/]: {len(trace.layers)} layers, {n} recorded steps"
        + (f" (steps {int(trace.steps[0])}..{int(trace.steps[-1])})" if n else "")
        + f", torch {run.get('torch_version', '?')}"
    )
    recent = trace.tail(last)
    nonfinite = np.nansum(trace.metric("grad_nonfinite"), axis=0) if n else np.zeros(len(trace.layers))
    table = Table(title=f"per layer: median of the last {min(last, n)} steps; activations: latest sample")
    for col in ("layer", "type", "grad norm", "grad max", "non-fin.", "weight", "upd/w", "act std", "sat.", "dead"):
        table.add_column(col, justify="left" if col in ("layer", "type") else "right", no_wrap=True)
    cols = {m: _median(recent.metric(m)) for m in ("grad_norm", "grad_absmax", "weight_norm", "update_ratio")}
    # Activations are sampled every N steps: show the latest sample, not a median of gaps.
    for m in ("act_std", "act_saturated", "act_dead"):
        cols[m] = last_measured(trace.metric(m), trace.steps)[0] if n else np.full(len(trace.layers), np.nan)
    types = [str(x.get("type", "")) for x in run.get("layers", [])] or [""] * len(trace.layers)
    for j, name in enumerate(trace.layers):
        table.add_row(
            name, types[j] if j < len(types) else "", _fmt(cols["grad_norm"][j]), _fmt(cols["grad_absmax"][j]),
            str(int(nonfinite[j])), _fmt(cols["weight_norm"][j]), _fmt(cols["update_ratio"][j]),
            _fmt(cols["act_std"][j]), _fmt(cols["act_saturated"][j]), _fmt(cols["act_dead"][j]),
        )
    console.print(table)
    loss = trace.loss[trace.loss_given] if n else np.zeros(0)
    if len(loss):
        console.print(f"loss: first {_fmt(loss[0])}, last {_fmt(loss[-1])}")
    if findings is None:
        findings = detect(trace)
    if not findings:
        console.print("[green]no findings: gradients look healthy[/]")
        return
    console.print(f"[bold]{len(findings)} finding(s)[/]")
    for f in findings:
        console.print(f"[{_STYLE[f.severity]}]{f.severity:>7}[/] {f.kind}: {f.message}", highlight=False)
        if f.fixes:
            console.print(f"         fix: {f.fixes[0].title}", highlight=False)
