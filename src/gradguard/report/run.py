"""The post-mortem of a recorded run as one self-contained HTML page: ``gradguard report RUN.db``.

It reads a store (``.db``, findings included) or a saved Trace (``.npz``, no findings) and
draws what the Trace holds: gradient flow by layer and step, the total gradient norm, update
sizes, activation statistics and the loss, with the first non-finite step and a per-layer table.
A killed run's store is read like any other: the page shows every step up to its last flush.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..detect._common import last_measured, layer_numel, layer_types, nanmedian
from ..detect.finding import Finding
from ..record.store import load, load_findings
from ..trace import Trace

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["first_nonfinite", "write_run_report"]

MAX_COLUMNS = 500  # heatmap columns and anomaly marks: enough to see, small enough for a 10,000-step run
UPDATE_RATIO_RULE = 1e-3  # the rule of thumb: a healthy step changes weights by about a thousandth
_LABEL_CHARS = 32  # longer layer names are shortened in figures (tables show them in full)


def _bins(n: int, most: int = MAX_COLUMNS) -> np.ndarray:
    """Start indices of at most ``most`` contiguous bins covering ``range(n)``."""
    return np.unique(np.linspace(0, n, min(n, most), endpoint=False).astype(np.int64))


def _label(name: str) -> str:
    """A layer name as a matplotlib label: shortened, and "$" escaped so it is never parsed as math."""
    if len(name) > _LABEL_CHARS:
        name = name[: _LABEL_CHARS - 1] + "\u2026"
    return name.replace("$", r"\$")


def _positive(a: np.ndarray) -> np.ndarray:
    """``a`` with zeros, negatives and non-finite values as NaN: what a log axis can draw."""
    return np.where(np.isfinite(a) & (a > 0), a, np.nan)


def _total_norm(trace: Trace) -> np.ndarray:
    """The whole model's gradient norm per step (finite elements); NaN where no layer was measured."""
    g = trace.metric("grad_norm")
    measured = ~np.isnan(g).all(axis=1)
    total = np.sqrt(np.nansum(g**2, axis=1))
    return np.where(measured, total, np.nan)


def _nonfinite_rows(trace: Trace) -> np.ndarray:
    """Row indices of the steps with a non-finite gradient value in any layer."""
    counts = np.nan_to_num(trace.metric("grad_nonfinite"), nan=0.0)
    return np.flatnonzero((counts > 0).any(axis=1))


def first_nonfinite(trace: Trace) -> dict[str, Any] | None:
    """The earliest step with a non-finite gradient, its first layer (trace order) and how many layers had one."""
    counts = np.nan_to_num(trace.metric("grad_nonfinite"), nan=0.0)
    rows = _nonfinite_rows(trace)
    if not len(rows):
        return None
    r = int(rows[0])
    cols = np.flatnonzero(counts[r] > 0)
    return {
        "step": int(trace.steps[r]),
        "layer": trace.layers[int(cols[0])],
        "count": int(counts[r, cols[0]]),
        "layers": int(len(cols)),
        "steps": int(len(rows)),
    }


