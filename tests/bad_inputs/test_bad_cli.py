"""Bad input on the command line: one ``Error:`` line, exit status 2, never a traceback, never a hang.

The matrix runs in-process through click's runner (stderr apart from stdout, and any exception
other than SystemExit is a traceback a user would see); one test runs the real entry point.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import gradguard as gg
from gradguard.cli import main

TARGET = """
from torch import nn

def make():
    return nn.Sequential(nn.Linear(64, 10))

def wrong_shape():
    return nn.Sequential(nn.Linear(3, 10))

def returns_none():
    return None

def raises():
    raise RuntimeError("boom")
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    model = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 1))
    with gg.watch(model, store=d / "good.db", flush_every=2) as w:
        for _ in range(3):
            model(torch.randn(3, 4)).sum().backward()
            w.step(loss=1.0)
    w.trace.save(d / "good.npz")
    data = (d / "good.db").read_bytes()
    (d / "trunc.db").write_bytes(data[: len(data) // 3])
    (d / "newer.db").write_bytes(data)
    with sqlite3.connect(d / "newer.db") as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.close()
    (d / "random.db").write_bytes(os.urandom(4096))
    (d / "random.npz").write_bytes(os.urandom(1000))
    (d / "empty.db").write_bytes(b"")
    (d / "folder.db").mkdir()
    (d / "target.py").write_text(TARGET)
    return d


# (arguments, with {d} the folder of the fixture files) -> a fragment of the one Error: line
CASES = [
    (["summary", "{d}/missing.db"], "no such file"),
    (["summary", "{d}/random.db"], "not a gradguard store"),
    (["summary", "{d}/empty.db"], "not a gradguard store"),
    (["summary", "{d}/trunc.db"], "not a readable gradguard store"),
    (["summary", "{d}/newer.db"], "newer gradguard"),
    (["summary", "{d}/random.npz"], "not a gradguard store"),
    (["summary", "{d}/folder.db"], "is a directory"),
    (["summary", "--lats", "3", "{d}/good.db"], "Did you mean '--last'?"),
    (["summary", "--last", "0", "{d}/good.db"], "must be at least 1"),
    (["sumary", "{d}/good.db"], "No such command 'sumary'"),
    (["report", "{d}/missing.db"], "no such file"),
    (["report", "{d}/random.db", "-o", "{d}/r.html"], "not a gradguard store"),
    (["report", "{d}/trunc.db", "-o", "{d}/r.html"], "not a readable gradguard store"),
    (["report", "{d}/newer.db", "-o", "{d}/r.html"], "newer gradguard"),
    (["report", "{d}/folder.db", "-o", "{d}/r.html"], "not a file"),
    (["report", "{d}/good.db", "-o", "{d}/folder.db"], "is a directory"),
    (["report", "--ouput", "x.html", "{d}/good.db"], "Did you mean '--output'?"),
    (["demo", "--dpeth", "3"], "Did you mean '--depth'?"),
    (["demo", "--depth", "0"], "must be at least 1"),
    (["demo", "--activation", "gelu"], "'gelu' is not one of"),
    (["demo", "--depth", "2", "--steps", "2", "--store", "{d}/no/such/folder/run.db"], "does not exist"),
    (["demo", "--depth", "2", "--steps", "2", "--store", "{d}/random.db"], "not a gradguard store"),
    (["diagnose", "{d}/missing.py:make"], "no such file"),
    (["diagnose", "{d}/target.py"], "TARGET must be path/to/file.py:callable"),
    (["diagnose", "{d}/target.py:nothing"], "nothing"),
    (["diagnose", "no_such_module_xyz:f"], "cannot import 'no_such_module_xyz'"),
    (["diagnose", "{d}/target.py:returns_none"], "returned a NoneType"),
    (["diagnose", "{d}/target.py:raises"], "raised RuntimeError: boom"),
    (["diagnose", "--steps", "1", "--no-hessian", "{d}/target.py:wrong_shape"], "could not run on the batch"),
    (["diagnose", "--data", "{d}/missing.npz", "{d}/target.py:make"], "no such file"),
    (["diagnose", "--data", "{d}/random.npz", "{d}/target.py:make"], "cannot read --data"),
    (["diagnose", "--data", "{d}/good.npz", "{d}/target.py:make"], "needs arrays x and y"),
    (["diagnose", "--stpes", "3", "{d}/target.py:make"], "'--steps'"),
    (["diagnose", "--steps", "-1", "{d}/target.py:make"], "must be at least 0"),
    (["lab", "--jbos", "2"], "'--jobs'"),
    (["lab", "lst"], "Did you mean 'list'?"),
    (["lab", "list", "--cases", "{d}/missing.py"], "does not exist"),
    (["lab", "run"], "Missing argument 'CASE...'"),
    (["lab", "run", "no-such-case"], "no lab case called 'no-such-case'"),
    (["lab", "run", "--cases", "{d}/missing.py", "x"], "does not exist"),
    (["lab", "run", "--jobs", "0", "x"], "0 is not in the range"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_one_clear_error(files, args, message):
    argv = [a.format(d=files) for a in args]
    result = CliRunner().invoke(main, argv, env={"COLUMNS": "200"})
    # Anything but SystemExit escaping the command would be a traceback in a terminal.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    assert result.exit_code == 2, (result.exit_code, result.output)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert message in errors[0], errors[0]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout


@pytest.mark.slow
def test_the_real_entry_point_prints_no_traceback(files):
    """The installed command, in a fresh process: exit 2, one Error: line, no traceback, within a time limit."""
    for args, message in [(["summary", f"{files}/newer.db"], "newer gradguard"),
                          (["report", f"{files}/trunc.db", "-o", f"{files}/r.html"], "not a readable"),
                          (["diagnose", f"{files}/target.py:raises"], "boom")]:
        out = subprocess.run([sys.executable, "-m", "gradguard.cli", *args], capture_output=True, text=True,
                             timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 2, out.stderr
        assert "Traceback" not in out.stderr
        errors = [line for line in out.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and message in errors[0], out.stderr
