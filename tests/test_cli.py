"""The gradguard command line, run as a user would (a real subprocess for the entry point)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import gradguard
from gradguard.cli import main


def test_help_and_version():
    out = subprocess.run([sys.executable, "-m", "gradguard.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "summary" in out.stdout and "demo" in out.stdout
    version = CliRunner().invoke(main, ["--version"])
    assert version.exit_code == 0 and gradguard.__version__ in version.output


def test_summary_of_a_store(tmp_path):
    store = tmp_path / "run.db"
    model = nn.Sequential(*[m for _ in range(12) for m in (nn.Linear(16, 16), nn.Sigmoid())], nn.Linear(16, 2))
    with gradguard.watch(model, store=store, activations_every=2) as w:
        for _ in range(3):
            model(torch.randn(8, 16)).sum().backward()
            w.step(loss=1.0)
    result = CliRunner().invoke(main, ["summary", str(store)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "24" in result.output and "vanishing_gradient" in result.output and "3 recorded steps" in result.output
    # activations are shown from their latest sample (step 2), not as a median over unsampled steps
    from gradguard.report.terminal import _fmt

    latest_std = w.trace.metric("act_std")[2, 0]
    assert not np.isnan(latest_std) and _fmt(latest_std) in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["summary", "missing.db"], "no such file"),
        (["summary", "notes.txt"], "not a gradguard store"),
        (["summary", "--lats", "3", "x.db"], "Did you mean '--last'?"),
        (["sumary", "x.db"], "No such command 'sumary'"),
        (["summary", "--last", "0", "notes.txt"], "must be at least 1"),
    ],
)
def test_cli_errors_are_one_clear_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not a store")
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_demo_finds_vanishing_and_measures_the_fix(tmp_path):
    store = tmp_path / "demo.db"
    result = CliRunner().invoke(main, ["demo", "--depth", "12", "--steps", "60", "--store", str(store)],
                                env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "vanishing_gradient" in result.output
    assert "ReLU with He initialisation" in result.output
    assert len(gradguard.load(store)) == 60
