"""Input scale: per-feature means and spreads, and the first layer's gradient against standardised inputs.

The first layer's weight gradient is ``dL/dy x^T``: it scales with the inputs. Inputs of
scale 1000 give a first-layer gradient (and a curvature) about 1000 times larger than
the rest of the network sees, so no single learning rate suits every layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..detect.finding import Finding
from ..detect.fixes import BATCHNORM, NORMALISE_INPUT

# Largest per-feature RMS (sqrt(mean^2 + var)) beyond which inputs count as unnormalised.
SCALE_WARNING, SCALE_ERROR = 10.0, 100.0
TINY_WARNING = 1e-2  # all features this small: the first layer learns slowly
SPREAD_WARNING = 1e3  # largest / smallest feature RMS (constant-zero features left out)


@dataclass(frozen=True)
class InputStats:
    """Statistics of a float input batch, per feature (the feature dimension is ``feature_dim``)."""

    shape: list[int]
    feature_dim: int
    features: int
    rms: float
    feature_rms_max: float
    feature_rms_min: float
    mean_abs_max: float
    std_max: float
    first_layer: str | None = None
    first_layer_grad_ratio: float | None = None  # ||grad W_1|| with these inputs / with standardised inputs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def feature_dim(x: torch.Tensor) -> int:
    """Where the features are: columns of a table, channels of an image (NCHW), the last dim of a sequence."""
    if x.dim() == 3:
        return 2
    return 1 if x.dim() >= 2 else 0


def _per_feature(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = feature_dim(x)
    flat = x.detach().to(torch.float64).transpose(0, d).reshape(x.shape[d], -1)
    return flat.mean(dim=1), flat.std(dim=1, unbiased=False)


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance per feature (constant features become 0)."""
    d = feature_dim(x)
    mean, std = _per_feature(x)
    shape = [1] * x.dim()
    if x.dim():
        shape[d] = -1
    std = torch.where(std > 0, std, torch.ones_like(std))
    return ((x.to(torch.float64) - mean.reshape(shape)) / std.reshape(shape)).to(x.dtype)


def input_stats(x: Any) -> InputStats | None:
    """Statistics of a floating-point input tensor; None for integer inputs (token ids) and non-tensors."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
        return None
    mean, std = _per_feature(x)
    frms = torch.sqrt(mean**2 + std**2)
    nonzero = frms[frms > 0]
    return InputStats(
        shape=list(x.shape),
        feature_dim=feature_dim(x),
        features=int(mean.numel()),
        rms=float(torch.sqrt(torch.mean(x.detach().to(torch.float64) ** 2))),
        feature_rms_max=float(frms.max()),
        feature_rms_min=float(nonzero.min()) if nonzero.numel() else 0.0,
        mean_abs_max=float(mean.abs().max()),
        std_max=float(std.max()),
    )


class _Stop(Exception):
    """Ends a forward pass once the first layer's input is seen."""


def first_layer_input(model: nn.Module, first: nn.Module, inputs: Any) -> Any:
    """What the first layer receives: the inputs after any parameter-free preprocessing the model does itself.

    A model that standardises its own inputs (an ``InputStandardizer`` in front) feeds its
    first layer standardised values; those are what the input rule must judge.
    """
    seen: list[Any] = []

    def grab(module: nn.Module, args: Any) -> None:
        seen.append(args[0] if args else None)
        raise _Stop

    handle = first.register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            model(inputs)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen[0] if seen else None


def first_layer_grad_ratio(
    model: nn.Module, first: nn.Module, inputs: Any, targets: Any, loss_fn: Callable[..., torch.Tensor]
) -> float | None:
    """||dL/dW|| of the first layer as the model runs over the same with its input standardised (no .grad change).

    The standardisation happens at the first layer's input (a pre-hook), so whatever the
    model does before that layer is kept.
    """
    params = [p for p in first.parameters(recurse=False) if p.requires_grad]
    if not params:
        return None

    def standardized(module: nn.Module, args: Any) -> Any:
        x = args[0]
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return (standardize(x), *args[1:])
        return None

    norms = []
    for hook in (None, standardized):
        handle = first.register_forward_pre_hook(hook) if hook is not None else None
        try:
            loss = loss_fn(model(inputs), targets)
        finally:
            if handle is not None:
                handle.remove()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        sq = sum(float(torch.sum(g.to(torch.float64) ** 2)) for g in grads if g is not None)
        norms.append(math.sqrt(sq))
    if not all(math.isfinite(n) for n in norms) or norms[1] == 0:
        return None
    return norms[0] / norms[1]


def input_findings(stats: InputStats | None) -> list[Finding]:
    """unnormalized_input when features are far from unit scale, or their scales differ wildly."""
    if stats is None:
        return []
    big, small = stats.feature_rms_max, stats.feature_rms_min
    spread = big / small if small > 0 else math.inf
    grad = (
        f"; the first layer's gradient is {stats.first_layer_grad_ratio:.3g}x what standardised inputs give"
        if stats.first_layer_grad_ratio is not None else ""
    )
    if big > SCALE_WARNING:
        severity = "error" if big > SCALE_ERROR else "warning"
        message = (
            f"input features have RMS up to {big:.3g} (means up to {stats.mean_abs_max:.3g}, spreads up to "
            f"{stats.std_max:.3g}) instead of about 1{grad}: the first layer sees gradients and curvature scaled "
            "with the inputs, so a learning rate that suits the rest of the network makes it explode"
        )
    elif big > 0 and big < TINY_WARNING:
        severity = "warning"
        message = (
            f"input features have RMS at most {big:.3g}, far below 1{grad}: the first layer's gradient is "
            "scaled down with them and it learns slowly"
        )
    elif spread > SPREAD_WARNING and math.isfinite(spread):
        severity = "warning"
        message = (
            f"input feature scales differ by {spread:.3g}x (RMS from {small:.3g} to {big:.3g}){grad}: the "
            "large features dominate the first layer's gradient"
        )
    else:
        return []
    evidence = stats.to_dict()
    evidence["spread"] = spread if math.isfinite(spread) else None
    return [Finding(kind="unnormalized_input", severity=severity, layer=stats.first_layer, message=message,
                    evidence=evidence, fixes=(NORMALISE_INPUT, BATCHNORM))]
