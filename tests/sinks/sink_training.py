"""A short real training run through gradguard.watch with sinks, shared by the sink tests."""

from __future__ import annotations

import math

import torch
from conftest import mlp
from torch import nn

import gradguard

STEPS = 24
NAN_AT = 13  # the step whose loss is given as NaN


def train(sinks, steps: int = STEPS, **kwargs) -> gradguard.Watch:
    """Train a small MLP for ``steps`` steps, NaN loss at NAN_AT; returns the closed Watch."""
    model = mlp(3, 16, act=nn.Tanh, d_in=8, d_out=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    options = {"flush_every": 10, "weights_every": 5, "activations_every": 5, **kwargs}
    with gradguard.watch(model, optimizer=opt, sinks=sinks, **options) as w:
        for step in range(steps):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            w.step(loss=math.nan if step == NAN_AT else loss)
            opt.step()
    return w
