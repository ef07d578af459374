"""Shared fixtures: small models and float64 references computed independently of gradguard."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)  # two shared cores: one thread per process is faster and steadier
    yield


def mlp(
    depth: int, width: int, act: type[nn.Module] = nn.ReLU, d_in: int | None = None, d_out: int = 10
) -> nn.Sequential:
    layers: list[nn.Module] = []
    fan_in = d_in or width
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), act()]
        fan_in = width
    layers.append(nn.Linear(fan_in, d_out))
    return nn.Sequential(*layers)


def ref_layer_grad(module: nn.Module) -> tuple[float, float, float]:
    """float64 (norm, max-abs, non-finite count) of the gradients a module owns directly."""
    own = [p for p in module._parameters.values() if p is not None and p.grad is not None]
    grads = [p.grad.detach().double().reshape(-1) for p in own]
    g = torch.cat(grads)
    finite = torch.isfinite(g)
    gf = torch.where(finite, g, 0.0)
    return float(gf.norm()), float(gf.abs().max()), float((~finite).sum())


def ref_norm(tensors) -> float:
    return float(torch.cat([t.detach().double().reshape(-1) for t in tensors]).norm())


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


# Tensor methods that read a value back to the host (a synchronisation on an accelerator).
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


@pytest.fixture
def count_reads(monkeypatch):
    """Counts calls of every method in READS, by name, while the test runs."""
    calls: dict[str, int] = dict.fromkeys(READS, 0)
    for name in READS:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *a, __name=name, __orig=original, **k):
            calls[__name] += 1
            return __orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return calls


@pytest.fixture
def tmp_store(tmp_path):
    return tmp_path / "run.db"


np.seterr(all="ignore")
