"""Readers (``gradguard.load``, ``gradguard summary``, ``gradguard report``) open a store again and
again while another process commits to it: never an error, never a partial step: every Trace read
is a prefix of the final one, row for row."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from test_kill_signals import CHILD, check_whole_rows

import gradguard
from gradguard.cli import main
from gradguard.record.store import load_findings

pytestmark = pytest.mark.slow


def test_readers_see_whole_committed_prefixes_while_a_writer_commits(tmp_path):
    store = tmp_path / "run.db"
    # flush_every=1: a commit every step, so reads land between, and during, many commits.
    writer = subprocess.Popen([sys.executable, CHILD, str(store), "--flush-every", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert writer.stdout is not None
    for line in writer.stdout:  # the store exists once the first commit is reported
        if "flushed" in json.loads(line):
            break
    runner = CliRunner()
    reads: list[gradguard.Trace] = []
    try:
        for i in range(60):
            reads.append(gradguard.load(store))
            load_findings(store)
            if i % 10 == 0:
                result = runner.invoke(main, ["summary", str(store)])
                assert result.exit_code == 0, result.output
            if i in (20, 40):
                result = runner.invoke(main, ["report", str(store), "-o", str(tmp_path / f"r{i}.html")])
                assert result.exit_code == 0, result.output
            assert writer.poll() is None, "the writer stopped early: " + writer.stderr.read()  # type: ignore[union-attr]
    finally:
        writer.send_signal(signal.SIGTERM)
        writer.communicate(timeout=60)
    final = gradguard.load(store)
    lengths = [len(t) for t in reads]
    assert lengths == sorted(lengths) and lengths[-1] > lengths[0], lengths  # it was writing all along
    check_whole_rows(final, "final")
    for t in reads:
        n = len(t)
        np.testing.assert_array_equal(t.steps, final.steps[:n])
        np.testing.assert_array_equal(t.values(), final.values()[:n])  # NaN where not measured, in both
        np.testing.assert_array_equal(t.loss, final.loss[:n])
