"""torch.compile'd models: gradguard causes no graph break (dynamo's own counters)."""

from __future__ import annotations

import numpy as np
import pytest
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
