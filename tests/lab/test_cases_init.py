"""The initialisation lab cases at default size: each reproduces its claim, with JSON numbers and a plot."""

from __future__ import annotations

import json

import pytest

from gradguard.lab.case import REGISTRY, Outcome
from gradguard.lab.cases import init
from gradguard.lab.runner import run_outcome as run

CASES = sorted(name for name, c in REGISTRY.items() if c.module == init.__name__)




def test_the_module_declares_its_seven_cases_in_its_group():
    names = {"glorot2010-saturation", "glorot2010-gradient-variance", "he2015-relu-depth",
             "saxe2014-orthogonal-jacobian", "saxe2014-deep-linear", "poole2016-meanfield",
             "schoenholz2017-trainability"}
    assert set(CASES) == names
    for name in CASES:
        c = REGISTRY[name]
        assert c.group == "init" and c.default
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
    # saxe2014-orthogonal-jacobian is the cheapest case (a few Jacobians of small random networks).
    first = run("saxe2014-orthogonal-jacobian")
    second = run("saxe2014-orthogonal-jacobian")
    assert json.dumps(first.measured, allow_nan=False) == json.dumps(second.measured, allow_nan=False)
