"""Clipping: PyTorch's numbers on finite gradients, and no NaN/inf ever spreads."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from gradguard.remedy.clip import AutoClip, ZScoreClip, adaptive_clip_grad_, clip_grad_norm_, clip_grad_value_


def _model(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).to(dtype)


def _with_grads(model: nn.Module, scale: float = 1.0, seed: int = 1) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=g) * scale).to(p.dtype)
    return model


def _copy(model: nn.Module) -> nn.Module:
    """A deep copy with the gradients too (Parameter's deepcopy drops .grad)."""
    out = copy.deepcopy(model)
    for p, q in zip(model.parameters(), out.parameters()):
        q.grad = None if p.grad is None else p.grad.clone()
    return out


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf])
@pytest.mark.parametrize("max_norm", [0.5, 1e6, 0.0])
def test_norm_clip_is_bit_for_bit_pytorch_on_finite_gradients(norm_type, max_norm):
    ours, theirs = _with_grads(_model()), _with_grads(_model())
    a = clip_grad_norm_(ours.parameters(), max_norm, norm_type)
    b = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm, norm_type)
    assert torch.equal(a, b)
    for x, y in zip(_grads(ours), _grads(theirs)):
        assert torch.equal(x, y)


def test_value_clip_is_bit_for_bit_pytorch():
    ours, theirs = _with_grads(_model(), scale=3.0), _with_grads(_model(), scale=3.0)
    clip_grad_value_(ours.parameters(), 0.7)
    torch.nn.utils.clip_grad_value_(theirs.parameters(), 0.7)
    assert all(torch.equal(x, y) for x, y in zip(_grads(ours), _grads(theirs)))


def test_agc_matches_the_papers_formula():
    model = _with_grads(_model(torch.float64), scale=5.0)
    before = [(p.detach().clone(), p.grad.clone()) for p in model.parameters()]
    frac = adaptive_clip_grad_(model.parameters(), clipping=0.01, eps=1e-3)
    n_units = n_clipped = 0
    for (w, g), p in zip(before, model.parameters()):
        rows_w = w.reshape(w.shape[0], -1) if w.dim() > 1 else w.reshape(1, -1)
        rows_g = g.reshape(g.shape[0], -1) if g.dim() > 1 else g.reshape(1, -1)
        expect = []
        for wi, gi in zip(rows_w, rows_g):  # Brock et al. 2021, eq. 3, unit by unit
            limit = 0.01 * max(float(wi.norm()), 1e-3)
            gn = float(gi.norm())
            n_units += 1
            if gn > limit:
                n_clipped += 1
                expect.append(gi * (limit / gn))
            else:
                expect.append(gi)
        torch.testing.assert_close(p.grad.reshape(len(expect), -1), torch.stack(expect), rtol=1e-12, atol=0)
    assert n_clipped > 0 and float(frac) == pytest.approx(n_clipped / n_units)


def test_agc_can_leave_out_the_classifier():
    model = _with_grads(_model(), scale=5.0)
    head = _grads(model)[-2:]
    adaptive_clip_grad_(model.parameters(), exclude=model[4].parameters())
    assert all(torch.equal(a, b) for a, b in zip(_grads(model)[-2:], head))


# -- the non-finite matrix --------------------------------------------------------------


def _poison(model: nn.Module, case: str) -> int:
    """Put a bad value in one gradient; returns the index of the poisoned parameter."""
    target = 2  # the second Linear's weight
    g = list(model.parameters())[target].grad
    if case == "nan":
        g[0, 0] = math.nan
    elif case == "inf":
        g[3, 1] = math.inf
    elif case == "all_nan":
        g.fill_(math.nan)
    elif case == "overflow":  # bf16 keeps fp32's range: an overflow is inf
        g[1, 1] = torch.tensor(3e38, dtype=torch.float32).to(g.dtype) * 10
    return target


def _norm_clip(model):
    clip_grad_norm_(model.parameters(), 0.5)


def _value_clip(model):
    clip_grad_value_(model.parameters(), 0.05)


def _agc(model):
    adaptive_clip_grad_(model.parameters(), clipping=0.01)


CLIPPERS = {"norm": _norm_clip, "value": _value_clip, "agc": _agc}


