"""The per-tensor statistic kernels against a float64 reference, on both paths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradguard.probe.kernels import (
    LARGE,
    device_stats,
    host_diff_sumsq,
    host_stats,
    host_sumsq,
    host_sumsq_many,
    host_sumsq_one,
)


def reference(t: torch.Tensor) -> list[float]:
    x = t.detach().double().reshape(-1)
    finite = torch.isfinite(x)
    x = torch.where(finite, x, 0.0)
    amax = float(x.abs().max()) if x.numel() else 0.0
    # Scale in float64 before squaring so the reference itself cannot underflow.
    sumsq = float(((x / amax) ** 2).sum()) * amax * amax if amax > 0 else 0.0
    return [sumsq, amax, float((~finite).sum())]


PATHS = {"host": lambda ts: host_stats(ts), "device": lambda ts: device_stats(ts).numpy()}


def _cases() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    bad = torch.randn(64, 64, generator=g)
    bad[3, 4], bad[1, 1], bad[0, 0] = math.nan, math.inf, -math.inf
    big_bad = torch.randn(LARGE + 10, generator=g)
    big_bad[7] = math.nan
    return [
        torch.randn(300, 300, generator=g),  # large: measured alone
        torch.full((LARGE,), 1e-27),  # vanished: fp32 squares underflow to 0
        torch.full((1000,), 1e-27),  # the same, on the stacked small path
        torch.full((LARGE,), 1e25),  # fp32 squares overflow to inf
        torch.randn(64, 64, generator=g) * 1e20,
        torch.randn(64, 64, generator=g),
        torch.randn(64, 64, generator=g),
        bad,
        big_bad,
        torch.zeros(10, 10),
        torch.zeros(0),
    ]


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_matches_float64_reference(path, dtype):
    ts = [t.to(dtype) for t in _cases()]
    if dtype == torch.float16:  # 1e25 and 1e20 are inf in fp16: that is the reference too
        pass
    got = PATHS[path](ts)
    for t, row in zip(ts, got):
        ref = reference(t)
        np.testing.assert_allclose(row, ref, rtol=1e-5, atol=0, err_msg=f"{dtype} {tuple(t.shape)}")


def test_vanished_tensor_is_not_zero():
    t = torch.full((LARGE,), 1e-27)
    assert torch.linalg.vector_norm(t).item() == 0.0  # what a naive fp32 monitor reports
    for path in PATHS.values():
        sumsq = path([t])[0][0]
        assert math.isclose(math.sqrt(sumsq), 1e-27 * math.sqrt(LARGE), rel_tol=1e-5)


def test_huge_tensor_norm_is_finite_and_counted_apart():
    t = torch.full((1000,), 1e25)
    assert math.isinf(torch.linalg.vector_norm(t).item())
    for path in PATHS.values():
        sumsq, amax, bad = path([t])[0]
        assert math.isfinite(sumsq) and bad == 0
        assert math.isclose(math.sqrt(sumsq), 1e25 * math.sqrt(1000), rel_tol=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=300),
    st.sampled_from(sorted(PATHS)),
)
def test_property_against_reference(values, path):
    t = torch.tensor(values, dtype=torch.float32)
    row = PATHS[path]([t, t.clone()])[0]
    np.testing.assert_allclose(row, reference(t), rtol=1e-5, atol=0)


def _many_reference(t: torch.Tensor) -> tuple[float, float]:
    sumsq, _, bad = reference(t)
    return sumsq, bad


def test_one_read_sums_are_accurate_on_millions_of_elements():
    # 4M fp32 elements: one fp32 sum is off by ~1e-4 (torch's vector_norm) or ~2e-5 (one BLAS dot);
    # chunks of _DOT_CHUNK added in float64 stay within a few 1e-7.
    g = torch.Generator().manual_seed(3)
    t = torch.randn(4 * 1024 * 1024 + 77, generator=g)  # not a whole number of chunks: the tail counts too
    ref = float(t.double().square().sum())
    naive = float(torch.linalg.vector_norm(t)) ** 2
    assert abs(naive - ref) / ref > 1e-5  # the error the chunking removes
    for sumsq, bad in (host_sumsq_one(t), host_sumsq_many([t])[0]):
        assert abs(sumsq - ref) / ref < 2e-6 and bad == 0
    # bf16: each chunk widened to fp32. The squares are exact there, but values of 8 significant
    # bits round the same way again and again: their errors cancel less (~6e-6 here, vs 1e-4).
    half = t.to(torch.bfloat16)
    ref = float(half.double().square().sum())
    assert abs(host_sumsq_one(half)[0] - ref) / ref < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_one_read_path_falls_back_to_exact_values(dtype):
    # Large (chunked, alone) and small (one fused call) tensors with the values fp32 squares get wrong.
    big = 3 * (1 << 18) + 5
    cases = [c.to(dtype) for c in _cases()] + [
        torch.full((big,), 1e-27).to(dtype),
        torch.zeros(big, dtype=dtype),
        torch.randn(big).to(dtype),
    ]
    nan_big = torch.randn(big).to(dtype)
    nan_big[[1, 99, big - 1]] = torch.tensor([math.nan, math.inf, -math.inf], dtype=dtype)
    cases.append(nan_big)
    got = host_sumsq_many(cases)
    for t, (sumsq, bad) in zip(cases, got):
        ref_sumsq, ref_bad = _many_reference(t)
        assert bad == ref_bad, (dtype, tuple(t.shape))
        assert sumsq == ref_sumsq == 0 or math.isclose(sumsq, ref_sumsq, rel_tol=1e-5), (dtype, tuple(t.shape))
        assert host_sumsq_one(t) == pytest.approx((sumsq, bad), rel=1e-6)
    np.testing.assert_array_equal(host_sumsq(cases), [s for s, _ in got])


def test_one_read_of_strided_tensors():
    # A channels_last gradient is summed through a view of its memory, a transposed or sliced one
    # through a copy, and a parameter that requires grad without recording a graph.
    g = torch.Generator().manual_seed(5)
    cases = [
        torch.randn(8, 16, 5, 5, generator=g).to(memory_format=torch.channels_last),
        torch.randn(600, 700, generator=g).t(),
        torch.randn(300, 40, generator=g)[::3, 1:],
        torch.randn(50, 50, generator=g).neg()._neg_view(),
        torch.nn.Parameter(torch.randn(400, 400, generator=g)),
    ]
    for t in cases:
        ref = float(t.detach().double().square().sum())
        for sumsq, bad in (host_sumsq_one(t), host_sumsq_many([t])[0]):
            assert sumsq == pytest.approx(ref, rel=1e-6) and bad == 0
    # The exact path too, outside no_grad: a parameter (requires grad) with NaN/inf in it.
    p = torch.nn.Parameter(torch.tensor([3.0, math.nan, 4.0, -math.inf]))
    assert host_sumsq_one(p) == host_sumsq_many([p])[0] == (25.0, 2.0)


def test_diff_sumsq_subtracts_in_place_and_sums_the_difference():
    g = torch.Generator().manual_seed(6)
    big = 3 * (1 << 18) + 5  # several chunks and a tail
    nan_after = torch.randn(big, generator=g)
    nan_after[[0, big - 1]] = torch.tensor([math.nan, math.inf])
    pairs = [
        (torch.randn(big, generator=g), torch.randn(big, generator=g)),
        (torch.randn(64, 64, generator=g), torch.randn(64, 64, generator=g)),
        (torch.full((big,), 1e-27), torch.zeros(big)),  # a vanished update: fp32 squares underflow
        (torch.randn(big, generator=g), nan_after),
        # a float32 snapshot of bf16 weights
        (torch.randn(300, generator=g), torch.randn(300, generator=g).to(torch.bfloat16)),
        (
            torch.randn(8, 16, 5, 5, generator=g).to(memory_format=torch.channels_last),
            torch.randn(8, 16, 5, 5, generator=g),
        ),
    ]
    for before, after in pairs:
        diff = before.double() - after.double()
        ref_bad = float((~torch.isfinite(diff)).sum())
        ref = float(torch.where(torch.isfinite(diff), diff, 0.0).square().sum())
        sumsq, bad = host_diff_sumsq(before, after)
        assert sumsq == pytest.approx(ref, rel=1e-6) and bad == ref_bad, (before.shape, after.dtype)
        torch.testing.assert_close(before.double(), diff.to(before.dtype).double(), equal_nan=True)
