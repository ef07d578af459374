"""Property-based checks against float64 references (numpy), for inputs tests/probe and tests/remedy leave out.

tests/probe/test_kernels.py covers host_stats/device_stats on float32 lists; here: every dtype,
random shapes, magnitudes from 1e-30 to 1e30 with NaN/inf sprinkled in, host_stats_one,
host_sumsq, and GradProbe's per-layer reduction. tests/remedy/test_clip.py covers the clippers
on fixed models; here: random shapes, magnitudes and dtypes, and the stateful clippers' thresholds
over random sequences of steps, against reference implementations written from their docstrings.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from gradguard import AutoClip, ZScoreClip, adaptive_clip_grad_, clip_grad_norm_, clip_grad_value_
from gradguard.probe.grads import GradProbe
from gradguard.probe.kernels import device_stats, host_stats, host_stats_one, host_sumsq
from gradguard.probe.layers import find_layers

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def tensors(draw, dtypes=DTYPES, lo=-30, hi=30, bad=True, max_numel=64, shape=None):
    """A tensor of a random shape and dtype, elements of magnitude ~10**e for a drawn e in [lo, hi]."""
    shape = list(shape) if shape is not None else draw(st.lists(st.integers(0, 5), min_size=0, max_size=3))
    n = int(np.prod(shape)) if shape else 1
    if n > max_numel:
        shape, n = [max_numel], max_numel
    seed = draw(st.integers(0, 2**31 - 1))
    exponent = draw(st.integers(lo, hi))
    rng = np.random.default_rng(seed)
    # Each element within a decade or two of 10**exponent, both signs, some exact zeros.
    values = rng.standard_normal(n) * 10.0 ** (exponent + rng.uniform(-1, 1, n))
    values[rng.random(n) < 0.1] = 0.0
    if bad and n and draw(st.booleans()):
        k = draw(st.integers(1, min(n, 3)))
        values[rng.choice(n, k, replace=False)] = rng.choice([math.nan, math.inf, -math.inf], k)
    return torch.tensor(values.reshape(shape)).to(draw(st.sampled_from(dtypes)))


def reference(t: torch.Tensor) -> np.ndarray:
    """float64 (sum of squares of finite elements, their max-abs, count of NaN/inf) of the tensor as stored."""
    x = t.detach().double().numpy().reshape(-1)
    finite = np.isfinite(x)
    clean = np.where(finite, x, 0.0)
    amax = float(np.abs(clean).max()) if x.size else 0.0
    sumsq = float(np.sum((clean / amax) ** 2) * amax * amax) if amax > 0 else 0.0
    return np.array([sumsq, amax, float((~finite).sum())])


def close(got, ref, t):
    # fp16/bf16 are reduced in fp32: a sum of squares of n elements is good to about n fp32 ulps.
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5 if t.dtype == torch.float64 else 2e-5, atol=0,
                               err_msg=f"sumsq {t.dtype} {tuple(t.shape)}")
    assert got[1] == ref[1], (got, ref, t.dtype)  # max-abs is an element: exact
    assert got[2] == ref[2], (got, ref, t.dtype)


@SETTINGS
@given(st.lists(tensors(), min_size=1, max_size=5))
def test_kernels_match_float64(ts):
    host, dev = host_stats(ts), device_stats(ts).numpy()
    for i, t in enumerate(ts):
        ref = reference(t)
        close(host[i], ref, t)
        close(dev[i], ref, t)
        close(np.array(host_stats_one(t)), ref, t)


@SETTINGS
@given(st.lists(tensors(), min_size=1, max_size=5))
def test_host_sumsq_matches_float64(ts):
    got = host_sumsq(ts)
    for g, t in zip(got, ts):
        np.testing.assert_allclose(g, reference(t)[0], rtol=2e-5, atol=0)


@SETTINGS
@given(st.data(), st.sampled_from(DTYPES))
def test_grad_probe_per_layer_matches_float64(data, dtype):
    # Layers of one, two and one parameters; one parameter has no gradient (a layer of only that is NaN).
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2), nn.LayerNorm(2)).to(dtype)
    params = list(model.parameters())
    missing = data.draw(st.sampled_from([None, 4, 5]))  # LayerNorm's weight or bias
    for i, p in enumerate(params):
        p.grad = None if i == missing else data.draw(tensors(dtypes=[dtype], shape=p.shape))
    index = find_layers(model)
    probe = GradProbe(index, torch.device("cpu"), "fused")
    got = probe.measure().numpy()
    # An ordinary step's two paths: the general one, and host_norms (what the Watch takes on the host).
    general = probe.measure(full=False).numpy()
    host = np.empty_like(general)
    probe.host_norms(host, None, None)
    for layer, module in enumerate(index.modules):
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        if not grads:
            assert all(np.isnan(a[:, layer]).all() for a in (got, general, host))
            continue
        refs = np.array([reference(g) for g in grads])
        t = grads[0]
        np.testing.assert_allclose(got[0, layer], math.sqrt(refs[:, 0].sum()), rtol=2e-5, err_msg=str(dtype))
        assert got[1, layer] == refs[:, 1].max() and got[2, layer] == refs[:, 2].sum(), (got[:, layer], t.dtype)
        for ordinary in (general, host):
            np.testing.assert_allclose(ordinary[0, layer], math.sqrt(refs[:, 0].sum()), rtol=2e-5, err_msg=str(dtype))
            assert np.isnan(ordinary[1, layer]) and ordinary[2, layer] == refs[:, 2].sum(), (ordinary[:, layer], dtype)


# -- clippers ------------------------------------------------------------------------------------------------
def _params(ts: list[torch.Tensor]) -> list[nn.Parameter]:
    out = []
    for t in ts:
        p = nn.Parameter(torch.randn(t.shape, dtype=torch.float64).to(t.dtype))
        p.grad = t.clone()
        out.append(p)
    return out


def _finite_grads(dtypes=(torch.float32, torch.float64)):
    # Norms of these cannot overflow fp32, so "finite elements" and "finite norm" agree. Not empty:
    # the inf-norm of an empty tensor raises in torch's clip_grad_norm_ and ours alike.
    nonempty = tensors(dtypes=list(dtypes), lo=-10, hi=10, bad=False).filter(lambda t: t.numel() > 0)
    return st.lists(nonempty, min_size=1, max_size=4)


@SETTINGS
@given(_finite_grads(), st.floats(1e-6, 1e6), st.sampled_from([2.0, 1.0, math.inf]))
def test_norm_clip_is_torch_and_float64_on_finite(ts, max_norm, norm_type):
    ours, theirs = _params(ts), _params(ts)
    total = clip_grad_norm_(ours, max_norm, norm_type)
    assert torch.equal(total, torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type))  # bit for bit
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, theirs))
    flat = np.concatenate([t.double().numpy().reshape(-1) for t in ts])
    ref = np.linalg.norm(flat, norm_type) if flat.size else 0.0
    np.testing.assert_allclose(float(total), ref, rtol=1e-5)
    coef = min(1.0, max_norm / (ref + 1e-6))
    for p, t in zip(ours, ts):
        np.testing.assert_allclose(p.grad.double().numpy(), t.double().numpy() * coef, rtol=1e-5, atol=0)


@SETTINGS
@given(st.lists(tensors(dtypes=[torch.float32, torch.float64], lo=-10, hi=10), min_size=1, max_size=4),
       st.floats(1e-3, 1e3))
def test_norm_clip_with_nan_or_inf_scales_finite_tensors_by_the_finite_norm(ts, max_norm):
    ps = _params(ts)
    clip_grad_norm_(ps, max_norm)
    finite = [t for t in ts if torch.isfinite(t).all()]
    clean = math.sqrt(sum(float((t.double() ** 2).sum()) for t in finite))
    coef = min(1.0, max_norm / (clean + 1e-6))
    for p, t in zip(ps, ts):
        ref = t.double().numpy() * coef
        np.testing.assert_allclose(p.grad.double().numpy(), ref, rtol=1e-5, atol=0)  # NaN where NaN, inf where inf


@SETTINGS
@given(st.lists(tensors(dtypes=DTYPES), min_size=1, max_size=4), st.floats(1e-30, 1e30))
def test_value_clip_is_clamp_and_torch(ts, clip_value):
    ours, theirs = _params(ts), _params(ts)
    clip_grad_value_(ours, clip_value)
    in_range = all(clip_value <= torch.finfo(t.dtype).max for t in ts)
    if in_range:  # torch raises on a bound beyond the dtype's range; below it, ours is torch's
        torch.nn.utils.clip_grad_value_(theirs, clip_value)
    for a, b, t in zip(ours, theirs, ts):
        if in_range:
            assert torch.equal(a.grad.nan_to_num(7.0), b.grad.nan_to_num(7.0))
        # The bound as the dtype rounds it, and at most the dtype's largest finite value.
        limit = min(float(torch.tensor(clip_value, dtype=torch.float64).to(t.dtype)), torch.finfo(t.dtype).max)
        ref = np.clip(t.double().numpy(), -limit, limit)
        np.testing.assert_array_equal(a.grad.double().numpy(), ref)


@SETTINGS
@given(st.lists(tensors(dtypes=[torch.float32, torch.float64], lo=-6, hi=6), min_size=1, max_size=4),
       st.floats(1e-3, 1.0), st.floats(1e-6, 1e-1))
def test_agc_matches_the_float64_formula(ts, clipping, eps):
    ps = _params(ts)
    weights = [p.detach().double().numpy() for p in ps]
    adaptive_clip_grad_(ps, clipping=clipping, eps=eps)
    for p, w, t in zip(ps, weights, ts):
        g = t.double().numpy()
        if g.size == 0:
            continue
        if g.ndim <= 1:  # one unit: the whole tensor
            rows_w, rows_g = w.reshape(1, -1), g.reshape(1, -1)
        else:
            rows_w, rows_g = w.reshape(w.shape[0], -1), g.reshape(g.shape[0], -1)
        out = rows_g.copy()
        for i in range(rows_g.shape[0]):
            gn = float(np.linalg.norm(rows_g[i])) if np.isfinite(rows_g[i]).all() else math.nan
            limit = max(float(np.linalg.norm(rows_w[i])), eps) * clipping
            if math.isfinite(gn) and gn > limit:
                out[i] = rows_g[i] * (limit / max(gn, 1e-6))
        np.testing.assert_allclose(p.grad.double().numpy().reshape(out.shape), out, rtol=1e-5, atol=1e-300)


@st.composite
def runs(draw):
    """A short run: per step, a gradient scale (or a poisoned step)."""
    scales = draw(st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=30))
    poisoned = draw(st.sets(st.integers(0, len(scales) - 1), max_size=3))
    return scales, poisoned


def _step_grads(scale, poisoned, step):
    g = torch.Generator().manual_seed(step)
    ts = [torch.randn(4, 3, generator=g, dtype=torch.float64) * scale, torch.randn(3, generator=g, dtype=torch.float64)]
    if poisoned:
        ts[1][0] = math.nan
    return ts


@SETTINGS
@given(runs(), st.floats(1.0, 100.0), st.integers(1, 8))
def test_autoclip_clips_at_the_percentile_of_finite_history(run, percentile, history):
    scales, poisoned = run
    clip, seen = AutoClip(percentile, history=history), []
    for step, scale in enumerate(scales):
        ts = _step_grads(scale, step in poisoned, step)
        ps = _params(ts)
        result = clip(ps)
        clean = math.sqrt(sum(float((t**2).sum()) for t in ts if torch.isfinite(t).all()))
        if step not in poisoned:
            seen.append(math.sqrt(sum(float((t**2).sum()) for t in ts)))
        window = seen[-history:]
        threshold = float(np.percentile(window, percentile)) if window else math.inf
        np.testing.assert_allclose(float(result.max_norm), threshold, rtol=1e-9)
        np.testing.assert_allclose(float(result.clip_coef), min(1.0, threshold / (clean + 1e-6)), rtol=1e-9)


@SETTINGS
@given(runs(), st.floats(0.5, 4.0), st.floats(0.5, 0.99), st.integers(1, 6))
def test_zscore_clip_follows_its_running_statistics(run, z, alpha, warmup):
    scales, poisoned = run
    clip = ZScoreClip(z_threshold=z, alpha=alpha, warmup=warmup)
    n, mean, var = 0, 0.0, 0.0
    for step, scale in enumerate(scales):
        ts = _step_grads(scale, step in poisoned, step)
        result = clip(_params(ts))
        clean = math.sqrt(sum(float((t**2).sum()) for t in ts if torch.isfinite(t).all()))
        limit = mean + z * math.sqrt(max(var, 0.0)) if n >= warmup else math.inf
        np.testing.assert_allclose(float(result.max_norm), limit, rtol=1e-9)
        np.testing.assert_allclose(float(result.clip_coef), min(1.0, limit / (clean + 1e-6)), rtol=1e-9)
        if step in poisoned:
            continue  # a non-finite step changes nothing
        x = min(clean, limit)
        delta = x - mean
        if n >= warmup:  # exponential moving mean and variance
            mean += (1 - alpha) * delta
            var = alpha * (var + (1 - alpha) * delta * delta)
        else:  # plain running (population) mean and variance
            mean += delta / (n + 1)
            var += (delta * (x - mean) - var) / (n + 1)
        n += 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_norm_clip_is_torch(dtype):
    g = torch.Generator().manual_seed(0)
    ts = [(torch.randn(8, 8, generator=g) * 10).to(dtype), torch.randn(8, generator=g).to(dtype)]
    ours, theirs = _params(ts), _params(ts)
    assert torch.equal(clip_grad_norm_(ours, 1.0), torch.nn.utils.clip_grad_norm_(theirs, 1.0))
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, theirs))
