"""The signal and gradient profile across depth: one forward and backward pass seen through hooks.

For every layer (a module owning parameters), in the order the forward pass runs them:
the mean square of its output (the forward signal), the mean square of the gradient of
the loss with respect to that output (the back-propagated gradient, dL/dy), the
activation module that runs right after it, and whether its input is exactly the
previous layer's activation, so that consecutive layers form a plain chain (no residual
addition, normalisation or other computation in between). Chains are what the
initialisation audit and the mean-field prediction apply to.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..probe.activations import _ACTIVATIONS
from ..probe.layers import LayerIndex
from .jsonsafe import plain

# Normalisation layers own parameters but only rescale: they end a chain and are not audited.
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d,
         nn.InstanceNorm2d, nn.InstanceNorm3d, nn.RMSNorm)


def first_tensor(value: Any) -> torch.Tensor | None:
    """The first floating-point tensor in a module's input or output (tensors, tuples, lists, dicts)."""
    if isinstance(value, torch.Tensor):
        return value if value.is_floating_point() else None
    if isinstance(value, (tuple, list)):
        for v in value:
            t = first_tensor(v)
            if t is not None:
                return t
    if isinstance(value, dict):
        for v in value.values():
            t = first_tensor(v)
            if t is not None:
                return t
    return None


@dataclass
class Profile:
    """Per-layer forward and backward statistics at one point in training (NaN = not measured).

    ``order`` lists layer indices (into ``names``) in the order the forward pass first ran
    them; layers that did not run are left out. ``out_ms`` / ``grad_ms``: mean square of
    the layer's output and of dL/d(output), averaged over calls when a layer runs more
    than once. ``activation[i]``: the class name of the activation module that ran right
    after layer i (None: none did). ``chained[i]``: layer i's input is exactly the output
    of the previous layer in ``order`` (or of the activation after it).
    """

    names: list[str]
    types: list[str]
    order: list[int]
    out_ms: np.ndarray
    grad_ms: np.ndarray
    input_ms: float
    activation: list[str | None]
    chained: list[bool]
    loss: float
    activation_modules: list[nn.Module | None] = field(default_factory=list, repr=False)

    def rms(self, which: str = "grad") -> np.ndarray:
        """Per-element RMS of the back-propagated gradient (``"grad"``) or of the output (``"out"``)."""
        return np.sqrt(self.grad_ms if which == "grad" else self.out_ms)

    def chains(self) -> list[list[int]]:
        """Maximal runs of consecutive layers (in execution order) that form a plain chain."""
        runs: list[list[int]] = []
        for i in self.order:
            if runs and self.chained[i]:
                runs[-1].append(i)
            else:
                runs.append([i])
        return runs

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: one entry per layer that ran, in execution order."""
        return {
            "input_rms": plain(math.sqrt(self.input_ms)),
            "loss": plain(self.loss),
            "layers": [
                {
                    "layer": self.names[i],
                    "type": self.types[i],
                    "activation": self.activation[i],
                    "output_rms": plain(math.sqrt(self.out_ms[i])),
                    "grad_rms": plain(math.sqrt(self.grad_ms[i])),
                    "chained": self.chained[i],
                }
                for i in self.order
            ],
        }


def measure_profile(
    model: nn.Module,
    index: LayerIndex,
    run: Callable[[], torch.Tensor],
    inputs: Any,
) -> tuple[Profile, torch.Tensor]:
    """Run ``run()`` (forward, returns the loss) and its backward under hooks; returns the profile and the loss.

    The backward is the caller's: ``loss.backward()`` is called here so the hooks see it,
    and gradients accumulate in ``.grad`` as usual.
    """
    L = len(index)
    layer_of = {id(m): i for i, m in enumerate(index.modules)}
    out_sum = np.zeros(L)
    grad_sum = np.zeros(L)
    calls = np.zeros(L)
    grad_calls = np.zeros(L)
    order: list[int] = []
    activation: list[str | None] = [None] * L
    act_modules: list[nn.Module | None] = [None] * L
    chained = [False] * L
    # The tensor the next layer must receive to continue the chain: the last layer's output, or the output of the
    # activation that ran after it. Kept as a reference (not an id) for the duration of the forward pass only.
    state: dict[str, Any] = {"last": None, "expect": None}

    def grad_hook(i: int) -> Callable[[torch.Tensor], None]:
        def hook(g: torch.Tensor) -> None:
            grad_sum[i] += float(torch.linalg.vector_norm(g.detach(), dtype=torch.float64) ** 2) / max(g.numel(), 1)
            grad_calls[i] += 1

        return hook

    def forward_hook(module: nn.Module, args: Any, output: Any) -> None:
        i = layer_of.get(id(module))
        out = first_tensor(output)
        if i is None:
            # An activation module right after a layer (and before the next one) is that layer's activation.
            last = state["last"]
            ran_after = last is not None and activation[last] is None and first_tensor(args) is state["expect"]
            if isinstance(module, _ACTIVATIONS) and ran_after:
                activation[last] = type(module).__name__
                act_modules[last] = module
                state["expect"] = out
            return
        if calls[i] == 0:
            order.append(i)
            chained[i] = state["expect"] is not None and first_tensor(args) is state["expect"]
        if out is None:
            return
        calls[i] += 1
        out_sum[i] += float(torch.linalg.vector_norm(out.detach(), dtype=torch.float64) ** 2) / max(out.numel(), 1)
        if out.requires_grad:
            out.register_hook(grad_hook(i))
        state["last"], state["expect"] = i, out

    handles = [m.register_forward_hook(forward_hook) for m in model.modules()]
    try:
        loss = run()
        state.clear()  # drop the references to activations
        if loss.requires_grad:
            loss.backward()
    finally:
        for h in handles:
            h.remove()
    x = first_tensor(inputs)
    input_ms = float(torch.linalg.vector_norm(x.detach(), dtype=torch.float64) ** 2) / max(x.numel(), 1) if (
        x is not None and x.numel()
    ) else math.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        out_ms = np.where(calls > 0, out_sum / np.maximum(calls, 1), np.nan)
        grad_ms = np.where(grad_calls > 0, grad_sum / np.maximum(grad_calls, 1), np.nan)
    loss_value = float(loss.detach().float().sum()) if loss.numel() else math.nan
    return (
        Profile(list(index.names), list(index.types), order, out_ms, grad_ms, input_ms, activation, chained,
                loss_value, act_modules),
        loss,
    )
