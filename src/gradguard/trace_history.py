"""Bounded history: which rows of a long run to keep, so memory and the store stay bounded.

One policy serves the in-memory Trace of a running ``watch`` (``history=``) and the SQLite
store (``store_keep=``). When a history holds more than ``limit`` rows it is thinned to at
most ``3/4 * limit`` rows (the slack means thinning runs once every ``limit / 4`` rows, not
at every flush). What is kept, in this order:

1. **Recent rows, full resolution**: the last ``limit // 4`` rows, all of them. The detectors
   of a running watch read only ``trace.tail(window + growth_min_history)``, which this covers.
2. **Anomalies with their context, full resolution**: every row with a non-finite gradient
   value or a non-finite loss, every step named by a finding, and ``CONTEXT`` rows either
   side -- earliest first (the first non-finite step is the one a diagnosis needs), up to
   ``limit // 4`` rows.
3. **Everything older, downsampled**: steps are cut into buckets of ``k`` steps
   (``step // k``, ``k`` the smallest power of two that fits in the room left), and each
   bucket keeps two real rows: its *spike row* (a row with a non-finite value if it has one,
   else the row of largest total gradient norm) and its *richest row* (the row with the most
   measured values, so weight and activation statistics, measured on sampled steps only,
   are still there).

Why real rows and max-selection rather than averages: a report's heatmap shows the maximum
gradient of each column, and a spike is what a user scrolls back to find; a kept row is a
step exactly as it was measured (all layers, all metrics, its loss), never a blend of steps.
Selection composes: thinning at ``k`` then at ``2k`` keeps the same rows as thinning at
``2k`` once, so an incremental history equals the one-shot one.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .trace import METRICS, Trace

CONTEXT = 2  # rows kept either side of an anomaly
MIN_LIMIT = 64  # below this the three parts of the policy have no room to work

_GRAD_NORM = METRICS.index("grad_norm")
_GRAD_NONFINITE = METRICS.index("grad_nonfinite")


def summarize(values: np.ndarray, loss: np.ndarray, loss_given: np.ndarray) -> np.ndarray:
    """Per row what the policy needs: float64 [n, 3] of (anomalous, spike, measured values).

    ``values`` [n, metrics, layers] as in a Trace. ``spike`` is the total gradient norm over
    finite layer norms (-inf where none was measured).
    """
    n = values.shape[0]
    out = np.empty((n, 3), dtype=np.float64)
    if n == 0:
        return out
    counts = np.nan_to_num(values[:, _GRAD_NONFINITE, :], nan=0.0)
    bad_loss = np.asarray(loss_given, dtype=bool) & ~np.isfinite(np.asarray(loss, dtype=np.float64))
    out[:, 0] = (counts > 0).any(axis=1) | bad_loss
    g = values[:, _GRAD_NORM, :]
    finite = np.isfinite(g)
    total = np.sqrt((np.where(finite, g, 0.0) ** 2).sum(axis=1))
    out[:, 1] = np.where(finite.any(axis=1), total, -np.inf)
    out[:, 2] = (~np.isnan(values)).reshape(n, -1).sum(axis=1)
    return out


def plan(steps: np.ndarray, summary: np.ndarray, limit: int, protect: Iterable[int] = ()) -> np.ndarray:
    """The rows to keep (bool mask [n]) of a history of ``steps`` [n] with ``summary`` [n, 3].

    Everything is kept while ``n <= limit``; otherwise at most ``3/4 * limit`` rows (see the
    module docstring). ``protect``: steps to keep with their context, like anomalies (those
    named by findings).
    """
    steps = np.asarray(steps, dtype=np.int64)
    n = len(steps)
    keep = np.ones(n, dtype=bool)
    if n <= limit:
        return keep
    if limit < MIN_LIMIT:
        raise ValueError(f"a history limit must be at least {MIN_LIMIT} rows, got {limit}")
    keep[:] = False
    recent = limit // 4
    old = n - recent
    keep[old:] = True
    anomalous = summary[:, 0] > 0
    marks = anomalous[:old] | np.isin(steps[:old], np.fromiter(protect, dtype=np.int64))
    budget = limit // 4
    for i in np.flatnonzero(marks):
        lo, hi = max(0, i - CONTEXT), min(old, i + CONTEXT + 1)
        new = int((~keep[lo:hi]).sum())
        if new > budget:
            break  # earliest first: a later anomaly is left to the buckets, which favour it
        keep[lo:hi] = True
        budget -= new
    rest = np.flatnonzero(~keep[:old])
    room = (3 * limit) // 4 - int(keep.sum())
    k = 1
    while True:
        chosen = _per_bucket(rest, steps, summary, k)
        if len(chosen) <= room:
            break
        k *= 2
    keep[chosen] = True
    return keep


def _per_bucket(rows: np.ndarray, steps: np.ndarray, summary: np.ndarray, k: int) -> np.ndarray:
    """Each bucket's spike row and richest row (row indices, sorted, unique)."""
    if len(rows) == 0:
        return rows
    bucket = steps[rows] // k
    # np.lexsort sorts by the last key first: by bucket, then best first.
    spike = rows[np.lexsort((steps[rows], -summary[rows, 1], -summary[rows, 0], bucket))]
    rich = rows[np.lexsort((steps[rows], -summary[rows, 2], bucket))]
    return np.union1d(spike[_firsts(steps[spike] // k)], rich[_firsts(steps[rich] // k)])


def _firsts(sorted_keys: np.ndarray) -> np.ndarray:
    """Mask of the first element of each run of equal keys."""
    first = np.ones(len(sorted_keys), dtype=bool)
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return first


def downsample(trace: Trace, limit: int, protect: Iterable[int] = ()) -> int:
    """Thin ``trace`` in place by :func:`plan` when it holds more than ``limit`` rows; returns rows dropped."""
    if len(trace) <= limit:
        return 0
    steps, values, loss, given = trace._arrays()  # no copies: a long history is large
    keep = plan(steps, summarize(values, loss, given), limit, protect)
    trace.keep_rows(keep)
    return int((~keep).sum())
