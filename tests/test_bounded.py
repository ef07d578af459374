"""Bounded resources: the in-memory history, the store's retention, references released on close."""

from __future__ import annotations

import gc
import json
import os
import sqlite3
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import mlp
from torch import nn
from torch.nn import functional as F

import gradguard
from gradguard import METRICS, Trace
from gradguard.record.store import Recorder, load_store
from gradguard.trace_history import CONTEXT, MIN_LIMIT, downsample, plan, summarize

L = 4
_G, _NF, _ACT = METRICS.index("grad_norm"), METRICS.index("grad_nonfinite"), METRICS.index("act_std")


def _rows(start: int, n: int, rng: np.random.Generator, layers: int = L) -> tuple[np.ndarray, ...]:
    """Synthetic rows: gradient norms around 1, activations measured on every 50th step."""
    steps = np.arange(start, start + n)
    values = np.full((n, len(METRICS), layers), np.nan)
    values[:, _G] = rng.uniform(0.5, 1.5, (n, layers))
    values[:, _NF] = 0.0
    values[steps % 50 == 0, _ACT] = 1.0
    return steps, values, rng.uniform(0.5, 1.0, n), np.ones(n, dtype=bool)


def _grow(limit: int, total: int, block: int = 50, events: dict[int, str] | None = None) -> tuple[Trace, list[int]]:
    """A trace filled block by block and thinned after each, as a watch does; with injected events."""
    rng = np.random.default_rng(0)
    t = Trace([f"l{j}" for j in range(L)])
    sizes = []
    for start in range(0, total, block):
        steps, values, loss, given = _rows(start, block, rng)
        for step, kind in (events or {}).items():
            if start <= step < start + block:
                i = step - start
                if kind == "spike":
                    values[i, _G, 1] = 1e6
                elif kind == "nan":
                    values[i, _NF, 2] = 3.0
                elif kind == "nan_loss":
                    loss[i] = np.nan
        t.append(steps, values, loss, given)
        downsample(t, limit)
        sizes.append(len(t))
    return t, sizes


