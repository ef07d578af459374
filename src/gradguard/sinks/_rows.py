"""What every sink sends: a flush's rows as (step, name -> value) pairs, and findings as text.

Names are ``<prefix>/<metric>/<layer>`` for per-layer statistics, ``<prefix>/loss``,
``<prefix>/loss_nonfinite`` (1.0 when the given loss was NaN/inf, else 0.0) and
``<prefix>/grad_norm_total`` (the L2 norm over every layer's gradient, as the detectors
compute it). A statistic that was not measured at a step (NaN in the Trace) is left out;
a loss that was given is always sent, NaN included.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from ..detect import Finding
from ..trace import METRICS, Trace


def check_prefix(prefix: object) -> str:
    """The name prefix, validated: a non-empty string without a trailing slash."""
    if not isinstance(prefix, str) or not prefix.strip("/"):
        raise ValueError(f"prefix must be a non-empty string such as 'gradguard', got {prefix!r}")
    return prefix.strip("/")


def check_metrics(metrics: Sequence[str] | None) -> tuple[str, ...]:
    """The per-layer metrics to send, validated against ``METRICS`` (None: all of them)."""
    if metrics is None:
        return METRICS
    if isinstance(metrics, str):
        metrics = (metrics,)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from: {', '.join(METRICS)}")
    return tuple(metrics)


class RowNames:
    """Builds a flush's (step, names, values) with names made once per layer list."""

    def __init__(self, prefix: str, metrics: tuple[str, ...], clean: Callable[[str], str] = str) -> None:
        self.prefix = prefix
        self.metrics = metrics
        self._clean = clean
        self._layers: list[str] | None = None
        self._names: np.ndarray | None = None  # object array [metrics, layers]

    def name(self, *parts: str) -> str:
        """``prefix/part/...``, passed through the backend's name cleaner."""
        return self._clean("/".join((self.prefix, *parts)))

    def _layer_names(self, layers: list[str]) -> np.ndarray:
        if self._names is None or layers != self._layers:
            grid = [[self.name(m, layer) for layer in layers] for m in self.metrics]
            self._names = np.array(grid, dtype=object).reshape(len(self.metrics), len(layers))
            self._layers = list(layers)
        return self._names

    def rows(self, trace: Trace) -> Iterator[tuple[int, list[str], list[float]]]:
        """Per recorded step: its number, then parallel lists of names and values."""
        names = self._layer_names(trace.layers)
        values = np.stack([trace.metric(m) for m in self.metrics], axis=1)  # [S, M, L]
        measured = ~np.isnan(values)
        grad = trace.metric("grad_norm")
        has_grad = ~np.isnan(grad).all(axis=1)
        total = np.sqrt(np.nansum(grad**2, axis=1))
        loss, given = trace.loss, trace.loss_given
        loss_name, flag_name, total_name = self.name("loss"), self.name("loss_nonfinite"), self.name("grad_norm_total")
        for i, step in enumerate(trace.steps.tolist()):
            keep = measured[i]
            row_names: list[str] = names[keep].tolist()
            row_values: list[float] = values[i][keep].tolist()
            if given[i]:
                # A NaN/inf loss is sent as it is, plus a 0/1 flag that every backend can draw.
                row_names += [loss_name, flag_name]
                row_values += [float(loss[i]), float(not np.isfinite(loss[i]))]
            if has_grad[i]:
                row_names.append(total_name)
                row_values.append(float(total[i]))
            yield step, row_names, row_values


def finding_step(f: Finding, trace: Trace) -> int:
    """The step a finding is filed under: its own, else the flush's last (0 for an empty flush)."""
    if f.step is not None:
        return int(f.step)
    return int(trace.steps[-1]) if len(trace) else 0


def finding_markdown(f: Finding) -> str:
    """One finding as Markdown: severity, kind, where, message, and the first fix with its code."""
    where = f" in `{f.layer}`" if f.layer else ""
    when = f" at step {f.step}" if f.step is not None else ""
    text = f"**{f.severity}** `{f.kind}`{where}{when}: {f.message}"
    if f.fixes:
        fix = f.fixes[0]
        code = "\n".join("    " + line for line in fix.code.splitlines())
        text += f"\n\nFix: {fix.title}\n\n{code}" if code else f"\n\nFix: {fix.title}"
    return text


def missing(extra: str, module: str, err: ImportError) -> ImportError:
    """The ImportError a sink raises when its library is not installed."""
    return ImportError(
        f"this sink needs {module}, which could not be imported ({err}); install it with: "
        f"pip install 'gradguard[{extra}]'"
    )