def _heatmap(trace: Trace, rms: np.ndarray, per_element: bool) -> Figure:
    """Gradient size by layer (rows) and step (columns, the max over each bin); log colour scale."""
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm

    from .html import new_figure

    steps = trace.steps
    # Columns of equal width in steps, not in rows: a long run's history is thinned (older
    # steps sparser than recent ones), and the axis must still be steps. A column is at least
    # as wide as the widest gap between recorded steps, so none is empty for want of a row.
    # The last column ends one step after the last recorded step, so each column spans its steps.
    span = int(steps[-1] + 1 - steps[0])
    gap = int(np.diff(steps).max()) if len(steps) > 1 else 1
    edges = np.linspace(steps[0], steps[-1] + 1, max(1, min(len(steps), MAX_COLUMNS, span // gap)) + 1)
    column = np.minimum(np.searchsorted(edges, steps, side="right") - 1, len(edges) - 2)
    binned = np.full((len(edges) - 1, rms.shape[1]), np.nan)
    # fmax ignores NaN, so a column is "not measured" only when every step in it is.
    np.fmax.at(binned, column, rms)
    binned = binned.T  # [layers, columns]
    finite = binned[np.isfinite(binned) & (binned > 0)]
    n_layers = len(trace.layers)
    fig = new_figure(9.0, min(2.2 + 0.2 * n_layers, 14.0))
    ax = fig.add_subplot()
    # Grey: not measured; black ("under"): exactly zero, nothing flows at all.
    cmap = colormaps["viridis"].with_extremes(bad="#d0d0d0", under="black")
    low, high = (float(finite.min()), float(finite.max())) if len(finite) else (1e-12, 1.0)
    if low == high:  # one value everywhere: widen the scale so the colour bar has a range
        low, high = low / 10, high * 10
    norm = LogNorm(vmin=low, vmax=high)
    shown = np.where(np.isfinite(binned) & (binned <= 0), low / 2, binned)
    image = ax.imshow(
        np.ma.masked_invalid(shown), aspect="auto", interpolation="nearest", cmap=cmap, norm=norm,
        extent=(float(edges[0]), float(edges[-1]), n_layers - 0.5, -0.5),
    )
    every = max(1, int(np.ceil(n_layers / 40)))  # at most ~40 names on the axis
    ticks = list(range(0, n_layers, every))
    ax.set_yticks(ticks, [_label(trace.layers[j]) for j in ticks], fontsize=7)
    ax.set_xlabel("step")
    ax.set_ylabel("layer")
    bar = fig.colorbar(image, ax=ax, extend="min")
    bar.set_label("gradient RMS per element" if per_element else "gradient norm")
    return fig


def _marks(ax: Axes, steps: np.ndarray, color: str, marker: str, label: str) -> None:
    """A rug of markers along the top of ``ax`` at ``steps`` (at most MAX_COLUMNS of them)."""
    if not len(steps):
        return
    steps = steps[_bins(len(steps))]  # thousands of marks draw the same rug as a few hundred
    ax.margins(y=0.12)  # room at the top, so the rug does not sit on the curve
    ax.plot(steps, np.full(len(steps), 0.97), ls="none", marker=marker, ms=6, color=color, label=label,
            transform=ax.get_xaxis_transform(), clip_on=False)


def _total_figure(trace: Trace, total: np.ndarray, nonfinite_steps: np.ndarray, finding_steps: np.ndarray) -> Figure:
    """Total gradient norm over steps, with non-finite steps and the steps of findings marked."""
    from .html import new_figure

    fig = new_figure(9.0, 3.4)
    ax = fig.add_subplot()
    shown = _positive(total)
    ax.plot(trace.steps, shown, lw=0.8, label="total gradient norm (finite elements)")
    ax.set_yscale("log")
    if np.isnan(shown).all():  # nothing a log axis can draw: say so rather than leave a blank box
        ax.text(0.5, 0.5, "zero or not measured at every step", ha="center", va="center", transform=ax.transAxes,
                color="gray")
        ax.set_xlim(trace.steps[0] - 0.5, trace.steps[-1] + 0.5)
    _marks(ax, nonfinite_steps, "red", "x", "non-finite gradient")
    for i, s in enumerate(finding_steps):
        ax.axvline(s, color="tab:orange", ls="--", lw=0.8, label="step of a finding" if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("||g||")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return fig


def _picked(n_layers: int) -> list[int]:
    """First, middle and last layer (fewer when the model has fewer)."""
    return sorted({0, n_layers // 2, n_layers - 1}) if n_layers else []


def _series(ax: Axes, steps: np.ndarray, values: np.ndarray, **kwargs: Any) -> None:
    """A line through the measured (non-NaN) points only: sparse metrics are not gaps."""
    ok = ~np.isnan(values)
    ax.plot(steps[ok], values[ok], **kwargs)


def _update_figure(trace: Trace, ratio: np.ndarray, picked: Sequence[int]) -> Figure:
    """update_norm / weight_norm over steps for the picked layers, with the 1e-3 line."""
    from .html import new_figure

    fig = new_figure(9.0, 3.2)
    ax = fig.add_subplot()
    for j in picked:
        _series(ax, trace.steps, _positive(ratio[:, j]), marker=".", ms=3, lw=0.8, label=_label(trace.layers[j]))
    ax.axhline(UPDATE_RATIO_RULE, color="k", ls=":", lw=1, label="1e-3 (rule of thumb)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("||update|| / ||weight||")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _activation_figure(trace: Trace, picked: Sequence[int]) -> Figure:
    """Saturated and dead fractions over the sampled steps: the picked layers and the worst layer."""
    from .html import new_figure

    fig = new_figure(9.0, 3.2)
    axes = fig.subplots(1, 2, sharex=True)
    for ax, name, title in zip(axes, ("act_saturated", "act_dead"), ("saturated units", "dead units")):
        values = trace.metric(name)
        sampled = ~np.isnan(values).all(axis=1)
        if not sampled.any():
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="gray")
        else:
            for j in picked:
                _series(ax, trace.steps, values[:, j], marker=".", ms=3, lw=0.8, label=_label(trace.layers[j]))
            worst = np.nanmax(np.where(sampled[:, None], values, 0.0), axis=1)
            _series(ax, trace.steps, np.where(sampled, worst, np.nan), color="k", ls="--", lw=1,
                    label="largest over all layers")
            ax.legend(fontsize=7)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("fraction")
        ax.grid(True, alpha=0.3)
    return fig


def _loss_figure(trace: Trace) -> Figure:
    """The loss where given; given but non-finite losses marked along the top."""
    from .html import new_figure

    loss, given = trace.loss, trace.loss_given
    fig = new_figure(9.0, 3.0)
    ax = fig.add_subplot()
    ok = given & np.isfinite(loss)
    ax.plot(trace.steps[ok], loss[ok], lw=0.8, label="loss")
    if len(loss[ok]) and (loss[ok] > 0).all() and loss[ok].max() / max(loss[ok].min(), 1e-300) > 100:
        ax.set_yscale("log")  # a loss over orders of magnitude reads better on a log axis
    _marks(ax, trace.steps[given & ~np.isfinite(loss)], "red", "x", "non-finite loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _metadata_rows(trace: Trace, source: Path) -> list[list[Any]]:
    """(field, value) rows of the run metadata; missing values show as a dash."""
    meta = trace.meta
    steps = trace.steps
    return [
        ["file", str(source)],
        ["model", meta.get("model")],
        ["parameters", meta.get("parameters")],
        ["layers", len(trace.layers)],
        ["recorded steps", len(trace)],
        ["step range", f"{int(steps[0])} to {int(steps[-1])}" if len(steps) else None],
        ["start time", meta.get("start_time")],
        ["torch", meta.get("torch_version")],
        ["gradguard", meta.get("gradguard_version")],
        ["python", meta.get("python_version")],
        ["device", meta.get("device")],
        ["dtypes", meta.get("dtypes")],
        ["seed", meta.get("seed")],
        ["every (record every N-th step)", meta.get("every")],
        ["weights_every", meta.get("weights_every")],
        ["activations_every", meta.get("activations_every")],
    ]


def _layer_rows(trace: Trace, rms: np.ndarray, numel: np.ndarray | None) -> list[list[Any]]:
    """Per layer: type, parameters, latest and median gradient RMS, latest weight norm, update ratio, non-finite."""
    steps = trace.steps
    latest_rms, _ = last_measured(rms, steps)
    median_rms = nanmedian(rms, axis=0)
    weight, _ = last_measured(trace.metric("weight_norm"), steps)
    ratio = trace.metric("update_ratio")
    latest_ratio, _ = last_measured(ratio, steps)
    median_ratio = nanmedian(ratio, axis=0)
    nonfinite = np.nansum(trace.metric("grad_nonfinite"), axis=0)
    types = layer_types(trace)
    rows = []
    for j, name in enumerate(trace.layers):
        rows.append([
            name, types[j] or None, None if numel is None else int(numel[j]),
            _float(latest_rms[j]), _float(median_rms[j]), _float(weight[j]),
            _float(latest_ratio[j]), _float(median_ratio[j]), int(nonfinite[j]),
        ])
    return rows


def _float(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def write_run_report(store: str | Path, out: str | Path) -> Path:
    """Write the post-mortem page of a store (``.db``) or saved Trace (``.npz``) to ``out``; returns ``out``.

    Raises ``FileNotFoundError``, ``StoreError`` or ``ValueError`` (a corrupt ``.npz``) for bad input.
    """
    from .html import figure_svg, write

    source = Path(store)
    trace = load(source)
    # A saved Trace holds no findings; a store holds those of its last flush.
    findings: list[Finding] | None = None if zipfile.is_zipfile(source) else load_findings(source)
    n = len(trace)
    # Parameter counts come from the run metadata; without them the heatmap shows plain norms.
    per_element = bool(trace.layers) and len(trace.meta.get("layers") or []) == len(trace.layers)
    numel = layer_numel(trace)  # ones when unknown
    rms = trace.metric("grad_norm") / np.sqrt(numel)
    picked = _picked(len(trace.layers))
    nonfinite_steps = trace.steps[_nonfinite_rows(trace)]
    finding_steps = np.unique([f.step for f in findings or [] if f.step is not None]).astype(np.int64)

    # Every key is there (None: not drawn): the template's StrictUndefined fails on a missing one.
    figures: dict[str, Any] = dict.fromkeys(("heatmap", "total", "updates", "activations", "loss"))
    if n and len(trace.layers):
        figures["heatmap"] = figure_svg(_heatmap(trace, rms, per_element))
        figures["total"] = figure_svg(_total_figure(trace, _total_norm(trace), nonfinite_steps, finding_steps))
        ratio = trace.metric("update_ratio")
        if np.isfinite(ratio[:, picked]).any():
            figures["updates"] = figure_svg(_update_figure(trace, ratio, picked))
        if not (np.isnan(trace.metric("act_saturated")).all() and np.isnan(trace.metric("act_dead")).all()):
            figures["activations"] = figure_svg(_activation_figure(trace, picked))
    if n and trace.loss_given.any():
        figures["loss"] = figure_svg(_loss_figure(trace))

    toc = [("run", "Run"), ("nonfinite", "First non-finite step"), ("findings", "Findings"),
           ("heatmap", "Gradient by layer and step"), ("total", "Total gradient norm"),
           ("updates", "Update / weight ratio"), ("activations", "Activations"), ("loss", "Loss"),
           ("layers", "Layers")]
    model = trace.meta.get("model") or "a model"
    return write(
        out,
        "run.html.j2",
        title=f"Run report: {model}",
        subtitle=f"{len(trace.layers)} layers, {n} recorded steps; from {source.name}",
        toc=toc,
        meta_rows=_metadata_rows(trace, source),
        recorded=n,
        first=first_nonfinite(trace),
        nonfinite_steps=len(nonfinite_steps),
        findings=None if findings is None else [f.to_dict() for f in findings],
        figures=figures,
        binned=n > MAX_COLUMNS,
        per_element=per_element,
        picked=[trace.layers[j] for j in picked],
        rule=UPDATE_RATIO_RULE,
        lost_losses=int((trace.loss_given & ~np.isfinite(trace.loss)).sum()),
        layer_rows=_layer_rows(trace, rms, numel if per_element else None),
    )
