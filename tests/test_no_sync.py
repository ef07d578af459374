"""An ordinary (non-flush) step never reads a value back from the device.

On the ``meta`` device a tensor has no data: any read (``item``, ``tolist``, ``bool``,
``float``, ``cpu``, ``numpy``) raises. A model there takes the accelerator path, so a
step that completes there, with every read method also counted, proves it does not sync.
"""

from __future__ import annotations

import pytest
import torch
from conftest import READS
from torch import nn

import gradguard


def _model():
    return nn.Sequential(nn.Linear(256, 200), nn.Tanh(), nn.Linear(200, 64), nn.ReLU(), nn.Linear(64, 10))


@pytest.mark.parametrize("strategy", ["auto", "fused", "hooks"])
def test_ordinary_steps_perform_zero_host_reads(count_reads, strategy):
    model = _model().to("meta")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(32, 256, device="meta")
    # every statistic on: gradients, weights and updates every step, activations every step
    w = gradguard.watch(
        model, optimizer=opt, weights_every=1, activations_every=1, flush_every=1000, strategy=strategy
    )
    warmup = dict(count_reads)
    for _ in range(5):
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        w.step(loss=loss)
        opt.step()
    assert {k: v - warmup[k] for k, v in count_reads.items()} == {k: 0 for k in READS}
    assert len(w._ring_steps) == 5  # recorded, waiting for the flush


def test_cpu_path_reads_host_memory_only_through_numpy(count_reads):
    # On host tensors there is no device to wait for: the CPU path reads values with
    # numpy (a memory load). It never calls the Tensor methods that synchronise a device.
    model = _model()
    w = gradguard.watch(model, weights_every=1, activations_every=1, flush_every=1000)
    before = {k: v for k, v in count_reads.items() if k != "numpy"}
    for _ in range(3):
        model(torch.randn(8, 256)).sum().backward()
        w.step()
    after = {k: v for k, v in count_reads.items() if k != "numpy"}
    assert after == before
    w.close()
