"""The Trace's reading interface."""

from __future__ import annotations

import numpy as np
import pytest

from gradguard import METRICS, Trace


def _trace() -> Trace:
    t = Trace(["a", "b"], {"seed": 1})
    v = np.full((2, len(METRICS), 2), np.nan)
    v[:, 0] = [[1.0, 2.0], [3.0, 4.0]]
    t.append(np.array([0, 1]), v, np.array([0.5, np.nan]))
    v2 = np.full((1, len(METRICS), 2), np.nan)
    v2[:, 0] = [[5.0, 6.0]]
    t.append(np.array([5]), v2, np.array([0.25]))
    return t


def test_reading_interface():
    t = _trace()
    assert t.layers == ["a", "b"] and len(t) == 3
    assert t.steps.dtype == np.int64 and t.steps.tolist() == [0, 1, 5]
    g = t.metric("grad_norm")
    assert g.shape == (3, 2) and g.dtype == np.float64 and g[2].tolist() == [5.0, 6.0]
    assert np.isnan(t.metric("act_dead")).all()
    assert np.isnan(t.loss[1]) and t.loss_given.tolist() == [True, False, True]
    g[0, 0] = 99  # a copy: the trace is not changed through it
    assert t.metric("grad_norm")[0, 0] == 1.0
    assert t.tail(1).steps.tolist() == [5]


def test_unknown_metric_lists_the_known_ones():
    with pytest.raises(KeyError, match="grad_norm"):
        _trace().metric("grad_nrom")


def test_append_checks_shapes_and_order():
    t = _trace()
    with pytest.raises(ValueError, match="shape"):
        t.append(np.array([9]), np.zeros((1, 3, 2)), np.array([0.0]))
    with pytest.raises(ValueError, match="increasing"):
        t.append(np.array([5]), np.zeros((1, len(METRICS), 2)), np.array([0.0]))
