"""The SIGTERM handler a recording Watch installs: only while one is open, never over the program's own."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import gradguard
from gradguard.record import on_exit


def small() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def test_handler_lives_as_long_as_the_last_recording_watch(tmp_path):
    # A framework that saved and restored handlers around a run (Lightning's fit) can leave a stale
    # one from an earlier test; it acts as the default (test below). Start from the default.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    plain = gradguard.watch(small())  # no store: nothing to keep, nothing installed
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    a = gradguard.watch(small(), store=tmp_path / "a.db")
    b = gradguard.watch(small(), store=tmp_path / "b.db")
    assert signal.getsignal(signal.SIGTERM) is on_exit._on_sigterm
    a.close()
    assert signal.getsignal(signal.SIGTERM) is on_exit._on_sigterm  # b still holds steps in memory
    b.close()
    plain.close()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_the_programs_own_handler_is_kept(tmp_path):
    def mine(signum, frame):  # pragma: no cover - never called
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with gradguard.watch(small(), store=tmp_path / "run.db"):
            assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sigterm_during_a_flush_waits_for_its_commit(tmp_path):
    """SystemExit comes after the commit that was in progress, not inside it."""
    model = small()
    w = gradguard.watch(model, store=tmp_path / "run.db", flush_every=100)
    for _ in range(5):
        model(torch.randn(3, 4)).sum().backward()
        w.step()
    real_write = w._recorder.write

    def write_then_signal(*args, **kwargs):
        on_exit._on_sigterm(signal.SIGTERM, None)  # as if the signal arrived mid-write
        real_write(*args, **kwargs)

    assert signal.getsignal(signal.SIGTERM) is on_exit._on_sigterm
    w._recorder.write = write_then_signal
    with pytest.raises(SystemExit) as exit_:
        w.flush()
    assert exit_.value.code == 128 + signal.SIGTERM
    w.close()
    assert len(gradguard.load(tmp_path / "run.db")) == 5


def test_a_handler_a_framework_put_back_after_the_last_watch_acts_as_the_default(tmp_path):
    """Lightning saves the handlers it finds at fit start and restores them after: ours comes back, stale."""
    code = textwrap.dedent(f"""
        import os, signal, time
        from torch import nn
        import gradguard
        w = gradguard.watch(nn.Linear(2, 2), store={str(tmp_path / "run.db")!r})
        saved = signal.signal(signal.SIGTERM, lambda *a: None)  # the framework's own, during the run
        w.close()  # the last Watch closes while the framework's handler is installed
        signal.signal(signal.SIGTERM, saved)  # the framework restores what it found: gradguard's
        w2 = gradguard.watch(nn.Linear(2, 2), store={str(tmp_path / "run2.db")!r})
        assert signal.getsignal(signal.SIGTERM) is saved  # a new Watch takes it over as its own
        w2.close()
        signal.signal(signal.SIGTERM, saved)
        print("ready", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        print("survived", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "ready" in proc.stdout and "survived" not in proc.stdout, proc.stderr
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, proc.stderr)  # killed by it, not SystemExit(143)
