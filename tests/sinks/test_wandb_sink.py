"""W&B sink: an offline run written through watch(), read back from its .wandb file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import wandb
from sink_training import NAN_AT, STEPS, train
from wandb_records import history, metric_definitions, records

from gradguard.sinks import WandB


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B offline and silent, every file it writes under tmp_path."""
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    yield tmp_path
    if wandb.run is not None:
        wandb.run.finish()


def _run_file(tmp_path: Path) -> Path:
    (path,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    return path


def _summary(path: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for rec in records(path):
        if rec.WhichOneof("record_type") == "summary":
            for item in rec.summary.update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def test_rows_keyed_by_training_step_values_and_findings_read_back(offline):
    run = wandb.init(mode="offline", dir=str(offline), project="gradguard-test")
    run.log({"mine": 1.0}, step=500)  # the run's step is far ahead of the training step
    w = train([WandB()])
    run.finish()
    path = _run_file(offline)
    assert metric_definitions(path)["gradguard/*"] == "gradguard/step"
    rows = [r for r in history(path) if "gradguard/step" in r]
    # nothing dropped: one row per recorded step, in order, although the run's step was 500
    assert [r["gradguard/step"] for r in rows] == w.trace.steps.tolist() == list(range(STEPS))
    assert all(r["_step"] >= 500 for r in rows)
    for metric in ("grad_norm", "update_ratio", "act_mean"):
        values = w.trace.metric(metric)
        for j, layer in enumerate(w.trace.layers):
            key = f"gradguard/{metric}/{layer}"
            for s, r in enumerate(rows):
                if np.isnan(values[s, j]):
                    assert key not in r  # not measured: no value, not a NaN
                else:
                    assert r[key] == pytest.approx(values[s, j], rel=1e-12)
    loss = [r["gradguard/loss"] for r in rows]
    assert math.isnan(loss[NAN_AT])
    assert [r["gradguard/loss_nonfinite"] for r in rows] == [float(s == NAN_AT) for s in range(STEPS)]
    finite = np.arange(STEPS) != NAN_AT
    np.testing.assert_allclose(np.array(loss)[finite], w.trace.loss[finite], rtol=1e-12)
    # the findings table: the latest one logged lists every finding
    tables = [r for r in rows if "gradguard/findings/path" in r]
    assert tables
    table = json.loads((path.parent / "files" / tables[-1]["gradguard/findings/path"]).read_text())
    got = {(row[0], row[2], row[4]) for row in table["data"]}
    assert got == {(f.step, f.kind, f.message) for f in w.findings}
    assert (NAN_AT, "nonfinite", "the loss is nan at step 13") in got
    summary = _summary(path)
    assert summary["gradguard/findings_error"] == sum(f.severity == "error" for f in w.findings) >= 1


def test_without_a_run_the_error_says_to_call_init(offline):
    assert wandb.run is None
    with pytest.raises(RuntimeError, match=r"call wandb.init\(\) first"):
        WandB()
    with pytest.raises(TypeError, match="wandb Run"):
        WandB(run="my-run")
