"""`gradguard diagnose TARGET`: JSON on stdout and nothing else, exit 0/1/2, one clear line for a bad TARGET."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from gradguard.cli import main

MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torch.nn import functional as F


    def deep_sigmoid():
        torch.manual_seed(0)
        layers = [nn.Linear(64, 32), nn.Sigmoid()]
        for _ in range(14):
            layers += [nn.Linear(32, 32), nn.Sigmoid()]
        return nn.Sequential(*layers, nn.Linear(32, 10))


    def healthy():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        for m in model:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        return model


    def with_data():
        x = torch.randn(64, 5)
        y = x.sum(1, keepdim=True)
        return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)), (x, y), F.mse_loss


    def with_optimizer():
        model, batch, loss = with_data()
        return model, batch, loss, torch.optim.Adam(model.parameters(), lr=1e-3)


    def raises():
        raise RuntimeError("cannot build the model today")


    def not_a_model():
        return 42


    def wrong_width():
        return nn.Sequential(nn.Linear(7, 3))
    """
)


@pytest.fixture()
def target(tmp_path: Path) -> Path:
    path = tmp_path / "models.py"
    path.write_text(MODELS)
    return path


def run(*args: str):
    return CliRunner().invoke(main, ["diagnose", *args])


def test_json_only_on_stdout_and_exit_1_on_an_error(target):
    result = run(f"{target}:deep_sigmoid", "--steps", "3", "--json", "--batch", "64")
    assert result.exit_code == 1, result.stderr
    data = json.loads(result.stdout)  # stdout is the JSON document and nothing else
    kinds = {f["kind"] for f in data["findings"]}
    assert "vanishing_gradient" in kinds
    for f in data["findings"]:
        assert set(f) >= {"kind", "layer", "step", "severity", "message", "evidence", "fixes"}
    assert any(f["severity"] == "error" for f in data["findings"])


def test_healthy_model_exits_0_and_prints_progress_on_stderr(target):
    result = run(f"{target}:healthy", "--steps", "5", "--data", "digits")
    assert result.exit_code == 0, result.output
    assert "short run" in result.stderr  # progress of the longer stages
    assert "gradguard diagnosis" in result.stdout and "digits" in result.stdout


def test_tuple_targets_with_and_without_optimizer(target):
    plain = run(f"{target}:with_data", "--steps", "3", "--json")
    assert plain.exit_code in (0, 1), plain.output
    assert "SGD" in json.loads(plain.stdout)["settings"]["optimizer"]
    given = run(f"{target}:with_optimizer", "--steps", "3", "--json")
    assert given.exit_code in (0, 1), given.output
    settings = json.loads(given.stdout)["settings"]
    assert "Adam" in settings["optimizer"] and settings["steps"] == 3


def test_try_fixes_table(target):
    result = run(f"{target}:deep_sigmoid", "--steps", "5", "--try-fixes", "--no-hessian", "--batch", "64")
    assert result.exit_code == 1
    assert "fixes tried" in result.stdout and "relu_he" in result.stdout and "none" in result.stdout


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("missing.py:make", "missing.py"),
        ("{target}:nope", "nope"),
        ("{target}:raises", "RuntimeError: cannot build the model today"),
        ("{target}:not_a_model", "int"),
        ("{target}:wrong_width", "could not run on the batch"),
        ("no_colon_here", "path/to/file.py:callable"),
    ],
)
def test_bad_targets_give_one_line_and_exit_2(target, tmp_path, spec, expected):
    result = run(spec.format(target=target), "--steps", "1")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0], result.stderr
    assert result.stdout == ""


def test_a_real_process_prints_no_traceback(target):
    bad = subprocess.run(
        [sys.executable, "-m", "gradguard.cli", "diagnose", f"{target}:raises"], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1
    typo = subprocess.run(
        [sys.executable, "-m", "gradguard.cli", "diagnose", f"{target}:healthy", "--setps", "3"],
        capture_output=True, text=True,
    )
    assert typo.returncode == 2 and "--setps" in typo.stderr and "Traceback" not in typo.stderr
