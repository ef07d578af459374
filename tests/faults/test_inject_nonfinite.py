"""NaN and inf injected at random steps in forward, backward, the loss and one gradient element,
in fp32, bf16 and fp16: the guard skips exactly the bad steps, the parameters stay finite, watch
reports each bad step and layer, and the store holds every step.

The random steps come from ``random.Random(seed)``; the seed is fresh each session (set
``GRADGUARD_FAULT_SEED`` to replay one) and printed in every assertion message.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradguard
from gradguard.record.store import load_findings

SEED = int(os.environ.get("GRADGUARD_FAULT_SEED", random.SystemRandom().randrange(2**31)))
STEPS = 40
LAYERS = ["fc1", "fc2", "fc3"]
# The layers whose gradient a fault at each site makes non-finite.
BAD_LAYERS = {
    "forward": LAYERS,  # fc2's output: the loss and so every gradient
    "backward": ["fc1", "fc2"],  # the gradient reaching fc2's output: fc2 and what lies before it
    "loss": LAYERS,
    "grad_element": ["fc2"],  # one element of fc2.weight.grad
}
# loss + inf: the loss is inf but its gradient (1) is finite, so no gradient is.
BAD_LAYERS_INF_LOSS: list[str] = []
# The module that localize() names when the bad batch is replayed.
ORIGIN = {"forward": "fault", "backward": "fault", "loss": "(loss)", "grad_element": "fc2"}


class _BadGrad(torch.autograd.Function):
    """Identity forward; backward returns a gradient filled with ``value``."""

    @staticmethod
    def forward(ctx, x, value):  # type: ignore[override]
        ctx.value = value
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return torch.full_like(grad, ctx.value), None


class Fault(nn.Module):
    """Injects ``value`` into the forward output or the backward gradient while armed."""

    def __init__(self) -> None:
        super().__init__()
        self.site: str | None = None
        self.value = float("nan")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.site == "forward":
            x = x.clone()
            x[0, 0] = self.value
        elif self.site == "backward":
            x = _BadGrad.apply(x, self.value)
        return x


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 4)
        self.fault = Fault()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ReLU keeps an inf (tanh would squash it back to a finite 1).
        return self.fc3(F.relu(self.fault(self.fc2(F.relu(self.fc1(x))))))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 8, generator=g)
    return x, x[:, :4] * 0.5


def run(site: str, value: float, dtype: str, store, bad_steps: set[int]):
    """A guarded, watched, recorded run with ``site`` faults at ``bad_steps``; returns what it left."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # fp16: a small initial loss scale, so the scaler never overflows by itself (only the faults do).
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if dtype == "fp16" else None
    guard = gradguard.NonFiniteGuard(opt, model=model, scaler=scaler)
    autocast = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    with gradguard.watch(model, store=store, flush_every=7, activations_every=5, scaler=scaler) as w:
        for step in range(STEPS):
            x, y = batch(step)
            bad = step in bad_steps
            model.fault.site = site if bad else None
            model.fault.value = value
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
                loss = F.mse_loss(model(x).float(), y)
            if bad and site == "loss":
                loss = loss * value if value != value else loss + value  # NaN, or +inf
            (scaler.scale(loss) if scaler is not None else loss).backward()
            if bad and site == "grad_element":
                model.fc2.weight.grad[3, 5] = value
            if scaler is not None:
                scaler.unscale_(opt)
            w.step(loss=loss)
            guard.step(loss)
            if scaler is not None:
                scaler.update()
    model.fault.site = None
    return model, guard, w


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("site", ["forward", "backward", "loss", "grad_element"])
def test_guard_skips_exactly_the_bad_steps_and_watch_names_them(site, value, dtype, tmp_path):
    rng = random.Random(f"{SEED}-{site}-{value}-{dtype}")
    bad_steps = set(rng.sample(range(STEPS), 4))
    ctx = f"(GRADGUARD_FAULT_SEED={SEED}, bad steps {sorted(bad_steps)})"
    store = tmp_path / "run.db"
    model, guard, w = run(site, value, dtype, store, bad_steps)
    reached = BAD_LAYERS_INF_LOSS if (site, value) == ("loss", float("inf")) else BAD_LAYERS[site]

    # The guard: exactly the bad steps skipped, and it names a layer the fault reached.
    skipped = [e for e in guard.events if e.kind == "step_skipped"]
    assert [e.step for e in skipped] == sorted(bad_steps), ctx
    for e in skipped:
        assert e.layers[:1] == reached[:1] and set(e.layers) <= set(reached), (e, ctx)
        assert e.loss_finite == (site in ("backward", "grad_element")), (e, ctx)
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), f"{name} is not finite {ctx}"

    # watch: a non-finite gradient count on exactly the bad steps, in exactly the reached layers.
    counts = w.trace.metric("grad_nonfinite")
    expected = np.zeros((STEPS, len(LAYERS)), dtype=bool)
    for s in bad_steps:
        expected[s, [LAYERS.index(n) for n in reached]] = True
    np.testing.assert_array_equal(counts > 0, expected, err_msg=ctx)
    if site == "grad_element":
        assert counts[sorted(bad_steps), LAYERS.index("fc2")].tolist() == [1.0] * 4, ctx
    first = min(bad_steps)
    grad_findings = [f for f in w.findings if f.kind == "nonfinite" and f.layer is not None]
    assert [(f.step, f.layer) for f in grad_findings] == [(first, n) for n in reached[:1]], (w.findings, ctx)
    for f in grad_findings:
        assert f.evidence["counts"].keys() == set(reached), ctx
    loss_findings = [f for f in w.findings if f.kind == "nonfinite" and f.layer is None]
    assert [f.step for f in loss_findings] == ([first] if site in ("forward", "loss") else []), ctx

    # The store: every step, the same numbers, the same findings.
    stored = gradguard.load(store)
    np.testing.assert_array_equal(stored.steps, np.arange(STEPS), err_msg=ctx)
    np.testing.assert_array_equal(stored.metric("grad_nonfinite"), counts, err_msg=ctx)
    assert [(f.kind, f.layer, f.step) for f in load_findings(store)] == [
        (f.kind, f.layer, f.step) for f in w.findings
    ], ctx

    # Replaying a bad batch names the module where the fault entered.
    model.fault.site = site if site in ("forward", "backward") else None
    x, y = batch(first)
    model.zero_grad(set_to_none=True)  # localize accumulates into .grad: a stale NaN would be blamed

    def loss_fn(out, target):
        loss = F.mse_loss(out, target)
        return loss * value if site == "loss" else loss

    if site == "grad_element":  # no module made it: localize finds the finite replay clean
        assert gradguard.localize(model, (x, y), loss_fn).module is None, ctx
    else:
        assert gradguard.localize(model, (x, y), loss_fn).module == ORIGIN[site], ctx
