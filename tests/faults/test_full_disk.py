"""A disk that fills up under a recording training process (a real child process).

Expected, and checked: training goes on to its last step with finite parameters; gradguard
warns once, stops writing the store and keeps recording in memory (``Watch.trace``,
``Watch.store_error`` says why); the store stays readable and holds exactly the steps
committed before the disk filled, each row whole; ``gradguard report`` works on it.

The disk: a 256 KiB tmpfs where this process may mount one (root), else a file size limit
(``RLIMIT_FSIZE``, with SIGXFSZ ignored so that writes fail with EFBIG instead).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from test_kill_signals import CHILD, FLUSH, check_whole_rows

import gradguard
from gradguard.cli import main

pytestmark = pytest.mark.slow

STEPS = 250


@pytest.fixture(params=["tmpfs", "fsize"])
def small_disk(request, tmp_path):
    """(folder to write the store in, extra child arguments, what it is)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if request.param == "tmpfs":
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)],
                                 capture_output=True).returncode == 0
        if mounted:
            yield folder, [], "a full 256 KiB tmpfs"
            subprocess.run(["umount", str(folder)], check=True)
            return
    yield folder, ["--fsize", "150000"], "a 150,000-byte file size limit"


def test_full_disk_stops_recording_not_training(small_disk, tmp_path):
    folder, args, what = small_disk
    store = folder / "run.db"
    proc = subprocess.run([sys.executable, CHILD, str(store), "--flush-every", str(FLUSH), "--steps", str(STEPS),
                           *args], capture_output=True, text=True, timeout=300)
    ctx = f"({what}; stderr: {proc.stderr[-3000:]})"
    assert proc.returncode == 0, ctx
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert events[-1]["done"] == STEPS and events[-1]["params_finite"], ctx
    assert events[-1]["store_error"], ctx  # the disk did fill up
    assert proc.stderr.count("RuntimeWarning: gradguard: cannot write to the store") == 1, ctx
    flushes = [e for e in events if "flushed" in e]
    committed = max(e["flushed"] for e in flushes if e["recording"])
    # Recording stopped once and for all, and the in-memory trace kept every step.
    assert [e["recording"] for e in flushes] == sorted((e["recording"] for e in flushes), reverse=True), ctx
    assert flushes[-1] == {"flushed": STEPS, "recording": False}, ctx

    trace = gradguard.load(store)
    assert len(trace) == committed, (len(trace), committed, ctx)
    check_whole_rows(trace, ctx)
    out = tmp_path / "report.html"
    result = CliRunner().invoke(main, ["report", str(store), "-o", str(out)])
    assert result.exit_code == 0, (result.output, ctx)
    assert "</html>" in out.read_text(), ctx


def test_store_error_warns_once_and_training_goes_on_in_process(tmp_path):
    """The same in one process, where the Trace can be compared: a store whose disk is gone."""
    import warnings

    import torch
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = gradguard.watch(model, store=tmp_path / "run.db", flush_every=2)
    x = torch.randn(8, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(10):
            if step == 5:
                w._recorder._db.close()  # the store's connection fails from here on, as on a lost volume
            opt.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            w.step(loss=loss)
            opt.step()
        w.close()
    messages = [str(c.message) for c in caught if issubclass(c.category, RuntimeWarning)]
    assert len(messages) == 1 and "recording to it stopped at step 4" in messages[0], messages
    assert w.store_error is not None
    assert len(w.trace) == 10
    assert gradguard.load(tmp_path / "run.db").steps.tolist() == [0, 1, 2, 3]
