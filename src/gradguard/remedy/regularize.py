"""L1 and L2 weight penalties to add to the loss, computed with fused multi-tensor ops and no host sync.

``loss = loss_fn(model(x), y) + l2_penalty(model, 1e-4)``. An L2 penalty keeps weights
small, so the products of weight matrices that carry the gradient through a deep network
grow less easily (exploding gradients); L1 drives weights to exactly zero.

By default only weights are penalised: biases and the parameters of normalisation layers
are left out, as is usual (penalising a BatchNorm scale fights the normalisation, and
penalising a bias only moves the layer's offset). Both functions return a 0-d tensor on
the parameters' device, built from one ``torch._foreach_norm`` per device and dtype, so
the cost does not grow with the number of layers and nothing is read back to the host.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["l1_penalty", "l2_penalty"]

ModelOrParams = nn.Module | torch.Tensor | Iterable[torch.Tensor]

# Layers whose parameters are a per-feature scale and shift, not weights.
_NORMS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
    nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _is_bias(name: str) -> bool:
    # "bias", "in_proj_bias" (MultiheadAttention), "bias_ih_l0" (LSTM), "bias_k" ...
    return "bias" in name.split("_")


def _from_module(model: nn.Module, include_bias: bool) -> list[torch.Tensor]:
    seen: set[int] = set()
    out: list[torch.Tensor] = []
    for module in model.modules():
        is_norm = isinstance(module, _NORMS)
        for name, p in module._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))  # a tied weight is penalised once, in the first module that registers it
            if not p.requires_grad:
                continue  # frozen: the penalty would add a constant, not a gradient
            if not include_bias and (is_norm or _is_bias(name)):
                continue
            out.append(p)
    return out


def _from_tensors(params: torch.Tensor | Iterable[torch.Tensor], include_bias: bool) -> list[torch.Tensor]:
    if isinstance(params, torch.Tensor):
        params = [params]
    seen: set[int] = set()
    out: list[torch.Tensor] = []
    for p in params:
        if not isinstance(p, torch.Tensor):
            hint = " (pass the model itself, not named_parameters())" if isinstance(p, tuple) else ""
            raise TypeError(f"expected an nn.Module or tensors (parameters), got a {type(p).__name__}{hint}")
        if id(p) in seen:
            continue
        seen.add(id(p))
        # A bare tensor has no name: 0-d and 1-d ones are taken to be biases or normalisation scales.
        if include_bias or p.dim() >= 2:
            out.append(p)
    return out


def _check_weight(weight: float | torch.Tensor) -> None:
    if isinstance(weight, torch.Tensor):
        if weight.numel() != 1:
            raise ValueError(f"weight must be a number or a one-element tensor, got shape {tuple(weight.shape)}")
        return  # a device tensor: checking its value would synchronise
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or math.isnan(weight):
        raise ValueError(f"weight must be a non-negative number, got {weight!r}")
    if weight < 0:
        raise ValueError(f"weight must be non-negative (a negative penalty rewards large weights), got {weight!r}")


def _penalty(
    model_or_params: ModelOrParams, weight: float | torch.Tensor, ord: int, include_bias: bool
) -> torch.Tensor:
    _check_weight(weight)
    if isinstance(model_or_params, nn.Module):
        params = _from_module(model_or_params, include_bias)
    elif not isinstance(model_or_params, (torch.Tensor, Iterable)):
        raise TypeError(f"expected an nn.Module or tensors (parameters), got {type(model_or_params).__name__}")
    else:
        params = _from_tensors(model_or_params, include_bias)
    if not params:
        hint = "" if include_bias else " (biases and normalisation parameters left out; include_bias=True adds them)"
        raise ValueError(f"no parameters to penalise{hint}")
    device = params[0].device
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for p in params:
        # The fused kernels take tensors of one device and dtype.
        groups.setdefault((p.device, p.dtype), []).append(p)
    parts = []
    for (_, dtype), group in groups.items():
        # fp16/bf16 norms are accumulated in float32: a sum of squares overflows fp16 (max 65504) easily.
        norms = torch._foreach_norm(group, ord, dtype=torch.float32 if dtype in _LOW_PRECISION else None)
        stacked = torch.stack(norms)
        parts.append(stacked.sum() if ord == 1 else stacked.square().sum())
    result_dtype = parts[0].dtype
    for part in parts[1:]:
        result_dtype = torch.promote_types(result_dtype, part.dtype)
    total = torch.stack([part.to(device=device, dtype=result_dtype) for part in parts]).sum()
    if isinstance(weight, torch.Tensor):
        weight = weight.reshape(()).to(device)
    return weight * total


def l1_penalty(
    model_or_params: ModelOrParams, weight: float | torch.Tensor, *, include_bias: bool = False
) -> torch.Tensor:
    """``weight * sum(|w|)`` over the weights of a model (or given tensors), as a 0-d tensor to add to the loss.

    From a module, biases (parameters named ``bias``, ``in_proj_bias``, ``bias_ih_l0``...),
    the parameters of normalisation layers and frozen parameters are left out, unless
    ``include_bias=True``; tied parameters count once. From tensors, 0-d and 1-d tensors
    are taken to be biases. fp16/bf16 weights are summed in float32. Differentiable; no
    host synchronisation. Raises ``ValueError`` for a negative weight or nothing to penalise.
    """
    return _penalty(model_or_params, weight, 1, include_bias)


def l2_penalty(
    model_or_params: ModelOrParams, weight: float | torch.Tensor, *, include_bias: bool = False
) -> torch.Tensor:
    """``weight * sum(w ** 2)`` over the weights of a model (or given tensors), as a 0-d tensor to add to the loss.

    Selection as in :func:`l1_penalty`. Its gradient is ``2 * weight * w``: with SGD, the
    same as ``weight_decay=2 * weight``; with Adam it is not decoupled weight decay (AdamW).
    Differentiable; no host synchronisation.
    """
    return _penalty(model_or_params, weight, 2, include_bias)
