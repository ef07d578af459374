"""Sinks are written on a background thread: in order, waited for at close, a broken one dropped with a warning."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn

import gradguard


class Collect:
    def __init__(self, gate: threading.Event | None = None) -> None:
        self.steps: list[int] = []
        self.gate = gate
        self.closed = False
        self.thread: str | None = None

    def write(self, rows, findings):
        if self.gate is not None:
            assert self.gate.wait(30)
        self.thread = threading.current_thread().name
        self.steps += rows.steps.tolist()

    def close(self):
        self.closed = True


class Broken:
    def write(self, rows, findings):
        raise ConnectionError("tracker unreachable")


def _train(w, model, steps):
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    for _ in range(steps):
        model.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        w.step(loss=loss)


def test_a_blocked_sink_does_not_block_training_and_close_waits_for_it():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    gate = threading.Event()
    slow = Collect(gate)
    w = gradguard.watch(model, flush_every=5, sinks=[slow])
    _train(w, model, 12)  # two flushes queued while the sink is stuck in its first write
    assert slow.steps == []
    gate.set()
    w.close()
    assert slow.steps == list(range(12)) and slow.closed
    assert slow.thread == "gradguard-sinks"


def test_a_failing_sink_is_dropped_with_one_warning_and_the_others_go_on():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    good = Collect()
    w = gradguard.watch(model, flush_every=5, sinks=[Broken(), good])
    with pytest.warns(RuntimeWarning, match="Broken failed .*tracker unreachable") as record:
        _train(w, model, 20)
        w.close()
    assert sum("Broken failed" in str(r.message) for r in record) == 1
    assert good.steps == list(range(20))
    np.testing.assert_array_equal(w.trace.steps, np.arange(20))  # the Trace is whole
