"""Per-tensor statistics: sum of squares, max-abs and non-finite count, without under/overflow.

Every function here returns, for each input tensor, three float64 numbers:

- ``sumsq``: the sum of squares of its finite elements, accumulated without underflow
  or overflow (elements of 1e-27 or 1e25 give the right value, not 0 or inf);
- ``amax``: the largest absolute value among its finite elements;
- ``nonfinite``: how many elements are NaN or +-inf.

Two implementations share that contract:

- :func:`host_stats` for tensors in host memory. Reading a value there is a memory load,
  not a device synchronisation, so it takes the fast fp32 path and checks the result on
  the host to decide, per tensor, whether the fp32 sum of squares is exact enough; only
  tensors with extreme or non-finite values take the slow float64 path.
  :func:`host_sumsq_one` and :func:`host_sumsq_many` give the sum of squares and the
  non-finite count alone, in one read of each tensor (an ordinary step's statistics).
- :func:`device_stats` for accelerator tensors. It never reads a value (no host-device
  synchronisation): it scales each tensor by its max-abs before squaring, with fused
  ``torch._foreach_*`` ops, and stays entirely on the device.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

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


def _precise_rows(block: torch.Tensor) -> np.ndarray:
    """Exact statistics of each row of a 2-D tensor, in float64 (the slow path): [rows, 3]."""
    x = block.detach().to(torch.float64)  # a parameter's values: no graph, whatever the grad mode
    finite = torch.isfinite(x)
    bad = (~finite).sum(dim=1).to(torch.float64)
    x = torch.where(finite, x, 0.0)
    amax = x.abs().amax(dim=1) if x.shape[1] else torch.zeros(x.shape[0], dtype=torch.float64)
    # Scale before squaring: fp64 squares of 1e-170 would underflow too.
    scale = torch.where(amax > 0, amax, 1.0)
    y = x / scale[:, None]
    sumsq = (y * y).sum(dim=1) * scale * scale
    return torch.stack([sumsq, amax, bad], dim=1).numpy()


def _precise(t: torch.Tensor) -> tuple[float, float, float]:
    """Exact statistics of one tensor in float64."""
    sumsq, amax, bad = _precise_rows(t.reshape(1, -1))[0]
    return float(sumsq), float(amax), float(bad)


def _low_precision(t: torch.Tensor) -> bool:
    return t.dtype in (torch.float16, torch.bfloat16)


def _read(t: torch.Tensor) -> float:
    # A host tensor's value, read through numpy: a memory load, not a synchronisation.
    return float((t.float() if _low_precision(t) else t).numpy())


@torch.no_grad()
def host_stats_one(t: torch.Tensor) -> tuple[float, float, float]:
    """Statistics of one host tensor (fast fp32 path, float64 only when needed)."""
    if t.numel() == 0:
        return 0.0, 0.0, 0.0
    # amax and amin separately: on CPU each is ~3x faster than one aminmax call.
    amax = max(-_read(torch.amin(t)), _read(torch.amax(t)))
    if not math.isfinite(amax):
        return _precise(t)
    if amax == 0.0:
        return 0.0, 0.0, 0.0
    return host_sumsq_one(t)[0], amax, 0.0


# Host tensors are summed in chunks of this many elements: each chunk's fp32 dot product is
# good to a few ulps and the chunks add up in float64. One fp32 sum over 16M elements is off
# by ~1e-3 (torch's vector_norm) or ~1e-4 (BLAS dot); chunked, ~4e-7, at the speed of one read.
_DOT_CHUNK = 1 << 18
# A sum of squares at least this large lost nothing that matters to underflow: squares
# below 2^-149 are dropped, and even 2^30 of them are < 2^-39 of a sum >= 2^-80.
_SUMSQ_SAFE_LO = 2.0**-80


def _flat(t: torch.Tensor) -> np.ndarray:
    """The elements of a host tensor as a flat numpy array: a view when its memory is dense, in any order."""
    if t.requires_grad:
        t = t.detach()
    if t.is_neg():
        t = t.resolve_neg()
    # order="K" follows the memory: a channels_last gradient is a view too (a sum does not need C order).
    return t.numpy().ravel(order="K")


def _chunks(t: torch.Tensor) -> Iterable[np.ndarray]:
    """A host tensor's elements as flat numpy chunks of at most ``_DOT_CHUNK``: views in a list, or
    for fp16/bf16 (numpy has no bfloat16) fp32 copies made one at a time as they are read."""
    if _low_precision(t):
        flat = t.detach().reshape(-1)
        return (flat[i : i + _DOT_CHUNK].float().numpy() for i in range(0, flat.numel(), _DOT_CHUNK))
    a = _flat(t)
    return [a] if a.size <= _DOT_CHUNK else [a[i : i + _DOT_CHUNK] for i in range(0, a.size, _DOT_CHUNK)]


def _one_read(t: torch.Tensor) -> float | None:
    """Sum of squares of a host tensor's elements, or ``None`` when it needs the exact path (NaN/inf, overflow).

    BLAS dot products in the tensor's precision (fp32 for fp16/bf16): one read, no temporary;
    chunks add up in float64. A second read, in float64, only when the squares underflowed.
    """
    chunks = _chunks(t)
    s = 0.0
    for c in chunks:
        s += float(np.dot(c, c))
    if _SUMSQ_SAFE_LO <= s < math.inf:  # the usual case (False for NaN)
        return s
    if not math.isfinite(s):
        return None
    if t.dtype != torch.float64:
        # Vanished: fp32 squares underflowed (elements of 1e-23 square to 0); float64 squares of
        # fp32/fp16/bf16 values cannot (1e-45 squares to 2e-90). A deep network's vanished
        # gradients, what is watched for, take this second read.
        s = 0.0
        for c in chunks if isinstance(chunks, list) else _chunks(t):
            c = c.astype(np.float64)
            s += float(np.dot(c, c))
        return s
    # A zero float64 sum is exact only for an all-zero tensor. any() is one pass without a copy.
    return 0.0 if s == 0.0 and not bool(t.any()) else None


def host_sumsq_one(t: torch.Tensor) -> tuple[float, float]:
    """(sum of squares of the finite elements, number of NaN/inf elements) of one host tensor.

    One read of the tensor when it is finite and not vanishingly small (the usual case); a
    second, float64 read when it has vanished; the exact float64 path otherwise (NaN/inf, overflow).
    """
    s = _one_read(t)
    if s is not None:
        return s, 0.0
    sumsq, _, bad = _precise(t)
    return sumsq, bad


def host_diff_sumsq(before: torch.Tensor, after: torch.Tensor) -> tuple[float, float]:
    """``before -= after`` in place, and :func:`host_sumsq_one` of the difference, in one pass.

    Chunk by chunk, so each difference is summed while it is still in cache (an update's norm
    from a snapshot: a separate subtraction and sum read the 2x larger data twice).
    """
    if (
        before.dtype != after.dtype  # a float32 snapshot of fp16/bf16 parameters
        or _low_precision(before)
        or before.shape != after.shape
        or not (before.is_contiguous() and after.is_contiguous())
    ):
        before.sub_(after)  # torch's subtraction handles every dtype and layout
        return host_sumsq_one(before)
    a, b = _flat(before), _flat(after)
    s = 0.0
    for i in range(0, a.size, _DOT_CHUNK):
        d = np.subtract(a[i : i + _DOT_CHUNK], b[i : i + _DOT_CHUNK], out=a[i : i + _DOT_CHUNK])
        s += float(np.dot(d, d))
    if _SUMSQ_SAFE_LO <= s < math.inf:  # the usual case
        return s, 0.0
    return host_sumsq_one(before)  # vanished, overflowed or non-finite: the difference is in place


@torch.no_grad()
def host_block(tensors: Sequence[torch.Tensor]) -> np.ndarray:
    """Statistics of host tensors of one dtype and shape, stacked: float64 [n, 3]."""
    if len(tensors) == 1:
        return np.array([host_stats_one(tensors[0])], dtype=np.float64)
    block = torch.stack(list(tensors)).reshape(len(tensors), -1)
    out = np.zeros((len(tensors), N_STATS), dtype=np.float64)
    if block.shape[1] == 0:
        return out
    lo, hi = torch.amin(block, dim=1), torch.amax(block, dim=1)
    low = block.dtype in (torch.float16, torch.bfloat16)
    if low:  # numpy has no bfloat16; float64 must not be rounded to float32 (a max-abs is exact)
        lo, hi = lo.float(), hi.float()
    amax = np.maximum(-lo.numpy(), hi.numpy()).astype(np.float64)
    norm = torch.linalg.vector_norm(block, dim=1, dtype=torch.float32 if low else None)
    finite = np.isfinite(amax)
    ok = finite & ((amax == 0) | ((amax >= _SAFE_LO) & (amax <= _safe_hi(block.shape[1]))))
    out[ok, SUMSQ] = norm.double().numpy()[ok] ** 2
    out[:, AMAX] = amax
    extreme = finite & ~ok  # vanished or huge but finite: rescale exactly, then square
    if extreme.any():
        out[extreme, SUMSQ] = _rescaled_sumsq(block[torch.from_numpy(extreme)], amax[extreme])
    if not finite.all():  # NaN/inf present: the full float64 path, which counts them
        out[~finite] = _precise_rows(block[torch.from_numpy(~finite)])
    return out


def _rescaled_sumsq(rows: torch.Tensor, amax: np.ndarray) -> np.ndarray:
    """Sums of squares of finite rows with extreme values: scaled by a power of two (exact)."""
    scale = torch.from_numpy(np.exp2(-np.floor(np.log2(amax))))
    norm = torch.linalg.vector_norm(rows.to(torch.float64) * scale[:, None], dim=1)
    return ((norm / scale) ** 2).numpy()


def plan_groups(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices grouped so each group can be measured at once: large tensors alone, small
    ones by (device, dtype, shape). Computed once per model, reused every step."""
    groups: dict[tuple[torch.device, torch.dtype, torch.Size], list[int]] = {}
    singles: list[list[int]] = []
    for i, t in enumerate(tensors):
        if t.numel() >= LARGE or t.device.type != "cpu":
            singles.append([i])
        else:
            groups.setdefault((t.device, t.dtype, t.shape), []).append(i)
    # accelerator tensors: one group per device and dtype (fused ops take mixed shapes)
    fused: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    out: list[list[int]] = []
    for group in singles:
        t = tensors[group[0]]
        if t.device.type == "cpu":
            out.append(group)
        else:
            fused.setdefault((t.device, t.dtype), []).extend(group)
    return out + list(groups.values()) + list(fused.values())


