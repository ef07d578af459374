"""MLflow sink: per-layer metrics through ``log_batch``, findings as a JSON artifact and tags."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

from ..detect import Finding
from ..diagnosis.jsonsafe import plain
from ..trace import Trace
from ._rows import RowNames, check_metrics, check_prefix, missing

# MLflow names may hold alphanumerics, "_", "-", ".", " " and "/" (":" too, except on Windows);
# anything else, such as the parentheses of "(root)", becomes "_".
_BAD = re.compile(r"[^/\w.\- ]")
_SEVERITY_ORDER = ("info", "warning", "error")


def clean_name(name: str) -> str:
    """A name MLflow accepts on every platform: other characters become ``_``."""
    return _BAD.sub("_", name)


class MLflow:
    """Log each flush to an MLflow run (``run_id``, else the active run) with ``MlflowClient``.

    Metrics are ``<prefix>/<metric>/<layer>`` (step = training step), ``<prefix>/loss``,
    ``<prefix>/loss_nonfinite``, ``<prefix>/grad_norm_total``, sent with ``log_batch`` in
    chunks of MLflow's limit of 1000 per call. Characters MLflow refuses in a name (the
    parentheses of ``(root)``...) become ``_``. A NaN loss is logged as NaN, which MLflow
    keeps; its SQL stores turn +-inf into +-1.8e308, so ``loss_nonfinite`` tells a real
    overflow apart.

    Findings: every finding so far (evidence and fixes included) in the artifact
    ``<prefix>/findings.json``, rewritten when new ones appear, and the run tags
    ``<prefix>/findings`` (how many) and ``<prefix>/worst_severity``, to search runs by.

    MLflow's SQL store takes about 0.5 ms per value: for a model with hundreds of layers,
    send fewer per-layer metrics (``metrics=["grad_norm"]``).
    """

    def __init__(self, run_id: str | None = None, *, prefix: str = "gradguard", metrics: Sequence[str] | None = None):
        try:
            import mlflow
            from mlflow.entities import Metric, RunTag
            from mlflow.tracking import MlflowClient
            from mlflow.utils.validation import MAX_METRICS_PER_BATCH
        except ImportError as err:
            raise missing("mlflow", "mlflow", err) from None
        if run_id is None:
            active = mlflow.active_run()
            if active is None:
                raise RuntimeError("there is no active MLflow run: call mlflow.start_run() first, or pass run_id=")
            run_id = active.info.run_id
        if not isinstance(run_id, str):
            raise TypeError(f"run_id must be an MLflow run id (a string), got {type(run_id).__name__}")
        self.client: Any = MlflowClient()
        self.client.get_run(run_id)  # an unknown id fails here, with MLflow's own message
        self.run_id = run_id
        self._metric, self._tag, self._chunk = Metric, RunTag, MAX_METRICS_PER_BATCH
        self._prefix = check_prefix(prefix)
        self._names = RowNames(self._prefix, check_metrics(metrics), clean=clean_name)
        self._findings: list[Finding] = []

    def write(self, rows: Trace, findings: Sequence[Finding]) -> None:
        """Send one flush: metrics in chunks of 1000, then the findings when there are new ones."""
        stamp = int(time.time() * 1000)
        Metric = self._metric
        batch = [
            Metric(key=n, value=v, timestamp=stamp, step=step)
            for step, names, values in self._names.rows(rows)
            for n, v in zip(names, values)
        ]
        for i in range(0, len(batch), self._chunk):
            self.client.log_batch(self.run_id, metrics=batch[i : i + self._chunk])
        if findings:
            self._findings.extend(findings)
            self.client.log_dict(
                self.run_id,
                {"findings": [plain(f.to_dict()) for f in self._findings]},
                f"{self._prefix}/findings.json",
            )
            worst = max((f.severity for f in self._findings), key=_SEVERITY_ORDER.index)
            tags = {self._names.name("findings"): str(len(self._findings)), self._names.name("worst_severity"): worst}
            self.client.log_batch(self.run_id, tags=[self._tag(k, v) for k, v in tags.items()])

    def close(self) -> None:
        """Nothing to release: the run belongs to the caller, who ends it."""

    def __repr__(self) -> str:
        return f"MLflow(run_id={self.run_id!r})"
