"""TensorBoard sink: written through watch(), read back from the real event files."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sink_training import NAN_AT, STEPS, train
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from gradguard.sinks import TensorBoard
from gradguard.trace import METRICS, Trace


def _events(logdir) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def _scalars(acc: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_scalars_loss_findings_and_histograms_read_back(tmp_path):
    w = train([TensorBoard(tmp_path)])
    acc = _events(tmp_path)
    tags = acc.Tags()
    steps = w.trace.steps
    assert steps.tolist() == list(range(STEPS))
    for metric in ("grad_norm", "weight_norm", "update_ratio", "act_std"):
        values = w.trace.metric(metric)
        for j, layer in enumerate(w.trace.layers):
            measured = ~np.isnan(values[:, j])
            got = _scalars(acc, f"gradguard/{metric}/{layer}")
            # Every measured value is there at its training step (float32), nothing else is.
            assert sorted(got) == steps[measured].tolist()
            np.testing.assert_allclose([got[s] for s in steps[measured]], values[measured, j], rtol=1e-6)
    loss = _scalars(acc, "gradguard/loss")
    assert sorted(loss) == steps.tolist()
    assert math.isnan(loss[NAN_AT])  # the NaN loss is written, not dropped
    finite = steps != NAN_AT
    np.testing.assert_allclose([loss[s] for s in steps[finite]], w.trace.loss[finite], rtol=1e-6)
    flag = _scalars(acc, "gradguard/loss_nonfinite")
    assert [s for s, v in flag.items() if v == 1.0] == [NAN_AT] and len(flag) == STEPS
    total = _scalars(acc, "gradguard/grad_norm_total")
    np.testing.assert_allclose(
        [total[s] for s in steps], np.sqrt(np.nansum(w.trace.metric("grad_norm") ** 2, axis=1)), rtol=1e-6
    )
    # findings as text at their step: the NaN loss is one of them
    assert any(f.kind == "nonfinite" and f.step == NAN_AT for f in w.findings)
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors("gradguard/findings/text_summary")}
    for f in w.findings:
        assert f.message in texts[f.step]
    # histograms across layers on steps 0, 10, 20 (histograms_every=10)
    assert "gradguard/grad_norm_log10" in tags["histograms"]
    hist = {e.step: e.histogram_value for e in acc.Histograms("gradguard/grad_norm_log10")}
    assert sorted(hist) == [0, 10, 20]
    g = np.log10(w.trace.metric("grad_norm")[10])
    assert hist[10].num == len(w.trace.layers)
    assert hist[10].min == pytest.approx(g.min()) and hist[10].max == pytest.approx(g.max())
    ratio = {e.step for e in acc.Histograms("gradguard/update_ratio_log10")}
    assert ratio == {0, 10, 20}  # weights_every=5 measures the update ratio on those steps


def test_a_writer_passed_in_stays_open_and_metrics_can_be_chosen(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    train([TensorBoard(writer, prefix="gg", histograms_every=0, metrics=["grad_norm"])])
    writer.add_scalar("mine", 1.0, 100)  # still usable after watch closed the sink
    writer.close()
    tags = _events(tmp_path).Tags()
    assert "mine" in tags["scalars"] and "gg/loss" in tags["scalars"]
    assert {t.split("/")[1] for t in tags["scalars"] if t.count("/") == 2} == {"grad_norm"}
    assert tags["histograms"] == []


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(TypeError, match="log directory or a torch.utils.tensorboard.SummaryWriter"):
        TensorBoard(42)
    with pytest.raises(ValueError, match="histograms_every"):
        TensorBoard(tmp_path, histograms_every=-1)
    with pytest.raises(ValueError, match="unknown metric"):
        TensorBoard(tmp_path, metrics=["grad_nrom"])
    assert "grad_norm" in METRICS


def test_a_finding_without_a_step_is_filed_at_the_flush_last_step(tmp_path):
    from gradguard.detect import Finding

    rows = Trace(["(root)", "head"])
    rows.append(np.array([3, 4]), np.ones((2, len(METRICS), 2)), np.array([0.5, 0.25]))
    sink = TensorBoard(tmp_path)
    sink.write(rows, [Finding("bad_init_scale", "warning", "weights too large", layer="head")])
    sink.close()
    acc = _events(tmp_path)
    (event,) = acc.Tensors("gradguard/findings/text_summary")
    assert event.step == 4 and "weights too large" in event.tensor_proto.string_val[0].decode()
    assert _scalars(acc, "gradguard/grad_norm/(root)") == {3: 1.0, 4: 1.0}