@torch.no_grad()
def host_stats(tensors: Sequence[torch.Tensor]) -> np.ndarray:
    """Statistics of host tensors as a float64 array of shape [len(tensors), 3]."""
    out = np.zeros((len(tensors), N_STATS), dtype=np.float64)
    for group in plan_groups(tensors):
        out[group] = host_block([tensors[i] for i in group])
    return out


def host_sumsq_many(tensors: Sequence[torch.Tensor]) -> list[tuple[float, float]]:
    """:func:`host_sumsq_one` of each host tensor, as plain Python floats.

    It runs right after backward, when every distinct library call costs 10-30 us (cold
    caches) and the same call again ~1 us: a dot product per tensor, in a Python loop, is
    faster than one fused call (``_foreach_norm``: ~100 us for six biases). Tensors with
    NaN/inf take the exact path together, batched by shape.
    """
    out = [(0.0, 0.0)] * len(tensors)
    redo = []
    for j, t in enumerate(tensors):
        s = _one_read(t)
        if s is None:
            redo.append(j)
        else:
            out[j] = (s, 0.0)
    if redo:  # the exact path, batched by shape; it counts the NaN/inf
        rows = host_stats([tensors[j] for j in redo])
        for j, (sumsq, _, bad) in zip(redo, rows.tolist()):
            out[j] = (sumsq, bad)
    return out


def host_sumsq(tensors: Sequence[torch.Tensor]) -> np.ndarray:
    """Sums of squares of host tensors (finite elements), float64 [n]: one read each."""
    return np.array([sumsq for sumsq, _ in host_sumsq_many(tensors)], dtype=np.float64).reshape(-1)


@torch.no_grad()
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
        rows = _device_chunk([tensors[i] for i in idx])
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
