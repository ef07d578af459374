"""SIGKILL and SIGTERM at random moments of a recorded training process (a real child process,
committing every 3 steps): the store opens, holds every committed step whole, and reports.

SIGKILL keeps every step up to the last commit. SIGTERM keeps every step recorded: while a
Watch with a store is open it turns SIGTERM into ``SystemExit(143)``, so the Watch closes and
commits (see ``gradguard.record.on_exit``). The moments come from ``random.Random(seed)``; the
seed is fresh each session (``GRADGUARD_FAULT_SEED`` replays one) and in every message.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import gradguard
from gradguard.cli import main

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("GRADGUARD_FAULT_SEED", random.SystemRandom().randrange(2**31)))
CHILD = str(Path(__file__).with_name("fault_child.py"))
FLUSH = 3
LAYERS = [str(i) for i in range(0, 13, 2)]


class Progress:
    """What the child said: the last step it recorded, the rows its store took."""

    def __init__(self) -> None:
        self.step, self.committed, self.events = -1, 0, []

    def read(self, line: str) -> None:
        msg = json.loads(line)
        self.events.append(msg)
        if "step" in msg:
            self.step = msg["step"]
        if msg.get("recording"):
            self.committed = msg["flushed"]


def start(store: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, CHILD, str(store), "--flush-every", str(FLUSH), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_at_random(store: Path, sig: int, rng: random.Random) -> tuple[subprocess.Popen, Progress, str]:
    """Start the child, let it run a random number of steps, send ``sig`` after a random delay."""
    proc = start(store)
    after, delay = rng.randint(0, 40), rng.uniform(0, 0.005)
    progress = Progress()
    assert proc.stdout is not None
    for line in proc.stdout:
        progress.read(line)
        if progress.step >= after:
            time.sleep(delay)
            os.kill(proc.pid, sig)
            break
    out, err = proc.communicate(timeout=60)
    for line in out.splitlines():  # what it said before the signal took effect
        progress.read(line)
    return proc, progress, f"after step {after} + {delay * 1e3:.2f} ms, stderr: {err[-2000:]}"


def check_whole_rows(trace: gradguard.Trace, ctx: str) -> None:
    """Steps 0..n-1, each row complete: every layer's gradient statistics, the loss, weights on even steps."""
    np.testing.assert_array_equal(trace.steps, np.arange(len(trace)), err_msg=ctx)
    assert trace.layers == LAYERS, ctx
    assert np.isfinite(trace.metric("grad_norm")).all(), ctx
    assert (trace.metric("grad_nonfinite") == 0).all(), ctx
    assert trace.loss_given.all() and np.isfinite(trace.loss).all(), ctx
    weights = trace.metric("weight_norm")
    assert np.isfinite(weights[trace.steps % 2 == 0]).all(), ctx


def check_reports(store: Path, tmp_path: Path, rows: int, ctx: str) -> None:
    runner = CliRunner()
    out = tmp_path / "report.html"
    result = runner.invoke(main, ["report", str(store), "-o", str(out)])
    assert result.exit_code == 0, (result.output, ctx)
    assert out.stat().st_size > 1000 and "</html>" in out.read_text(), ctx
    result = runner.invoke(main, ["summary", str(store)])
    assert result.exit_code == 0, (result.output, ctx)
    assert f"{rows} recorded steps" in result.output, (result.output, ctx)


@pytest.mark.parametrize("trial", range(3))
def test_sigkill_keeps_every_committed_step(trial, tmp_path):
    rng = random.Random(f"{SEED}-sigkill-{trial}")
    store = tmp_path / "run.db"
    proc, progress, where = kill_at_random(store, signal.SIGKILL, rng)
    ctx = f"(GRADGUARD_FAULT_SEED={SEED}, {where})"
    assert proc.returncode == -signal.SIGKILL, ctx
    trace = gradguard.load(store)
    # Every commit the child saw land is there; at most the steps it recorded; whole commits only.
    assert progress.committed <= len(trace) <= progress.step + 1, (len(trace), progress.step, ctx)
    assert len(trace) % FLUSH == 0, ctx
    check_whole_rows(trace, ctx)
    if trial == 0 and len(trace):  # the reports once: they cost seconds
        check_reports(store, tmp_path, len(trace), ctx)


@pytest.mark.parametrize("trial", range(3))
def test_sigterm_commits_every_recorded_step_on_the_way_out(trial, tmp_path):
    rng = random.Random(f"{SEED}-sigterm-{trial}")
    store = tmp_path / "run.db"
    proc, progress, where = kill_at_random(store, signal.SIGTERM, rng)
    ctx = f"(GRADGUARD_FAULT_SEED={SEED}, {where})"
    assert proc.returncode == 128 + signal.SIGTERM, ctx
    trace = gradguard.load(store)
    # The signal can land after w.step() recorded a step and before the child said so: one more.
    assert progress.step + 1 <= len(trace) <= progress.step + 2, (len(trace), progress.step, ctx)
    assert progress.events[-1] == {"flushed": len(trace), "recording": True}, ctx  # the flush on the way out
    check_whole_rows(trace, ctx)
    if trial == 0:
        check_reports(store, tmp_path, len(trace), ctx)


def test_sigterm_handler_of_the_program_is_left_alone(tmp_path):
    """A program that handles SIGTERM itself keeps its handler: gradguard installs none."""
    store = tmp_path / "run.db"
    proc = start(store, "--own-sigterm")
    assert proc.stdout is not None
    for line in proc.stdout:
        if json.loads(line).get("step") == 10:
            os.kill(proc.pid, signal.SIGTERM)
            break
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 7  # the program's own handler ran (sys.exit(7))
    assert '{"own_handler": true}' in out
    # sys.exit unwinds too, so the Watch still commits at exit (atexit).
    assert len(gradguard.load(store)) >= 11
