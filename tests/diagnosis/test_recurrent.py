"""through_time / through_time_findings: gradient flow through time in nn.RNN, nn.LSTM and nn.GRU."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from gradguard.detect.thresholds import Thresholds
from gradguard.diagnosis.recurrent import TimeProfile, _unroll, through_time, through_time_findings

TH = Thresholds()


def make(kind: str, *args, **kwargs) -> nn.RNNBase:
    if kind == "tanh":
        return nn.RNN(*args, nonlinearity="tanh", **kwargs)
    if kind == "relu":
        return nn.RNN(*args, nonlinearity="relu", **kwargs)
    return {"lstm": nn.LSTM, "gru": nn.GRU}[kind](*args, **kwargs)


class LastStep(nn.Module):
    """A recurrent module with a linear head on its last output."""

    def __init__(self, rnn: nn.Module, hidden: int = 64, d_out: int = 1):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out, y)


def task(batch: int = 32, steps: int = 100, features: int = 2, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random N(0, scale^2) sequences (batch first) and N(0, 1) targets."""
    return torch.randn(batch, steps, features) * scale, torch.randn(batch, 1)


# --- the unroll is the module -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tanh", "relu", "lstm", "gru"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("given_hx", [False, True])
@pytest.mark.parametrize("batched", [True, False])
def test_unroll_reproduces_module_outputs_states_and_gradients(kind, batch_first, layers, given_hx, batched):
    steps, batch, d_in, hidden = 7, 3, 4, 5
    rnn = make(kind, d_in, hidden, num_layers=layers, batch_first=batch_first)
    if batched:
        x = torch.randn(batch, steps, d_in) if batch_first else torch.randn(steps, batch, d_in)
    else:
        x = torch.randn(steps, d_in)  # unbatched: batch_first does not apply
    state_shape = (layers, batch, hidden) if batched else (layers, hidden)
    hx = None
    if given_hx:
        h0 = torch.randn(state_shape, requires_grad=True)
        hx = (h0, torch.randn(state_shape, requires_grad=True)) if kind == "lstm" else h0
    x.requires_grad_(True)

    def loss_and_grads(out, state):
        h_n, c_n = state if kind == "lstm" else (state, None)
        g = torch.Generator().manual_seed(1)
        loss = (out * torch.randn(out.shape, generator=g)).sum() + (h_n * torch.randn(h_n.shape, generator=g)).sum()
        if c_n is not None:
            loss = loss + (c_n * torch.randn(c_n.shape, generator=g)).sum()
        wrt = [*rnn.parameters(), x]
        if given_hx:
            wrt += list(hx) if kind == "lstm" else [hx]
        return torch.autograd.grad(loss, wrt)

    out_ref, state_ref = rnn(x, hx)
    record: list[torch.Tensor] = []
    out, state = _unroll(rnn, x, hx, record)

    assert type(state) is type(state_ref)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    if kind == "lstm":
        torch.testing.assert_close(state[0], state_ref[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state[1], state_ref[1], atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(state, state_ref, atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(loss_and_grads(out, state), loss_and_grads(out_ref, state_ref)):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)
    # The top layer's states h_0..h_T were recorded; h_0 can be differentiated against.
    assert len(record) == steps + 1
    assert record[0].requires_grad


def test_model_output_and_loss_are_unchanged_and_forward_is_restored():
    rnn = nn.LSTM(3, 16, num_layers=2, batch_first=True)
    model = LastStep(rnn, hidden=16, d_out=2).eval()
    x, y = torch.randn(4, 12, 3), torch.randn(4, 2)
    seen = {}

    def loss_fn(out, target):
        seen["out"] = out.detach().clone()
        return mse(out, target)

    through_time(model, x, y, loss_fn)
    torch.testing.assert_close(seen["out"], model(x), atol=1e-6, rtol=1e-6)
    assert "forward" not in rnn.__dict__  # the class's forward is back


# --- the norms are right --------------------------------------------------------------------


def test_norms_match_the_closed_form_backward_recursion_of_a_tanh_rnn():
    """Loss v . h_T: dL/dh_T = v, and dL/dh_{t-1} = W_hh^T (dL/dh_t * tanh'(.)) with tanh' = 1 - h_t^2."""
    torch.set_default_dtype(torch.float64)
    try:
        steps, batch, hidden = 30, 4, 8
        rnn = nn.RNN(3, hidden, batch_first=True)
        x = torch.randn(batch, steps, 3)
        v = torch.randn(batch, hidden)

        class Last(nn.Module):
            def __init__(self):
                super().__init__()
                self.rnn = rnn

            def forward(self, inp):
                return self.rnn(inp)[0][:, -1]

        profile = through_time(Last(), x, v, lambda out, w: (out * w).sum())[0]
        with torch.no_grad():
            hs = rnn(x)[0]  # (B, T, H): h_1..h_T from the module's own kernel
            w_hh = rnn.weight_hh_l0
            g = v.clone()
            ref = [float(g.norm())]
            for t in range(steps, 0, -1):
                g = (g * (1 - hs[:, t - 1] ** 2)) @ w_hh
                ref.append(float(g.norm()))
        ref = np.array(ref[::-1])
    finally:
        torch.set_default_dtype(torch.float32)
    assert profile.norms.dtype == np.float64
    assert len(profile.norms) == steps + 1
    np.testing.assert_allclose(profile.norms, ref, rtol=1e-10)
    assert profile.ratio == pytest.approx(ref[0] / ref[-1], rel=1e-10)


@pytest.mark.parametrize("kind", ["relu", "lstm", "gru"])
def test_norms_match_a_hand_written_cell_loop_with_a_loss_on_every_output(kind):
    """Two layers, a loss on every output: dL/dh_t sums the direct term and the path through h_{t+1}."""
    steps, batch, d_in, hidden = 15, 3, 4, 6
    rnn = make(kind, d_in, hidden, num_layers=2)
    x = torch.randn(steps, batch, d_in)
    weights = torch.randn(steps, batch, hidden)

    class AllOutputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = rnn

        def forward(self, inp):
            return self.rnn(inp)[0]

    profile = through_time(AllOutputs(), x, weights, lambda out, w: (out * w).sum())[0]

    cell_type = {"relu": nn.RNNCell, "lstm": nn.LSTMCell, "gru": nn.GRUCell}[kind]
    cells = []
    for k in range(2):
        cell = cell_type(d_in if k == 0 else hidden, hidden, **({"nonlinearity": "relu"} if kind == "relu" else {}))
        with torch.no_grad():
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(cell, name).copy_(getattr(rnn, f"{name}_l{k}"))
        cells.append(cell)
    layer_in = list(x)
    for k, cell in enumerate(cells):
        h = torch.zeros(batch, hidden, requires_grad=k == 1)
        c = torch.zeros(batch, hidden)
        states, outs = [h], []
        for t in range(steps):
            if kind == "lstm":
                h, c = cell(layer_in[t], (h, c))
            else:
                h = cell(layer_in[t], h)
            h.retain_grad()
            states.append(h)
            outs.append(h)
        layer_in = outs
    loss = (torch.stack(layer_in) * weights).sum()
    loss.backward()
    ref = np.array([float(s.grad.double().norm()) for s in states])  # the top layer's states

    np.testing.assert_allclose(profile.norms, ref, rtol=1e-5)


# --- acceptance: the findings -----------------------------------------------------------------


def test_vanilla_tanh_rnn_on_length_100_sequences_vanishes_through_time():
    model = LastStep(nn.RNN(2, 64, nonlinearity="tanh", batch_first=True))  # default PyTorch init
    x, y = task()
    profiles = through_time(model, x, y, mse)
    assert [(p.layer, p.kind, p.steps) for p in profiles] == [("rnn", "RNN", 100)]
    p = profiles[0]
    assert p.ratio < TH.vanishing_error

    findings = through_time_findings(profiles, TH)
    assert [(f.kind, f.severity, f.layer) for f in findings] == [("vanishing_through_time", "error", "rnn")]
    f = findings[0]
    assert "rnn" in f.message and "100 steps" in f.message and f"{p.ratio:.1e}" in f.message
    w = model.rnn.weight_hh_l0.detach().double().numpy()
    assert f.evidence["spectral_radius"] == pytest.approx(max(abs(np.linalg.eigvals(w))), rel=1e-9)
    assert f.evidence["max_singular_value"] == pytest.approx(np.linalg.svd(w, compute_uv=False)[0], rel=1e-9)
    assert f.evidence["spectral_radius"] < 1  # the cause stated: a contracting W_hh, and tanh' <= 1
    assert f.evidence["steps"] == 100 and f.evidence["ratio"] == p.ratio
    assert len(f.evidence["norms_sampled"]) == 11
    assert f.evidence["norms_sampled"][0] == p.norms[0] and f.evidence["norms_sampled"][-1] == p.norms[-1]
    assert [fix.name for fix in f.fixes] == ["gated_rnn", "orthogonal_recurrent"]
    json.dumps(f.to_dict(), allow_nan=False)  # plain floats and ints only
    json.dumps([q.to_dict() for q in profiles], allow_nan=False)


def _orthogonal_rnn(gain: float, zero_bias: bool) -> LastStep:
    rnn = nn.RNN(2, 64, nonlinearity="tanh", batch_first=True)
    with torch.no_grad():
        nn.init.orthogonal_(rnn.weight_hh_l0, gain=gain)
        if zero_bias:
            rnn.bias_ih_l0.zero_()
            rnn.bias_hh_l0.zero_()
    return LastStep(rnn)


def test_orthogonal_recurrence_gain_3_explodes_and_gain_1_is_healthy():
    """Small inputs (x 0.01) and zero biases start the state near 0, where tanh is near-linear.

    With gain 1 the state stays there and the orthogonal W_hh keeps the gradient's norm: no
    finding. With gain 3 each step first triples the gradient; the state then saturates, but
    3 * tanh' stays above 1 on average (the chaotic regime), so it keeps growing.
    """
    x, y = task(scale=0.01)
    healthy = through_time(_orthogonal_rnn(1.0, zero_bias=True), x, y, mse)
    assert 0.5 < healthy[0].ratio < 2.0
    assert through_time_findings(healthy, TH) == []

    torch.manual_seed(0)
    exploding = through_time(_orthogonal_rnn(3.0, zero_bias=True), x, y, mse)
    p = exploding[0]
    findings = through_time_findings(exploding, TH)
    assert [(f.kind, f.severity, f.layer) for f in findings] == [("exploding_through_time", "error", "rnn")]
    f = findings[0]
    assert f.evidence["spectral_radius"] == pytest.approx(3.0, rel=1e-4)
    assert f.evidence["max_singular_value"] == pytest.approx(3.0, rel=1e-4)
    assert f.evidence["per_step_factor"] > 1
    # The growth is a compounding one back through time, not one odd step.
    assert p.norms[0] > p.norms[25] > p.norms[50] > p.norms[75] > p.norms[100]
    assert [fix.name for fix in f.fixes] == ["clip_norm", "orthogonal_recurrent", "gated_rnn"]


def test_orthogonal_gain_3_explodes_with_unit_inputs_too():
    """With N(0, 1) inputs and default biases the state saturates at once; the gradient still grows."""
    x, y = task()
    findings = through_time_findings(through_time(_orthogonal_rnn(3.0, zero_bias=False), x, y, mse), TH)
    assert [(f.kind, f.severity) for f in findings] == [("exploding_through_time", "error")]


def test_lstm_keeps_more_gradient_through_time_than_a_vanilla_rnn():
    x, y = task()
    rnn_ratio = through_time(LastStep(nn.RNN(2, 64, batch_first=True)), x, y, mse)[0].ratio
    default = LastStep(nn.LSTM(2, 64, batch_first=True))
    profile = through_time(default, x, y, mse)[0]
    lstm_ratio = profile.ratio
    assert lstm_ratio > rnn_ratio
    # The spectrum reported for an LSTM is that of the candidate (g) block of weight_hh.
    g_block = default.rnn.weight_hh_l0.detach()[128:192].double().numpy()
    assert profile.spectral_radius == pytest.approx(max(abs(np.linalg.eigvals(g_block))), rel=1e-9)
    assert profile.max_singular_value == pytest.approx(np.linalg.svd(g_block, compute_uv=False)[0], rel=1e-9)
    # At PyTorch's default init (forget-gate bias ~0, a forget gate near 0.5) the LSTM still
    # vanishes over 100 steps; opening the forget gate (bias 3, f ~ 0.95) is what carries it.
    lstm = nn.LSTM(2, 64, batch_first=True)
    with torch.no_grad():
        lstm.bias_ih_l0[64:128] = 3.0  # gate order i, f, g, o
        lstm.bias_hh_l0[64:128] = 0.0
    open_gate = through_time(LastStep(lstm), x, y, mse)
    assert open_gate[0].ratio > 1e3 * lstm_ratio
    assert through_time_findings(open_gate, TH) == []


# --- names, side effects, unsupported configurations -------------------------------------------


def test_nested_module_is_reported_by_its_qualified_name():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(3, 8)
            self.rnn = nn.GRU(8, 16, batch_first=True)

        def forward(self, x):
            return self.rnn(self.embed(x))[0]

    model = nn.Sequential()
    model.add_module("encoder", Encoder())
    model.add_module("pool", nn.Flatten())
    model.add_module("head", nn.Linear(5 * 16, 1))
    x, y = torch.randn(2, 5, 3), torch.randn(2, 1)
    profiles = through_time(model, x, y, mse)
    assert [(p.layer, p.kind, p.steps) for p in profiles] == [("encoder.rnn", "GRU", 5)]


def test_the_model_itself_is_reported_as_root():
    rnn = nn.LSTM(3, 4)
    profiles = through_time(rnn, torch.randn(6, 2, 3), None, lambda out: out[0].pow(2).sum())
    assert [(p.layer, p.kind, len(p.norms)) for p in profiles] == [("(root)", "LSTM", 7)]
    assert np.isfinite(profiles[0].ratio)


def test_model_without_recurrent_modules_gives_nothing():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    assert through_time(model, torch.randn(5, 4), torch.randn(5, 1), mse) == []
    assert through_time_findings([], TH) == []


def test_parameters_and_their_grad_are_left_as_they_were():
    model = LastStep(nn.LSTM(2, 16, num_layers=2, batch_first=True), hidden=16)
    params = list(model.parameters())
    for p in params[:-1]:
        p.grad = torch.randn_like(p)
    params[-1].grad = None  # a parameter without a gradient stays without one
    before = [p.detach().clone() for p in params]
    grads_before = [p.grad.clone() if p.grad is not None else None for p in params]
    x, y = task(batch=4, steps=20)
    through_time(model, x, y, mse)
    for p, value, grad in zip(params, before, grads_before):
        assert torch.equal(p.detach(), value)
        if grad is None:
            assert p.grad is None
        else:
            assert torch.equal(p.grad, grad)


def test_module_called_twice_is_profiled_on_its_longest_call():
    rnn = nn.GRU(2, 8, batch_first=True)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = rnn

        def forward(self, x):
            return self.rnn(x[:, :4])[0][:, -1] + self.rnn(x)[0][:, -1]

    profiles = through_time(Twice(), torch.randn(3, 9, 2), torch.randn(3, 8), mse)
    assert [(p.layer, p.steps) for p in profiles] == [("rnn", 9)]


@pytest.mark.filterwarnings("ignore:LSTM with projections")
def test_unsupported_configurations_are_reported_unmeasured_and_the_model_still_runs():
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(2, 4, batch_first=True)

        def forward(self, x):
            packed = pack_padded_sequence(x, torch.tensor([5, 3]), batch_first=True)
            return self.rnn(packed)[1][-1]

    class Several(nn.Module):
        def __init__(self):
            super().__init__()
            self.bi = nn.RNN(2, 4, bidirectional=True, batch_first=True)
            self.proj = nn.LSTM(8, 6, proj_size=3, batch_first=True)
            self.unused = nn.RNN(2, 4)
            self.ok = nn.RNN(3, 4, batch_first=True)

        def forward(self, x):
            return self.ok(self.proj(self.bi(x)[0])[0])[0][:, -1]

    x = torch.randn(2, 5, 2)
    profiles = {p.layer: p for p in through_time(Packed(), x, torch.randn(2, 4), mse)}
    assert profiles["rnn"].skipped == "PackedSequence input"

    profiles = {p.layer: p for p in through_time(Several(), x, torch.randn(2, 4), mse)}
    assert profiles["bi"].skipped == "bidirectional"
    assert profiles["proj"].skipped == "proj_size > 0"
    assert profiles["unused"].skipped == "not called in the forward"
    for name in ("bi", "proj", "unused"):
        assert len(profiles[name].norms) == 0 and math.isnan(profiles[name].ratio)
    assert profiles["ok"].skipped == "" and profiles["ok"].steps == 5 and np.isfinite(profiles["ok"].ratio)
    # Unmeasured profiles give no finding.
    findings = through_time_findings(list(profiles.values()), TH.with_overrides(vanishing_warning=0.0))
    assert findings == []


def test_a_loss_that_ignores_the_last_state_gives_no_ratio_and_no_finding():
    rnn = nn.RNN(2, 4)
    profiles = through_time(rnn, torch.randn(6, 3, 2), None, lambda out: out[0][0].pow(2).sum())
    p = profiles[0]
    assert len(p.norms) == 7 and p.norms[-1] == 0 and p.norms[0] > 0
    assert math.isnan(p.ratio) and p.skipped
    assert through_time_findings(profiles, TH) == []


@pytest.mark.parametrize(
    ("ratio", "expected"),
    [
        (1.0, None),
        (2e-3, None),
        (5e-4, ("vanishing_through_time", "warning")),
        (1e-7, ("vanishing_through_time", "error")),
        (50.0, None),
        (5e2, ("exploding_through_time", "warning")),
        (1e5, ("exploding_through_time", "error")),
        (math.inf, ("exploding_through_time", "error")),
        (math.nan, None),
    ],
)
def test_findings_follow_the_thresholds(ratio, expected):
    norms = np.geomspace(ratio, 1.0, 21) if np.isfinite(ratio) else np.array([ratio, 1.0])
    profile = TimeProfile("enc.rnn", "GRU", norms, ratio, spectral_radius=0.9, max_singular_value=1.2)
    findings = through_time_findings([profile], TH)
    if expected is None:
        assert findings == []
    else:
        assert [(f.kind, f.severity, f.layer) for f in findings] == [(*expected, "enc.rnn")]


def test_length_100_hidden_64_batch_32_takes_well_under_a_second():
    model = LastStep(nn.LSTM(2, 64, batch_first=True))
    x, y = task()
    through_time(model, x, y, mse)  # warm-up
    start = time.perf_counter()
    through_time(model, x, y, mse)
    assert time.perf_counter() - start < 1.0
