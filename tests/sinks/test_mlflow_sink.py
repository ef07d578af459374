"""MLflow sink: written through watch() into a real SQLite tracking store, read back with MlflowClient."""

from __future__ import annotations

import json
import math
import os

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from sink_training import NAN_AT, STEPS, train

from gradguard.sinks import MLflow
from gradguard.trace import METRICS, Trace


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    """One SQLite tracking store for the module (creating its tables takes ~7 s, hence the slow marks)."""
    before, cwd = mlflow.get_tracking_uri(), os.getcwd()
    folder = tmp_path_factory.mktemp("mlflow")
    mlflow.set_tracking_uri("sqlite:///" + str(folder / "mlflow.db"))
    os.chdir(folder)  # the Default experiment keeps artifacts in ./mlruns: not in the checkout
    try:
        yield MlflowClient()
    finally:
        os.chdir(cwd)
        mlflow.set_tracking_uri(before)


def _history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


@pytest.mark.slow
def test_metrics_loss_and_findings_read_back(tracking, tmp_path):
    with mlflow.start_run() as run:
        w = train([MLflow()])
    run_id = run.info.run_id
    steps = w.trace.steps
    for metric in ("grad_norm", "grad_absmax", "weight_norm", "update_ratio", "act_saturated"):
        values = w.trace.metric(metric)
        for j, layer in enumerate(w.trace.layers):
            measured = ~np.isnan(values[:, j])
            got = _history(tracking, run_id, f"gradguard/{metric}/{layer}")
            assert sorted(got) == steps[measured].tolist()
            np.testing.assert_allclose([got[s] for s in steps[measured]], values[measured, j], rtol=1e-12)
    loss = _history(tracking, run_id, "gradguard/loss")
    assert sorted(loss) == list(range(STEPS)) and math.isnan(loss[NAN_AT])
    assert {s for s, v in _history(tracking, run_id, "gradguard/loss_nonfinite").items() if v == 1.0} == {NAN_AT}
    total = _history(tracking, run_id, "gradguard/grad_norm_total")
    np.testing.assert_allclose(
        [total[s] for s in steps], np.sqrt(np.nansum(w.trace.metric("grad_norm") ** 2, axis=1)), rtol=1e-12
    )
    # findings: the JSON artifact lists them all, the tags count them
    path = tracking.download_artifacts(run_id, "gradguard/findings.json", str(tmp_path))
    with open(path) as fh:
        saved = json.load(fh)["findings"]
    assert [(f["kind"], f["step"], f["message"]) for f in saved] == [(f.kind, f.step, f.message) for f in w.findings]
    assert any(f["kind"] == "nonfinite" and f["step"] == NAN_AT and f["fixes"] for f in saved)
    tags = tracking.get_run(run_id).data.tags
    assert tags["gradguard/findings"] == str(len(w.findings))
    assert tags["gradguard/worst_severity"] == "error"


@pytest.mark.slow
def test_names_are_cleaned_and_batches_split_at_the_limit(tracking):
    layers = ["(root)"] + [f"blocks.{i}" for i in range(39)]
    rng = np.random.default_rng(0)
    values = rng.lognormal(size=(3, len(METRICS), len(layers)))  # 3 steps x 400 values > 1000 per flush
    rows = Trace(layers)
    rows.append(np.array([5, 6, 7]), values, np.array([1.0, math.inf, 0.5]))
    run_id = tracking.create_run(tracking.get_experiment_by_name("Default").experiment_id).info.run_id
    sink = MLflow(run_id, prefix="gg")
    sink.write(rows, [])
    got = _history(tracking, run_id, "gg/update_norm/_root_")
    assert got == pytest.approx(dict(zip([5, 6, 7], values[:, METRICS.index("update_norm"), 0])), rel=1e-12)
    assert len(tracking.get_run(run_id).data.metrics) == len(METRICS) * len(layers) + 3
    assert _history(tracking, run_id, "gg/loss_nonfinite") == {5: 0.0, 6: 1.0, 7: 0.0}


def test_without_a_run_the_error_says_to_start_one():
    assert mlflow.active_run() is None
    with pytest.raises(RuntimeError, match=r"call mlflow.start_run\(\) first"):
        MLflow()
    with pytest.raises(TypeError, match="run id"):
        MLflow(123)  # type: ignore[arg-type]
