"""TensorBoard sink: per-layer scalars, the loss, findings as text, depth histograms."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..detect import Finding
from ..trace import Trace
from ..watch import _positive_int
from ._rows import RowNames, check_metrics, check_prefix, finding_markdown, finding_step, missing

# Histograms across layers: the spread of gradient magnitudes over depth is what vanishing and
# exploding gradients look like, and log10 makes decades readable on TensorBoard's linear axis.
_HISTOGRAMS = ("grad_norm", "update_ratio")


class TensorBoard:
    """Write each flush to TensorBoard event files.

    Args:
        log_dir_or_writer: a directory (a ``SummaryWriter`` is created there and closed with
            the Watch) or an existing ``torch.utils.tensorboard.SummaryWriter`` (flushed, never
            closed: it stays yours).
        prefix: first part of every tag.
        histograms_every: on recorded steps whose number is a multiple of N, a histogram across
            layers of log10 of each layer's gradient norm (and of its update ratio, where
            measured); 0 = none.
        metrics: the per-layer metrics to write (default: all of them).

    Tags (step = training step): ``<prefix>/<metric>/<layer>`` per layer, ``<prefix>/loss``,
    ``<prefix>/loss_nonfinite`` (1 at a NaN/inf loss), ``<prefix>/grad_norm_total``,
    histograms ``<prefix>/grad_norm_log10`` and ``<prefix>/update_ratio_log10``, text
    ``<prefix>/findings``. Scalars are stored as float32 (TensorBoard's scalar type).
    A NaN loss is written as NaN; TensorBoard's charts leave non-finite points out of the
    line, so ``loss_nonfinite`` is the series that shows it.
    """

    def __init__(
        self,
        log_dir_or_writer: str | os.PathLike[str] | Any,
        *,
        prefix: str = "gradguard",
        histograms_every: int = 10,
        metrics: Sequence[str] | None = None,
    ) -> None:
        try:
            from tensorboard.compat.proto.summary_pb2 import Summary
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise missing("tensorboard", "tensorboard", err) from None
        self.histograms_every = _positive_int("histograms_every", histograms_every, allow_zero=True)
        self._summary = Summary
        self._names = RowNames(check_prefix(prefix), check_metrics(metrics))
        if isinstance(log_dir_or_writer, SummaryWriter):
            self.writer = log_dir_or_writer
            self._owned = False
        elif isinstance(log_dir_or_writer, (str, os.PathLike)):
            self.writer = SummaryWriter(log_dir=os.fspath(log_dir_or_writer))
            self._owned = True
        else:
            raise TypeError(
                "TensorBoard needs a log directory or a torch.utils.tensorboard.SummaryWriter, "
                f"got {type(log_dir_or_writer).__name__}"
            )

    def write(self, rows: Trace, findings: Sequence[Finding]) -> None:
        """Write one flush: every step's scalars as one event, then histograms and findings."""
        if not len(rows) and not findings:
            return
        file_writer = self.writer._get_file_writer()  # the writer add_scalar itself goes through
        wall = time.time()
        Value = self._summary.Value
        for step, names, values in self._names.rows(rows):
            # One event per step holding every scalar: a 1000-layer model would need 10,000
            # add_scalar calls (and events) per step otherwise.
            summary = self._summary(value=[Value(tag=n, simple_value=v) for n, v in zip(names, values)])
            file_writer.add_summary(summary, step, wall)
        if self.histograms_every:
            self._histograms(rows, wall)
        by_step: dict[int, list[str]] = {}
        for f in findings:
            by_step.setdefault(finding_step(f, rows), []).append(finding_markdown(f))
        for step, texts in sorted(by_step.items()):
            self.writer.add_text(self._names.name("findings"), "\n\n---\n\n".join(texts), step, wall)
        self.writer.flush()

    def _histograms(self, rows: Trace, wall: float) -> None:
        sampled = rows.steps % self.histograms_every == 0
        if not sampled.any():
            return
        for metric in _HISTOGRAMS:
            if metric not in self._names.metrics:
                continue
            tag = self._names.name(metric + "_log10")
            for step, v in zip(rows.steps[sampled].tolist(), rows.metric(metric)[sampled]):
                v = v[np.isfinite(v) & (v > 0)]  # log10 of a zero or not-measured layer has no place
                if v.size:
                    self.writer.add_histogram(tag, np.log10(v), step, walltime=wall)

    def close(self) -> None:
        """Close the writer this sink created; flush (not close) one that was passed in."""
        if self._owned:
            self.writer.close()
        else:
            self.writer.flush()

    def __repr__(self) -> str:
        return f"TensorBoard({self.writer.log_dir!r})"
