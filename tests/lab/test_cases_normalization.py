"""The normalisation lab cases at default size: each reproduces its claim, with JSON numbers and a plot."""

from __future__ import annotations

import json

import pytest

from gradguard.lab.case import REGISTRY, Outcome
from gradguard.lab.cases import normalization
from gradguard.lab.runner import run_outcome as run

CASES = sorted(name for name, c in REGISTRY.items() if c.module == normalization.__name__)




def test_the_module_declares_its_six_cases_in_its_group():
    names = {"ioffe2015-input-drift", "ioffe2015-deep-sigmoid", "he2016-degradation", "balduzzi2017-shattered",
             "residual-variance", "skipinit-fixup"}
    assert set(CASES) == names
    for name in CASES:
        c = REGISTRY[name]
        assert c.group == "normalization" and c.default
        assert c.source.citation and c.source.claim and c.question and c.setup


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
    # residual-variance is the cheapest case (one forward and backward pass per network).
    first = run("residual-variance")
    second = run("residual-variance")
    assert json.dumps(first.measured, allow_nan=False) == json.dumps(second.measured, allow_nan=False)
