"""The SQLite store: round trip, readable while open, and clear errors on files that are not stores."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
import torch
from conftest import mlp
from torch import nn

import gradguard
from gradguard.record import StoreError, load_findings


def _record(path, steps=12, **kw):
    model = mlp(3, 16, act=nn.Sigmoid, d_in=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 8), torch.randint(0, 10, (32,))
    with gradguard.watch(model, optimizer=opt, store=path, flush_every=5, activations_every=2, **kw) as w:
        for _ in range(steps):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            w.step(loss=loss)
            opt.step()
    return w


def test_round_trip_equals_the_in_memory_trace(tmp_store):
    w = _record(tmp_store, seed=123)
    t = gradguard.load(tmp_store)
    assert t.layers == w.trace.layers
    np.testing.assert_array_equal(t.steps, w.trace.steps)
    np.testing.assert_array_equal(t.values(), w.trace.values())  # NaN where not measured, too
    np.testing.assert_array_equal(t.loss, w.trace.loss)
    assert t.meta["seed"] == 123 and t.meta["layers"][0]["type"] == "Linear"
    assert [f.to_dict() for f in load_findings(tmp_store)] == [f.to_dict() for f in w.findings]


def test_wal_mode_and_readable_while_the_writer_is_open(tmp_store):
    model = mlp(1, 8, d_in=4)
    w = gradguard.watch(model, store=tmp_store, flush_every=2, activations_every=0)
    for _ in range(5):
        model(torch.randn(2, 4)).sum().backward()
        w.step()
    assert len(gradguard.load(tmp_store)) == 4  # two flushes committed, one step buffered
    with sqlite3.connect(tmp_store) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    w.close()
    assert len(gradguard.load(tmp_store)) == 5


def test_nan_loss_is_kept_apart_from_no_loss(tmp_store):
    model = mlp(1, 8, d_in=4)
    with gradguard.watch(model, store=tmp_store, activations_every=0) as w:
        for loss in (1.5, None, float("nan"), float("inf")):
            model(torch.randn(2, 4)).sum().backward()
            w.step(loss=loss)
    t = gradguard.load(tmp_store)
    assert t.loss_given.tolist() == [True, False, True, True]
    assert t.loss[0] == 1.5 and np.isnan(t.loss[1]) and np.isnan(t.loss[2]) and np.isinf(t.loss[3])


def test_trace_save_load_npz(tmp_path):
    w = _record(tmp_path / "a.db")
    out = w.trace.save(tmp_path / "trace")
    assert out.name == "trace.npz"
    t = gradguard.load(out)
    np.testing.assert_array_equal(t.values(), w.trace.values())
    assert t.meta == w.trace.meta


@pytest.mark.parametrize(
    "content, match",
    [
        (b"hello, this is not a database", "not a gradguard store"),
        (b"", "not a gradguard store"),
        (b"SQLite format 3\x00" + b"\x00" * 84, "not a readable gradguard store"),
    ],
)
def test_not_a_store(tmp_path, content, match):
    bad = tmp_path / "bad.db"
    bad.write_bytes(content)
    with pytest.raises(StoreError, match=match):
        gradguard.load(bad)


def test_other_sqlite_file_and_newer_schema(tmp_path):
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(StoreError, match="no gradguard header|not a readable"):
        gradguard.load(other)
    path = tmp_path / "new.db"
    _record(path, steps=2)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match="newer gradguard"):
        gradguard.load(path)


def test_truncated_store(tmp_path):
    path = tmp_path / "run.db"
    _record(path, steps=10)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError):
        gradguard.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        gradguard.load(tmp_path / "nope.db")


def test_corrupt_npz(tmp_path):
    bad = tmp_path / "t.npz"
    np.savez(bad, x=np.zeros(3))
    with pytest.raises(ValueError, match="not a readable gradguard trace"):
        gradguard.load(bad)
