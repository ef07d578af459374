"""Every script in examples/ runs as a user would run it, and leaves a readable store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import gradguard

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# How each example is run: the arguments after the interpreter ({store} is a fresh path).
# Every file in examples/ must be here, so a new example cannot miss CI.
COMMANDS: dict[str, list[str] | None] = {
    "plain_loop.py": ["{script}", "--store", "{store}", "--steps", "120"],
    "sinks_tensorboard.py": ["{script}", "--logdir", "{tmp}/tb"],
    "lightning_example.py": ["{script}", "--store", "{store}", "--max-steps", "20"],
    "transformers_example.py": ["{script}", "--store", "{store}", "--max-steps", "10"],
    "ddp_torchrun.py": None,  # launched through torchrun with 2 ranks by tests/test_distributed.py
}


def test_every_example_has_a_command():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(COMMANDS)


@pytest.mark.parametrize("name", sorted(n for n, c in COMMANDS.items() if c is not None))
def test_example_runs(name, tmp_path):
    script = EXAMPLES / name
    store = tmp_path / "run.db"
    command = COMMANDS[name]
    assert command is not None
    args = [a.format(script=script, store=store, tmp=tmp_path) for a in command]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr
    if "{store}" in command:
        trace = gradguard.load(store)
        assert len(trace) > 0 and len(trace.layers) > 0
    else:
        assert any((tmp_path / "tb").rglob("events.out.tfevents.*"))

