"""Per-tensor statistics: sum of squares, max-abs and non-finite count, without under/overflow.

Every function here returns, for each input tensor, three float64 numbers:

- ``sumsq``: the sum of squares of its finite elements, accumulated without underflow
  or overflow (elements of 1e-27 or 1e25 give the right value, not 0 or inf);
- ``amax``: the largest absolute value among its finite elements;
- ``nonfinite``: how many elements are NaN or +-inf.

Two implementations share that contract:

- :func:`host_stats` for tensors in host memory. Reading a value there is a memory load,
  not a device synchronisation, so it takes the fast fp32 path and checks the max-abs
  on the host to decide, per tensor, whether the fp32 sum of squares is exact enough;
  only tensors with extreme or non-finite values take the slow float64 path.
- :func:`device_stats` for accelerator tensors. It never reads a value (no host-device
  synchronisation): it scales each tensor by its max-abs before squaring, with fused
  ``torch._foreach_*`` ops, and stays entirely on the device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

SUMSQ, AMAX, NONFINITE = 0, 1, 2
N_STATS = 3

# Below this max-abs, fp32 squares lose precision (2^-50 squared is far above fp32's
# smallest normal, 2^-126, so the largest squares keep all their bits).
_SAFE_LO = 2.0**-50
# Tensors with at least this many elements are measured one by one; smaller ones are
# stacked by shape so a model of 1,000 small layers costs a few ops, not thousands.
LARGE = 1 << 15
# The device path scales and flattens at most this many elements at once (bounded memory).
_CHUNK = 1 << 24


def _safe_hi(numel: int) -> float:
    """Largest max-abs for which n squares summed in fp32 cannot overflow."""
    return 2.0 ** ((126.0 - math.log2(max(numel, 1))) / 2.0)


def _precise(t: torch.Tensor) -> tuple[float, float, float]:
    """Exact statistics in float64 (slow path: extreme or non-finite values)."""
    x = t.detach().reshape(-1).to(torch.float64)
    finite = torch.isfinite(x)
    bad = int(x.numel() - int(finite.sum()))
    x = torch.where(finite, x, 0.0)
    if x.numel() == 0:
        return 0.0, 0.0, float(bad)
    amax = float(x.abs().max())
    if amax == 0.0:
        return 0.0, 0.0, float(bad)
    # Scale before squaring: fp64 squares of 1e-170 would underflow too.
    y = x / amax
    return float((y * y).sum()) * amax * amax, amax, float(bad)


def _low_precision(t: torch.Tensor) -> bool:
    return t.dtype in (torch.float16, torch.bfloat16)


def _read(t: torch.Tensor) -> float:
    # A host tensor's value, read through numpy: a memory load, not a synchronisation.
    return float((t.float() if _low_precision(t) else t).numpy())


def host_stats_one(t: torch.Tensor) -> tuple[float, float, float]:
    """Statistics of one host tensor (fast fp32 path, float64 only when needed)."""
    t = t.detach()
    if t.numel() == 0:
        return 0.0, 0.0, 0.0
    lo, hi = torch.aminmax(t)
    amax = max(-_read(lo), _read(hi))
    if math.isfinite(amax) and (amax == 0.0 or _SAFE_LO <= amax <= _safe_hi(t.numel())):
        if _low_precision(t):
            n = torch.linalg.vector_norm(t, dtype=torch.float32)
        else:
            n = torch.linalg.vector_norm(t)
        v = _read(n)
        return v * v, amax, 0.0
    return _precise(t)


def host_stats(tensors: Sequence[torch.Tensor]) -> np.ndarray:
    """Statistics of host tensors as a float64 array of shape [len(tensors), 3]."""
    out = np.zeros((len(tensors), N_STATS), dtype=np.float64)
    groups: dict[tuple[torch.dtype, torch.Size], list[int]] = {}
    for i, t in enumerate(tensors):
        if t.numel() >= LARGE:
            out[i] = host_stats_one(t)
        else:
            groups.setdefault((t.dtype, t.shape), []).append(i)
    for (dtype, _shape), idx in groups.items():
        if len(idx) == 1:
            out[idx[0]] = host_stats_one(tensors[idx[0]])
            continue
        block = torch.stack([tensors[i].detach() for i in idx]).reshape(len(idx), -1)
        if block.shape[1] == 0:
            continue
        lo, hi = torch.aminmax(block, dim=1)
        amax = np.maximum(-lo.float().numpy(), hi.float().numpy()).astype(np.float64)
        norm = torch.linalg.vector_norm(
            block, dim=1, dtype=torch.float32 if dtype in (torch.float16, torch.bfloat16) else None
        )
        sumsq = norm.double().numpy() ** 2
        ok = np.isfinite(amax) & ((amax == 0) | ((amax >= _SAFE_LO) & (amax <= _safe_hi(block.shape[1]))))
        rows = np.asarray(idx)
        out[rows[ok], SUMSQ] = sumsq[ok]
        out[rows[ok], AMAX] = amax[ok]
        for j in np.flatnonzero(~ok):
            out[idx[j]] = _precise(tensors[idx[j]])
    return out


def device_stats(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Statistics of same-device tensors as a float64 tensor [len(tensors), 3] on that device.

    Branch-free and synchronisation-free: suitable for CUDA and any other accelerator.
    """
    if not tensors:
        raise ValueError("device_stats needs at least one tensor")
    device = tensors[0].device
    out = torch.zeros(len(tensors), N_STATS, dtype=torch.float64, device=device)
    todo = [i for i, t in enumerate(tensors) if t.numel() > 0]  # empty tensors: all zeros
    start = 0
    while start < len(todo):
        # Chunks bound the temporary copies to about _CHUNK elements.
        stop, size = start, 0
        while stop < len(todo) and (stop == start or size + tensors[todo[stop]].numel() <= _CHUNK):
            size += tensors[todo[stop]].numel()
            stop += 1
        idx = todo[start:stop]
        rows = _device_chunk([tensors[i].detach() for i in idx])
        out.index_copy_(0, torch.tensor(idx, dtype=torch.long, device=device), rows.to(device))
        start = stop
    return out


def _device_chunk(ts: list[torch.Tensor]) -> torch.Tensor:
    ts = [t.float() if _low_precision(t) else t for t in ts]
    finite = [torch.isfinite(t) for t in ts]
    nonfinite = torch.stack([f.logical_not().sum() for f in finite]).to(torch.float64)
    clean = [torch.where(f, t, torch.zeros((), dtype=t.dtype, device=t.device)) for t, f in zip(ts, finite)]
    amax = torch.stack(torch._foreach_norm(clean, float("inf"))).to(torch.float64)
    # Dividing by the max-abs puts every element in [-1, 1]: squaring can neither
    # underflow to 0 for 1e-27 gradients nor overflow to inf for 1e25 ones.
    scale = torch.where(amax > 0, amax, torch.ones_like(amax))
    scaled = torch._foreach_div(clean, [s.to(t.dtype) for s, t in zip(scale.unbind(), clean)])
    unit = torch.stack(torch._foreach_norm(scaled)).to(torch.float64)
    sumsq = (unit * scale) ** 2
    return torch.stack([sumsq, amax, nonfinite], dim=1)


def tensor_stats(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Statistics of tensors on one device, as float64 [n, 3] on that device."""
    if tensors and tensors[0].device.type == "cpu":
        return torch.from_numpy(host_stats(tensors))
    return device_stats(tensors)
