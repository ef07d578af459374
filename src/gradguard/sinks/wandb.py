"""Weights & Biases sink: one history row per recorded step, findings as a table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..detect import Finding
from ..trace import Trace
from ._rows import RowNames, check_metrics, check_prefix, missing

_COLUMNS = ["step", "severity", "kind", "layer", "message", "fix", "code"]


class WandB:
    """Log each flush to a W&B run (``run``, else the current ``wandb.run``).

    W&B drops, with only a warning, a ``log`` whose step is lower than the run's current
    step, and a flush arrives up to ``flush_every`` steps late. So this sink never passes
    ``step=``: every value is keyed by its own step metric, ``<prefix>/step`` (the training
    step), through ``run.define_metric("<prefix>/*", step_metric="<prefix>/step")``, and
    each recorded step is one ``run.log`` call (one history row). Charts of ``<prefix>/...``
    use the training step as their x-axis. Your own ``wandb.log`` calls should not pass
    ``step=`` either (the rows added here advance the run's step); key them the same way.

    Findings go to a ``wandb.Table`` at ``<prefix>/findings`` holding every finding so far,
    logged again when new ones appear: a table keeps the evidence and the fix's code,
    sorts and filters in the UI, and works offline (alerts need a server and are rate
    limited). Counts by severity are in the run summary (``<prefix>/findings_error``...).

    Names are ``<prefix>/<metric>/<layer>``, ``<prefix>/loss`` (NaN when the loss was NaN),
    ``<prefix>/loss_nonfinite``, ``<prefix>/grad_norm_total``; ``metrics`` picks the
    per-layer metrics (default: all), which matters for models with many layers.
    """

    def __init__(self, run: Any = None, *, prefix: str = "gradguard", metrics: Sequence[str] | None = None) -> None:
        try:
            import wandb
        except ImportError as err:
            raise missing("wandb", "wandb", err) from None
        self._wandb: Any = wandb  # typed loosely: wandb's stubs vary between versions
        self.run: Any = run if run is not None else wandb.run
        if self.run is None:
            raise RuntimeError("there is no W&B run to log to: call wandb.init() first, or pass run=")
        if not callable(getattr(self.run, "log", None)):
            raise TypeError(f"run must be a wandb Run (from wandb.init()), got {type(self.run).__name__}")
        self._names = RowNames(check_prefix(prefix), check_metrics(metrics))
        self._step_key = self._names.name("step")
        self.run.define_metric(self._step_key, hidden=True)
        self.run.define_metric(self._names.name("*"), step_metric=self._step_key)
        self._findings: list[list[Any]] = []

    def write(self, rows: Trace, findings: Sequence[Finding]) -> None:
        """One ``run.log`` per recorded step; the findings table rides on the flush's last row."""
        batch = list(self._names.rows(rows))
        table = self._table(findings) if findings else None
        for i, (step, names, values) in enumerate(batch):
            data: dict[str, Any] = dict(zip(names, values))
            data[self._step_key] = step
            if table is not None and i == len(batch) - 1:
                data[self._names.name("findings")] = table
            self.run.log(data)
        if table is not None and not batch:
            self.run.log({self._step_key: findings[-1].step or 0, self._names.name("findings"): table})
        if findings:
            for severity in ("info", "warning", "error"):
                n = sum(1 for row in self._findings if row[1] == severity)
                self.run.summary[self._names.name(f"findings_{severity}")] = n

    def _table(self, findings: Sequence[Finding]) -> Any:
        for f in findings:
            title, code = (f.fixes[0].title, f.fixes[0].code) if f.fixes else ("", "")
            self._findings.append([f.step, f.severity, f.kind, f.layer or "", f.message, title, code])
        # A logged table is immutable: each flush with news logs the whole list again.
        return self._wandb.Table(columns=_COLUMNS, data=[list(r) for r in self._findings])

    def close(self) -> None:
        """Nothing to release: the run belongs to the caller, who finishes it."""

    def __repr__(self) -> str:
        return f"WandB(run={getattr(self.run, 'id', None)!r})"



