"""Helpers the rules share: reading a window of a Trace as per-element RMS."""

from __future__ import annotations

import warnings

import numpy as np

from ..trace import Trace

# Gradients of embedding tables are mostly zero rows; their RMS says nothing about flow.
SPARSE_TYPES = ("Embedding", "EmbeddingBag")


def layer_numel(trace: Trace) -> np.ndarray:
    """Parameter count per layer from the Trace metadata (1 where unknown)."""
    layers = trace.meta.get("layers") or []
    if len(layers) != len(trace.layers):
        return np.ones(len(trace.layers))
    return np.array([max(int(layer.get("numel", 1)), 1) for layer in layers], dtype=np.float64)


def layer_types(trace: Trace) -> list[str]:
    layers = trace.meta.get("layers") or []
    if len(layers) != len(trace.layers):
        return [""] * len(trace.layers)
    return [str(layer.get("type", "")) for layer in layers]


def nanmedian(a: np.ndarray, axis: int = 0) -> np.ndarray:
    """np.nanmedian without the all-NaN warning (all-NaN columns give NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(a, axis=axis)


def grad_rms(trace: Trace, window: int) -> tuple[np.ndarray, int | None]:
    """Median per-element gradient RMS per layer over the last ``window`` steps, and that last step."""
    if len(trace) == 0:
        return np.full(len(trace.layers), np.nan), None
    recent = trace.tail(window)
    rms = recent.metric("grad_norm") / np.sqrt(layer_numel(trace))
    rms[:, [t in SPARSE_TYPES for t in layer_types(trace)]] = np.nan
    return nanmedian(rms, axis=0), int(recent.steps[-1])


def last_measured(values: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per layer, the most recent non-NaN value and its step (NaN / -1 where none)."""
    out = np.full(values.shape[1], np.nan)
    at = np.full(values.shape[1], -1, dtype=np.int64)
    for j in range(values.shape[1]):
        ok = np.flatnonzero(~np.isnan(values[:, j]))
        if len(ok):
            out[j] = values[ok[-1], j]
            at[j] = steps[ok[-1]]
    return out, at