@pytest.mark.parametrize("case", ["nan", "inf", "all_nan", "overflow"])
@pytest.mark.parametrize("clipper", sorted(CLIPPERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_bad_value_never_changes_the_finite_gradients(case, clipper, dtype):
    clean = _with_grads(_model(dtype), scale=2.0)
    bad = _copy(clean)
    target = _poison(bad, case)
    # the reference: the same clipper on the other gradients, without the bad tensor
    without = _copy(clean)
    list(without.parameters())[target].grad = None
    CLIPPERS[clipper](bad)
    CLIPPERS[clipper](without)
    for i, (p, q) in enumerate(zip(bad.parameters(), without.parameters())):
        if i == target:
            assert (~torch.isfinite(p.grad)).any() or clipper == "value"  # still visible to a guard
            continue
        assert torch.isfinite(p.grad).all()
        assert torch.equal(p.grad, q.grad), f"parameter {i} changed by the bad value"


def test_pytorch_spreads_what_we_do_not():
    # the reason this module exists: one NaN in PyTorch's clip makes every gradient NaN
    model = _with_grads(_model())
    _poison(model, "nan")
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    assert all(torch.isnan(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("make", [lambda: AutoClip(10, history=8), lambda: ZScoreClip(warmup=3)])
def test_stateful_clippers_forget_a_bad_step(make):
    seen, skipped = make(), make()
    results = {}
    for step in range(12):
        for name, clipper in (("seen", seen), ("skipped", skipped)):
            if step == 6 and name == "skipped":
                continue  # this one never sees the bad step
            model = _with_grads(_model(), scale=1.0 + step, seed=step)
            if step == 6:
                _poison(model, "nan")
            result = clipper(model.parameters())
            assert torch.isfinite(result.clip_coef) and torch.isfinite(result.max_norm) | torch.isinf(result.max_norm)
            if step > 6:
                results.setdefault(step, {})[name] = (result, _grads(model))
    state = seen.state_dict()
    for value in state.values():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            assert not torch.isinf(value).any() and not (torch.isnan(value).any() and isinstance(seen, ZScoreClip))
    for step, pair in results.items():
        (r1, g1), (r2, g2) = pair["seen"], pair["skipped"]
        assert torch.equal(r1.clip_coef, r2.clip_coef) and torch.equal(r1.max_norm, r2.max_norm), step
        assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_autoclip_clips_at_the_percentile():
    clip = AutoClip(percentile=50, history=100)
    norms = []
    for step in range(9):
        model = _with_grads(_model(), scale=1.0 + step, seed=step)
        norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])))
        result = clip(model.parameters())
    median = float(torch.tensor(norms, dtype=torch.float64).quantile(0.5))
    assert float(result.max_norm) == pytest.approx(median, rel=1e-6)
    total = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
    assert total == pytest.approx(median, rel=1e-4)  # the last (largest) norm was clipped to it


def test_zscore_clips_a_spike_after_warmup():
    clip = ZScoreClip(z_threshold=2.0, warmup=5)
    for step in range(10):
        result = clip(_with_grads(_model(), scale=1.0, seed=step).parameters())
        assert float(result.clip_coef) == pytest.approx(1.0, abs=1e-5) or step >= 5
    spike = _with_grads(_model(), scale=100.0, seed=99)
    result = clip(spike.parameters())
    assert float(result.clip_coef) < 0.1
    assert float(torch.nn.utils.get_total_norm([p.grad for p in spike.parameters()])) == pytest.approx(
        float(result.max_norm), rel=1e-4
    )


def test_state_dict_round_trip():
    for make in (lambda: AutoClip(25, history=16), lambda: ZScoreClip(warmup=2)):
        a = make()
        for step in range(5):
            a(_with_grads(_model(), seed=step).parameters())
        b = make()
        b.load_state_dict(a.state_dict())
        m1, m2 = _with_grads(_model(), seed=42), _with_grads(_model(), seed=42)
        r1, r2 = a(m1.parameters()), b(m2.parameters())
        assert torch.equal(r1.clip_coef, r2.clip_coef)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: clip_grad_norm_(m.parameters(), -1.0), "max_norm must be a non-negative number"),
        (lambda m: clip_grad_value_(m.parameters(), float("nan")), "clip_value"),
        (lambda m: adaptive_clip_grad_(m.parameters(), clipping=0), "clipping must be a positive number"),
        (lambda m: AutoClip(percentile=0), "percentile"),
        (lambda m: AutoClip(history=0), "history"),
        (lambda m: ZScoreClip(alpha=1.5), "alpha"),
        (lambda m: clip_grad_norm_([1.0, 2.0], 1.0), "expected tensors"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(_with_grads(_model()))


def test_error_if_nonfinite():
    model = _with_grads(_model())
    _poison(model, "inf")
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_(model.parameters(), 1.0, error_if_nonfinite=True)
