"""The recurrent lab cases at default size: each reproduces its claim, with JSON numbers and a plot."""

from __future__ import annotations

import json

import pytest
import torch

from gradguard.lab.case import REGISTRY, Outcome
from gradguard.lab.cases import recurrent
from gradguard.lab.runner import run_outcome as run

CASES = sorted(name for name, c in REGISTRY.items() if c.module == recurrent.__name__)




def test_the_module_declares_its_six_cases_in_its_group():
    assert sorted([
        "hochreiter1997-adding", "rnn-gradient-through-time", "pascanu2013-clipping", "brock2021-agc",
        "lecun1998-stability", "cohen2021-edge-of-stability",
    ]) == CASES
    for name in CASES:
        c = REGISTRY[name]
        assert c.group == "recurrent" and c.default
        assert c.source.citation and c.source.claim and c.question and c.setup


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_case_reproduces_its_claim(name):
    outcome = run(name)
    assert isinstance(outcome, Outcome)
    assert outcome.passed, (outcome.measured, outcome.expected)
    json.dumps([outcome.measured, outcome.expected], allow_nan=False)
    assert outcome.measured and outcome.expected
    assert outcome.interpretation
    assert outcome.figure is not None
    assert any(ax.has_data() for ax in outcome.figure.axes)


def test_same_seed_gives_identical_numbers():
    # rnn-gradient-through-time is the cheapest case (one forward and backward pass per recurrence).
    first = run("rnn-gradient-through-time")
    second = run("rnn-gradient-through-time")
    assert json.dumps(first.measured, allow_nan=False) == json.dumps(second.measured, allow_nan=False)


def test_a_diverging_run_stops_at_the_first_nonfinite_loss():
    # The training helper every case uses: it must stop, and say where, instead of training on NaN.
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    opt = torch.optim.SGD(model.parameters(), lr=50.0)
    result = recurrent.train(model, opt, lambda step: (x, y), torch.nn.functional.mse_loss, 500)
    assert result.diverged_at is not None and result.diverged_at < 500
    assert len(result.loss) == result.diverged_at + 1
    assert recurrent.diverged(result)