def test_history_stays_bounded_and_keeps_recent_rows_whole():
    limit = 1000
    t, sizes = _grow(limit, 30_000)
    assert max(sizes) <= limit
    assert len(t) <= limit and len(t) >= limit // 2  # thinned to 3/4 every limit/4 rows, never to nothing
    steps = t.steps
    recent = np.arange(30_000 - limit // 4, 30_000)
    assert np.isin(recent, steps).all()
    assert steps[0] == 0 or steps[0] < 30_000 // 8  # the start of the run is still represented
    # every part of the run has rows: the largest gap is a bucket or two, not a hole
    assert np.diff(steps).max() <= 2 * 2 ** int(np.ceil(np.log2(30_000 / (limit / 8))))


def test_spike_nonfinite_and_sampled_rows_survive_downsampling():
    events = {1234: "spike", 2345: "nan", 3456: "nan_loss", 20_001: "spike"}
    t, _ = _grow(1000, 30_000, events=events)
    steps = t.steps
    # the first anomalies, with CONTEXT rows either side, at full resolution
    for s in (2345, 3456):
        assert np.isin(np.arange(s - CONTEXT, s + CONTEXT + 1), steps).all()
    # a spike in one layer's gradient norm, in the downsampled past, is still there
    g = t.metric("grad_norm")
    for s in (1234, 20_001):
        assert s in steps and g[steps == s, 1][0] == 1e6
    assert g.max() == 1e6
    # activation statistics (measured on every 50th step only) are still there in old parts
    act = ~np.isnan(t.metric("act_std")[:, 0])
    old = steps < 20_000
    assert act[old].sum() >= 50


def test_plan_composes_and_checks_its_limit():
    rng = np.random.default_rng(1)
    steps, values, loss, given = _rows(0, 5000, rng)
    summary = summarize(values, loss, given)
    once = plan(steps, summary, 1000)
    assert once.sum() <= 750
    assert plan(steps[:500], summary[:500], 1000).all()  # under the limit nothing is dropped
    with pytest.raises(ValueError, match=f"at least {MIN_LIMIT}"):
        plan(steps, summary, 10)


@pytest.mark.slow
def test_detectors_see_the_same_findings_with_a_small_history():
    # Detectors read only trace.tail(...): a thinned history must not change what they find.
    def run(history):
        torch.manual_seed(0)
        model = mlp(6, 16, act=nn.Sigmoid, d_in=8)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        g = torch.Generator().manual_seed(0)
        with gradguard.watch(model, optimizer=opt, flush_every=10, history=history, activations_every=7) as w:
            for step in range(600):
                x = torch.randn(16, 8, generator=g)
                if step == 400:
                    x[0, 0] = float("nan")
                opt.zero_grad()
                loss = F.cross_entropy(model(x), torch.randint(0, 10, (16,), generator=g))
                loss.backward()
                w.step(loss=loss)
                if step != 400:
                    opt.step()
        return w

    small, full = run(120), run(None)
    assert len(small.trace) <= 120 and len(full.trace) == 600
    assert [f.to_dict() for f in small.findings] == [f.to_dict() for f in full.findings]
    assert any(f.kind == "nonfinite" and f.step == 400 for f in small.findings)
    assert 400 in small.trace.steps  # the step a finding names is kept


@pytest.mark.parametrize("bad", [0, -1, 10, 2.5, True, "10000"])
def test_history_and_store_keep_errors(bad, tmp_path):
    model = mlp(1, 4, d_in=4)
    with pytest.raises(ValueError, match="history must be None"):
        gradguard.watch(model, history=bad)
    with pytest.raises(ValueError, match="store_keep must be"):
        gradguard.watch(model, store=tmp_path / "r.db", store_keep=bad)


def _store_bytes(path: Path) -> tuple[int, int]:
    wal = Path(f"{path}-wal")
    return path.stat().st_size, wal.stat().st_size if wal.exists() else 0


def test_store_retention_bounds_the_file_over_100k_steps(tmp_path):
    keep, layers, total, block = 5000, 10, 100_000, 100
    path = tmp_path / "long.db"
    rec = Recorder(path, [f"l{j}" for j in range(layers)], {}, keep=keep)
    rng = np.random.default_rng(0)
    bound = keep * (80 * layers + 40) * 1.5 + 2**20  # the documented bound (store module docstring)
    sizes = {}
    nan_steps = [777, 40_123, 99_990]
    for start in range(0, total, block):
        steps, values, loss, given = _rows(start, block, rng, layers)
        for s in nan_steps:
            if start <= s < start + block:
                values[s - start, _NF, 0] = 1.0
        rec.write(steps, values, loss, given)
        main, wal = _store_bytes(path)
        assert main <= bound
        assert wal <= 16 * 2**20 + 2**20  # the write-ahead log is truncated after checkpoints
        sizes[start + block] = main
    rec.close()
    assert rec.rows_deleted > 0
    # SQLite reuses freed pages: the file stops growing once retention runs
    assert sizes[total] <= sizes[total // 2] * 1.02
    t = load_store(path)
    steps = t.steps
    assert len(t) <= keep
    assert np.isin(np.arange(total - keep // 4, total), steps).all()  # recent steps whole
    assert 777 in steps and 40_123 in steps and 99_990 in steps
    assert np.isin(np.arange(777 - CONTEXT, 777 + CONTEXT + 1), steps).all()
    # what the store holds is what was written, row for row
    with sqlite3.connect(path) as db:
        (count,) = db.execute("SELECT COUNT(*) FROM steps").fetchone()
    assert count == len(t)


def test_store_keep_none_keeps_every_row(tmp_path):
    rec = Recorder(tmp_path / "all.db", ["a", "b", "c", "d"], {}, keep=None)
    rng = np.random.default_rng(0)
    for start in range(0, 3000, 100):
        rec.write(*_rows(start, 100, rng))
    rec.close()
    assert len(load_store(tmp_path / "all.db")) == 3000 and rec.rows_deleted == 0


def _hooks(model: nn.Module) -> int:
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        n += len(getattr(m, "_backward_pre_hooks", {}))
    for p in model.parameters():
        n += len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
        n += len(p._backward_hooks or {}) if getattr(p, "_backward_hooks", None) else 0
    return n


class _Sink:
    """A minimal sink that keeps what it receives (to show the sink path holds no model)."""

    def __init__(self) -> None:
        self.rows = 0

    def write(self, rows: Trace, findings) -> None:
        self.rows += len(rows)


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_watch_close_releases_the_model(compiled, tmp_path):
    import torch._dynamo

    model = mlp(2, 16, d_in=8)
    before = _hooks(model)
    run = torch.compile(model, backend="aot_eager") if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = _Sink()
    w = gradguard.watch(run, optimizer=opt, store=tmp_path / "r.db", sinks=[sink], activations_every=2,
                        flush_every=5)
    for _ in range(12):
        opt.zero_grad()
        F.cross_entropy(run(torch.randn(4, 8)), torch.randint(0, 10, (4,))).backward()
        w.step()
        opt.step()
    w.close()
    assert _hooks(model) == before == 0
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    ref, ref_opt = weakref.ref(model), weakref.ref(opt)
    del model, run, opt
    if compiled:
        torch._dynamo.reset()  # dynamo's own compile cache holds the module it compiled, not gradguard
    gc.collect()
    assert ref() is None and ref_opt() is None
    assert len(w.trace) == 12 and sink.rows == 12  # what was recorded outlives the model


def test_nonfinite_guard_and_localize_keep_no_reference():
    model = mlp(2, 16, d_in=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.NonFiniteGuard(opt, model=model, policy="restore", check_params=True)
    for step in range(5):
        opt.zero_grad()
        x = torch.randn(4, 8)
        if step == 2:
            x[0, 0] = float("nan")
        loss = F.cross_entropy(model(x), torch.randint(0, 10, (4,)))
        loss.backward()
        guard.step(loss)
    x = torch.randn(4, 8)
    x[0, 0] = float("inf")
    gradguard.localize(model, (x, torch.randint(0, 10, (4,))), F.cross_entropy)
    assert _hooks(model) == 0
    events = guard.events
    ref = weakref.ref(model)
    del model, opt, guard
    gc.collect()
    assert ref() is None
    assert any(e.kind == "step_skipped" for e in events)  # the events outlive it


def test_diagnose_keeps_no_reference_to_the_model():
    model = mlp(3, 16, act=nn.Sigmoid, d_in=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = (torch.randn(16, 8), torch.randint(0, 10, (16,)))
    d = gradguard.diagnose(model, batch, F.cross_entropy, steps=3, optimizer=opt, hessian=False)
    assert _hooks(model) == 0
    ref, ref_opt = weakref.ref(model), weakref.ref(opt)
    del model, opt
    gc.collect()
    assert ref() is None and ref_opt() is None
    assert d is not None


@pytest.mark.slow
def test_soak_keeps_host_memory_flat(tmp_path):
    """20,000 guarded, recorded steps with faults: live RSS growth from the warm point to the end under 5 MiB.

    history and store_keep are small so that both are full, and thinning, well before the 25% point
    (the warm point); live RSS is read after malloc_trim (see benchmarks/soak.py).
    """
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(script), "--steps", "20000", "--history", "2000", "--store-keep", "4000", "--json"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    result = json.loads(out.stdout)
    assert result["memory_growth_mib"] < result["memory_tolerance_mib"] == 5.0, result["rss_mib"]
    assert result["parameters_nonfinite"] == 0 and result["store_rows_lost"] == 0
    assert result["store_bytes"] <= result["store_bound_bytes"]
    assert result["trace_rows"] <= 2000 and result["store_rows"] <= 4000
    assert out.returncode == 0, out.stderr[-2000:]


def test_heatmap_of_a_thinned_history_puts_a_spike_at_its_step():
    from gradguard.report.run import _heatmap

    t, _ = _grow(1000, 30_000, events={1234: "spike", 27_000: "spike"})
    fig = _heatmap(t, t.metric("grad_norm"), per_element=False)
    image = fig.axes[0].images[0]
    data = np.ma.filled(image.get_array(), np.nan)  # [layers, columns]
    x0, x1, _, _ = image.get_extent()
    width = (x1 - x0) / data.shape[1]
    assert (x0, x1) == (0, 30_000)
    hot = np.flatnonzero(np.nanmax(data, axis=0) == 1e6)
    # columns are equal spans of steps even though old rows are sparser than recent ones
    assert [int(x0 + c * width) <= s < int(x0 + (c + 1) * width) + 1 for c, s in zip(hot, (1234, 27_000))] == [True] * 2
    assert not np.isnan(data).all(axis=0).any()  # no column of the thinned past is empty
