"""torch.compile'd models: gradguard causes no graph break (dynamo's own counters)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ref_layer_grad
from torch import nn

import gradguard

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("strategy", ["auto", "fused"])
def test_compiled_model_no_graph_break_and_right_numbers(strategy):
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = nn.Sequential(nn.Linear(256, 200), nn.Tanh(), nn.Linear(200, 64), nn.ReLU(), nn.Linear(64, 10))
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 256), torch.randint(0, 10, (16,))
    refs = []
    # activations sampled every 2 steps: forward hooks come and go on a compiled model
    with gradguard.watch(compiled, optimizer=opt, activations_every=2, weights_every=1, strategy=strategy) as w:
        for _ in range(4):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(compiled(x), y)
            loss.backward()
            refs.append(ref_layer_grad(model[0])[0])
            w.step(loss=loss)
            opt.step()
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] >= 1  # it really was compiled
    assert w.layers == ["0", "2", "4"]  # names of the user's model, not "_orig_mod.0"
    np.testing.assert_allclose(w.trace.metric("grad_norm")[:, 0], refs, rtol=1e-5)
    assert not np.isnan(w.trace.metric("act_std")[[0, 2]]).any()


def _small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 24), nn.Tanh(), nn.Linear(24, 9))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 32, generator=g), torch.randint(0, 9, (16,), generator=g)


def test_clippers_and_guard_in_a_loop_with_a_compiled_model():
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = _small()
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.NonFiniteGuard(opt, model=model)
    auto = gradguard.AutoClip(percentile=50)
    x, y = _batch()
    totals, refs = [], []
    for step in range(4):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(compiled(x), y)
        loss.backward()
        refs.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double().norm().item())
        totals.append(gradguard.clip_grad_norm_(model.parameters(), max_norm=0.5).item())
        auto(model.parameters())
        if step == 2:
            model[2].weight.grad[0, 0] = float("nan")
        guard.step(loss)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] >= 1
    np.testing.assert_allclose(totals, refs, rtol=1e-5)
    assert [(e.step, e.layers) for e in guard.events] == [(2, ["2"])]


def _step_breaks(use: str) -> tuple[dict[str, int], list[torch.Tensor]]:
    """Graph breaks of a compiled forward-backward-clip-step function, and the gradients it leaves."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = _small()
    # fused: the optimizer takes the guard's skip flag on the device (no read of it)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, fused=True)
    guard = gradguard.NonFiniteGuard(opt, model=model)
    auto = gradguard.AutoClip(percentile=50)

    @torch.compile(backend="aot_eager")
    def train_step(x, y):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if use == "torch":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        elif use == "clip_grad_norm_":
            gradguard.clip_grad_norm_(model.parameters(), 0.5)
        elif use == "AutoClip":
            auto(model.parameters())
        if use == "NonFiniteGuard":
            guard.step(loss)
        else:
            opt.step()
        return loss

    x, y = _batch()
    for _ in range(3):
        opt.zero_grad()
        train_step(x, y)
    breaks = {reason.splitlines()[0]: n for reason, n in counters["graph_break"].items()}
    return breaks, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("use", ["clip_grad_norm_", "AutoClip", "NonFiniteGuard"])
def test_compiled_training_step_gradguard_adds_no_graph_break(use):
    # torch itself breaks such a function (at backward, around a fused optimizer step): the
    # same function with torch's own clipping, or none, is the baseline to compare with.
    # Reasons, not counts: AutoClip creates its history on the first call, so dynamo compiles
    # the function a second time, and torch's own breaks in the optimizer step count again.
    baseline, _ = _step_breaks("torch" if use != "NonFiniteGuard" else "none")
    breaks, params = _step_breaks(use)
    assert baseline and set(breaks) == set(baseline)
    _, eager_like = _step_breaks("torch") if use == "clip_grad_norm_" else (None, params)
    for got, want in zip(params, eager_like):
        torch.testing.assert_close(got, want)  # gradguard's clip trains the same model as torch's
