"""The options the framework callbacks share: one norm pass for a guard and a clip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradguard import NonFiniteGuard
from gradguard.integrations._options import apply_clip, shared_norms


def _params(dtypes: list[torch.dtype], bad: int) -> list[nn.Parameter]:
    params = [nn.Parameter(torch.full((i + 2,), 0.5, dtype=d)) for i, d in enumerate(dtypes)]
    for i, p in enumerate(params):
        p.grad = torch.full_like(p, float(i + 1))
    params[bad].grad[0] = float("inf")
    return params


@pytest.mark.parametrize(
    "dtypes",
    [
        [torch.float64, torch.float64, torch.float64],
        # torch groups gradients by dtype ([0, 2], then [1]): the flags must still follow the parameters
        [torch.float64, torch.float32, torch.float64],
    ],
)
@pytest.mark.parametrize("poisoned", [0, 1, 2])
def test_the_guard_flags_the_parameter_whose_gradient_is_bad(dtypes, poisoned):
    params = _params(dtypes, bad=poisoned)
    guard = NonFiniteGuard(torch.optim.SGD(params, lr=0.1))
    norms = shared_norms(1.0, True, params)
    any_bad, _, bad = guard._check(None, None if norms is None else norms[0])
    assert bool(any_bad) and bad.tolist() == [i == poisoned for i in range(3)]


def test_a_clip_with_shared_norms_matches_clip_grad_norm():
    params = [nn.Parameter(torch.randn(5, dtype=torch.float64)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p) * 3
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    for t, p in zip(twins, params):
        t.grad = p.grad.clone()
    expected = torch.nn.utils.clip_grad_norm_(twins, 1.0)
    norms = shared_norms(1.0, True, params)
    assert norms is not None  # one dtype, one device: shared
    total = apply_clip(1.0, params, norms)
    assert torch.equal(total, expected)
    assert float(expected) > 1.0  # clipping acted
    for p, t in zip(params, twins):
        torch.testing.assert_close(p.grad, t.grad, rtol=0, atol=0)  # the same gradients as torch's clip


def test_nothing_is_shared_without_a_guard_or_with_another_clipper():
    params = _params([torch.float32] * 2, bad=0)
    assert shared_norms(1.0, False, params) is None
    assert shared_norms(lambda ps: None, True, params) is None
