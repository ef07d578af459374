"""A training process killed with SIGKILL keeps every step up to its last flush."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from click.testing import CliRunner

import gradguard
from gradguard.cli import main

pytestmark = pytest.mark.slow

CHILD = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    import gradguard
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(32, 64), nn.Sigmoid(), nn.Linear(64, 64), nn.Sigmoid(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = gradguard.watch(model, optimizer=opt, store=sys.argv[1], flush_every=5, activations_every=3)
    x, y = torch.randn(64, 32), torch.randint(0, 10, (64,))
    flushed = 0
    while True:  # runs until killed
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        w.step(loss=loss)
        opt.step()
        if len(w.trace) != flushed:
            flushed = len(w.trace)
            print(flushed, flush=True)
    """
)


def test_sigkill_mid_run_keeps_every_flushed_step(tmp_path):
    store = tmp_path / "run.db"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(store)], stdout=subprocess.PIPE, text=True)
    seen = 0
    deadline = time.time() + 120
    while seen < 40 and time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen = int(line)
    # a reader opens the store while the writer is still committing
    live = gradguard.load(store)
    assert len(live) >= seen
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert seen >= 40, "the child did not get far enough"

    trace = gradguard.load(store)
    assert len(trace) >= seen  # every step up to the last flush it reported, maybe more
    assert len(trace) % 5 == 0  # whole flushes only: no torn transaction
    np.testing.assert_array_equal(trace.steps, np.arange(len(trace)))
    assert np.isfinite(trace.metric("grad_norm")).all()
    assert trace.loss_given.all() and np.isfinite(trace.loss).all()
    assert trace.layers == ["0", "2", "4"]
    assert trace.meta["torch_version"]

    result = CliRunner().invoke(main, ["summary", str(store)])
    assert result.exit_code == 0, result.output
    assert f"{len(trace)} recorded steps" in result.output
    for name in trace.layers:
        assert name in result.output
