"""Gradient clipping that never spreads a NaN: norm, value, adaptive (AGC), AutoClip and z-score.

Conventions follow ``torch.nn.utils``: functions ending in ``_`` modify gradients in
place; ``parameters`` is a tensor or an iterable of tensors (gradients of ``None`` are
skipped). On finite gradients :func:`clip_grad_norm_` and :func:`clip_grad_value_`
give bit-for-bit PyTorch's results.

What differs is the non-finite case. PyTorch multiplies every gradient by
``max_norm / (nan + eps)``, so one NaN element makes every gradient NaN (and one inf makes
them all zero). Here the clip factor is computed from the tensors whose norm is finite;
a tensor holding NaN/inf keeps its non-finite elements (so a guard can still see them),
and no finite gradient is changed by the bad value. Stateful clippers never let a
non-finite norm into their statistics. Everything stays on the device: no host
synchronisation, no ``.item()``.

Under FSDP2 (``fully_shard``), where gradients are DTensor shards, the norms are global:
each rank measures its local shards and one collective combines them, so every rank gets
the same total norm (a plain tensor, not a DTensor) and scales its shards by the same
factor. Under DDP every rank holds whole, already averaged gradients: nothing to combine.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype, _has_foreach_support

from ..probe.distributed import SUM, ShardPlan, distributed, local, shard_groups

__all__ = [
    "AutoClip",
    "ClipResult",
    "ZScoreClip",
    "adaptive_clip_grad_",
    "clip_grad_norm_",
    "clip_grad_value_",
]

Parameters = torch.Tensor | Iterable[torch.Tensor]
_EPS = 1e-6  # PyTorch's, in max_norm / (total_norm + 1e-6)


class ClipResult(NamedTuple):
    """What a clipper did, as 0-d tensors on the gradients' device (no synchronisation).

    ``total_norm`` is the norm of all gradients (non-finite if any element is);
    ``clip_coef`` the factor finite gradients were multiplied by (1 = untouched);
    ``max_norm`` the threshold used.
    """

    total_norm: torch.Tensor
    clip_coef: torch.Tensor
    max_norm: torch.Tensor


def _params(parameters: Parameters) -> list[torch.Tensor]:
    """The parameters as a list, checked: tensors with dense, real gradients (or none)."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    if isinstance(parameters, torch.nn.Module):
        raise TypeError(f"expected parameters, got the module {type(parameters).__name__}: pass model.parameters()")
    if not isinstance(parameters, Iterable):
        raise TypeError(
            f"expected a tensor or an iterable of tensors (model.parameters()), got {type(parameters).__name__}"
        )
    out = list(parameters)
    for p in out:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"expected tensors (parameters), got {type(p).__name__}")
        if p.grad is not None and p.grad.layout != torch.strided:
            # As torch.nn.utils: the fused norms and scaling take dense tensors only.
            raise TypeError(
                f"a parameter of shape {tuple(p.shape)} has a {p.grad.layout} gradient (nn.Embedding(sparse=True)?): "
                "clipping takes dense gradients; build the layer with sparse=False, or leave it out"
            )
    return out


def _grads(parameters: Parameters) -> list[torch.Tensor]:
    return [p.grad for p in _params(parameters) if p.grad is not None]


def _by_device_and_dtype(tensors: list[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[torch.Tensor]]:
    # The fused kernels take tensors of one device and dtype, as in torch.nn.utils.clip_grad.
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return groups


def _check_positive(name: str, value: float | torch.Tensor, allow_zero: bool = False) -> None:
    if isinstance(value, torch.Tensor):
        return  # a device tensor: checking it would synchronise
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        need = "a non-negative number" if allow_zero else "a positive number"
        raise ValueError(f"{name} must be {need}, got {value!r}")


def _on_shards(grads: list[torch.Tensor]) -> tuple[list[torch.Tensor], ShardPlan | None]:
    """(the local tensors to compute on, the shard plan) for DTensor shards; (grads, None) otherwise."""
    if not distributed():  # the single-process path: nothing to look at
        return grads, None
    plan = ShardPlan(grads)
    if not plan:
        return [local(g) for g in grads], None  # replicated DTensors: each rank holds all of it
    return [local(g) for g in grads], plan


def _combine_norms(stacked: torch.Tensor, plan: ShardPlan, norm_type: float) -> torch.Tensor:
    """Global per-tensor norms from the norms of the local shards (the same on every rank)."""
    if math.isinf(norm_type):
        rows = stacked.abs()[:, None].clone()
        plan.reduce_rows(rows, ("max",))
        return rows[:, 0]
    powered = stacked.to(torch.float64)
    powered = powered if norm_type == 0 else powered**norm_type  # order 0 counts non-zeros: they add up
    rows = powered[:, None].clone()
    plan.reduce_rows(rows, (SUM,))
    out = rows[:, 0] if norm_type == 0 else rows[:, 0] ** (1.0 / norm_type)
    return out.to(stacked.dtype)


def _norms(grads: list[torch.Tensor], norm_type: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-tensor norms stacked on the first device, the total norm) exactly as PyTorch computes them.

    DTensor shards give the norms of the whole tensors (one collective).
    """
    grads, plan = _on_shards(grads)
    first = grads[0].device
    norms: list[torch.Tensor] = []
    order: list[int] = []
    # torch's own grouping, in its order (not first appearance): the total then sums the
    # per-tensor norms in the order torch.nn.utils.clip_grad_norm_ does, bit for bit.
    grouped = _group_tensors_by_device_and_dtype([list(grads)], with_indices=True)  # type: ignore[list-item]
    for (device, _), ([found], indices) in grouped.items():
        group: list[torch.Tensor] = [g for g in found if g is not None]  # grads holds no None
        # The same choice as torch.nn.utils.clip_grad_norm_ (foreach=None), for identical numbers.
        if _has_foreach_support(group, device):
            norms.extend(torch._foreach_norm(group, norm_type))
        else:
            norms.extend(torch.linalg.vector_norm(g, norm_type) for g in group)
        order.extend(indices)
    stacked = torch.stack([n.to(first) for n in norms])
    if plan is not None:  # the shard plan follows the order of grads
        in_order = torch.empty_like(stacked)
        in_order[torch.tensor(order, device=first)] = stacked
        stacked = _combine_norms(in_order, plan, norm_type)
    return stacked, torch.linalg.vector_norm(stacked, norm_type)


def _clean_total(stacked: torch.Tensor, norm_type: float) -> torch.Tensor:
    # Tensors whose norm is NaN/inf are left out: identical to the total when all are finite.
    return torch.linalg.vector_norm(torch.where(torch.isfinite(stacked), stacked, 0.0), norm_type)


def _scale_(grads: list[torch.Tensor], coef: torch.Tensor) -> None:
    if distributed():
        grads = [local(g) for g in grads]  # scaling each shard in place scales the DTensor
    for (device, _), group in _by_device_and_dtype(grads).items():
        torch._foreach_mul_(group, coef.to(device))


@torch.no_grad()
def _clip_by_norm(
    grads: list[torch.Tensor],
    max_norm: float | torch.Tensor,
    norm_type: float,
    norms: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[ClipResult, torch.Tensor]:
    """Clip by the total norm; ``norms`` is ``_norms(grads, norm_type)`` when the caller has it already."""
    stacked, total = _norms(grads, norm_type) if norms is None else norms
    clean = _clean_total(stacked, norm_type)
    coef = torch.clamp(max_norm / (clean + _EPS), max=1.0)
    _scale_(grads, coef)
    limit = max_norm if isinstance(max_norm, torch.Tensor) else torch.tensor(float(max_norm), device=total.device)
    return ClipResult(total, coef, limit), clean


def clip_grad_norm_(
    parameters: Parameters,
    max_norm: float | torch.Tensor,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> torch.Tensor:
    """Scale gradients so their total norm is at most ``max_norm``; returns the total norm.

    Same arguments, results and return value as ``torch.nn.utils.clip_grad_norm_`` on
    finite gradients. With NaN/inf present the factor comes from the finite tensors, so the
    bad value does not spread; the returned total norm is still non-finite, as PyTorch's.
    On FSDP2 DTensor gradients it is the global norm, as a plain 0-d tensor equal on every
    rank (where PyTorch returns a DTensor that needs ``.full_tensor()``).
    ``error_if_nonfinite=True`` raises instead (this reads the norm: one synchronisation).
    ``foreach`` is accepted for compatibility: fused kernels are used wherever they exist.
    """
    _check_positive("max_norm", max_norm, allow_zero=True)
    norm_type = float(norm_type)
    grads = _grads(parameters)
    if not grads:
        return torch.tensor(0.0)
    result, _ = _clip_by_norm(grads, max_norm, norm_type)
    if error_if_nonfinite and not torch.isfinite(result.total_norm):
        raise RuntimeError(
            f"the total norm of order {norm_type} of the gradients is non-finite; set "
            "error_if_nonfinite=False to clip the finite gradients and let a guard skip the step"
        )
    return result.total_norm


@torch.no_grad()
def clip_grad_value_(parameters: Parameters, clip_value: float, foreach: bool | None = None) -> None:
    """Clamp every gradient element to [-clip_value, clip_value], in place (as PyTorch's).

    NaN stays NaN and never spreads; +-inf becomes +-clip_value, exactly as in
    ``torch.nn.utils`` (watch or guard before clipping to see an overflow).
    """
    _check_positive("clip_value", clip_value, allow_zero=True)
    grads = _grads(parameters)
    if any(g.is_complex() for g in grads):
        raise TypeError("clip_grad_value_ clamps real gradients, and a gradient is complex: use clip_grad_norm_")
    for (_, dtype), group in _by_device_and_dtype(grads).items():
        # A bound beyond the dtype's range (1e5 in fp16) clips nothing finite; torch would raise on it.
        limit = min(float(clip_value), torch.finfo(dtype).max)
        torch._foreach_clamp_min_(group, -limit)
        torch._foreach_clamp_max_(group, limit)


def _unit_norms(t: torch.Tensor) -> torch.Tensor:
    """Norm of each output unit (row of dim 0), keeping dims for broadcasting; whole tensor if <= 1-D."""
    if t.dim() <= 1:
        return torch.linalg.vector_norm(t).reshape([1] * t.dim())  # 0-d stays 0-d: a scalar gain is one unit
    return torch.linalg.vector_norm(t, dim=tuple(range(1, t.dim())), keepdim=True)


@torch.no_grad()
def adaptive_clip_grad_(
    parameters: Parameters,
    clipping: float = 0.01,
    eps: float = 1e-3,
    exclude: Iterable[torch.Tensor] = (),
) -> torch.Tensor:
    """Unit-wise adaptive gradient clipping (AGC, Brock et al. 2021), in place.

    Each output unit's gradient G_i is rescaled to at most ``clipping * max(||W_i||, eps)``.
    Leave out the final classifier, as the paper does, with
    ``exclude=model.fc.parameters()``. A unit whose gradient is non-finite is left as it
    is (its finite elements are not turned into NaN). Returns the fraction of units
    clipped (a 0-d tensor; no synchronisation).

    On FSDP2 DTensor shards (``Shard(0)``: each unit's row lives on one rank) units are
    clipped where they are; a sharded 1-D parameter is one unit, measured across ranks.
    The fraction returned counts the units of all ranks.
    """
    _check_positive("clipping", clipping)
    _check_positive("eps", eps)
    skip = {id(p) for p in exclude}
    params = [p for p in _params(parameters) if p.grad is not None and id(p) not in skip]
    if not params:
        return torch.tensor(0.0)
    if distributed():
        plan = ShardPlan([p.grad for p in params])  # type: ignore[misc]
        if plan:
            return _adaptive_on_shards(params, plan, clipping, eps)
    factors = []
    clipped = []
    for p in params:
        g = p.grad
        assert g is not None
        w_norm = _unit_norms(p.detach()).clamp_min(eps)
        g_norm = _unit_norms(g)
        limit = w_norm * clipping
        # where(): a NaN unit norm gives factor 1 (untouched), never NaN spread over the row.
        factor = torch.where(torch.isfinite(g_norm) & (g_norm > limit), limit / g_norm.clamp_min(1e-6), 1.0)
        factors.append(factor.to(g.dtype))
        clipped.append((factor < 1).reshape(-1))
    torch._foreach_mul_([p.grad for p in params], factors)  # type: ignore[misc, arg-type]
    flags = torch.cat([c.to(params[0].device) for c in clipped])
    return flags.to(torch.float32).mean()


def _adaptive_on_shards(params: list[torch.Tensor], plan: ShardPlan, clipping: float, eps: float) -> torch.Tensor:
    """AGC on DTensor shards: rows are local, whole-tensor units (1-D) take one collective."""
    import torch.distributed as dist
    from torch.distributed.tensor import Shard

    device = local(params[0]).device
    groups = [shard_groups(p.grad) for p in params]  # type: ignore[arg-type]
    whole = []  # sharded parameters that are one unit: their norms come from all ranks
    for i, (p, gs) in enumerate(zip(params, groups)):
        if gs and p.dim() <= 1:
            whole.append(i)
        elif gs and any(isinstance(pl, Shard) and pl.dim != 0 for pl in p.grad.placements):  # type: ignore[union-attr]
            raise ValueError(
                f"adaptive_clip_grad_ needs each unit (row) of a parameter on one rank, but a parameter of "
                f"shape {tuple(p.shape)} is sharded as {p.grad.placements}: shard it along dim 0 "  # type: ignore[union-attr]
                "(FSDP2's default) or leave it out with exclude=..."
            )
    sq = torch.zeros(len(params), 2, dtype=torch.float64, device=device)
    for i in whole:
        w, g = local(params[i].detach()), local(params[i].grad)  # type: ignore[arg-type]
        sq[i] = torch.stack([torch.linalg.vector_norm(w), torch.linalg.vector_norm(g)]).to(sq) ** 2
    plan.reduce_rows(sq, (SUM, SUM))
    norms = sq.sqrt()
    factors, counts = [], torch.zeros(len(params), 2, dtype=torch.float64, device=device)
    for i, p in enumerate(params):
        g = local(p.grad)  # type: ignore[arg-type]
        if i in whole:
            w_norm, g_norm = norms[i, 0].clamp_min(eps).reshape(1), norms[i, 1].reshape(1)
        else:
            w_norm, g_norm = _unit_norms(local(p.detach())).clamp_min(eps), _unit_norms(g)
        limit = w_norm * clipping
        factor = torch.where(torch.isfinite(g_norm) & (g_norm > limit), limit / g_norm.clamp_min(1e-6), 1.0)
        factors.append(factor.to(g.dtype).to(g.device))
        share = 1.0
        if i in whole:  # every rank of the shard groups holds this unit: count 1/k of it on each
            for grp in groups[i]:
                share /= dist.get_world_size(grp)
        counts[i] = torch.stack([(factor < 1).sum().to(counts), counts.new_tensor(float(factor.numel()))]) * share
    torch._foreach_mul_([local(p.grad) for p in params], factors)  # type: ignore[arg-type]
    plan.reduce_rows(counts, (SUM, SUM))
    total = counts.sum(dim=0)
    return (total[0] / total[1].clamp_min(1)).to(torch.float32)


class _Stateful:
    """Shared by the stateful clippers: clip by a threshold kept on the device."""

    norm_type: float

    def _apply(self, parameters: Parameters, threshold_of: Any) -> ClipResult:
        grads = _grads(parameters)
        if not grads:
            zero = torch.tensor(0.0)
            return ClipResult(zero, torch.tensor(1.0), zero)
        with torch.no_grad():
            stacked, total = _norms(grads, self.norm_type)
            finite = torch.isfinite(total)
            clean = _clean_total(stacked, self.norm_type)
            max_norm = threshold_of(total, finite)
            coef = torch.clamp(max_norm / (clean + _EPS), max=1.0)
            _scale_(grads, coef)
        return ClipResult(total, coef, max_norm)


class AutoClip(_Stateful):
    """Clip at a percentile of the history of gradient norms (Seetharaman et al. 2020).

    Each call adds the total norm to the history (a device ring buffer of ``history``
    entries), then clips at its ``percentile``-th percentile. Non-finite norms are never
    added. Use as ``AutoClip(10)(model.parameters())``; returns a :class:`ClipResult`.
    """

    def __init__(self, percentile: float = 10.0, history: int = 1000, norm_type: float = 2.0) -> None:
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise ValueError(f"history must be a positive integer, got {history!r}")
        self.percentile = float(percentile)
        self.history = history
        self.norm_type = float(norm_type)
        self._norms: torch.Tensor | None = None  # NaN = empty slot
        self._seen = torch.zeros((), dtype=torch.long)  # finite norms recorded so far

    def __call__(self, parameters: Parameters) -> ClipResult:
        return self._apply(parameters, self._threshold)

    def _threshold(self, total: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
        if self._norms is None or self._norms.device != total.device:
            self._norms = torch.full((self.history,), math.nan, dtype=torch.float64, device=total.device)
            self._seen = torch.zeros((), dtype=torch.long, device=total.device)
        # The write position counts finite steps only, on the device: a non-finite step
        # rewrites the slot's old value, so it is as if it never happened (and nothing syncs).
        slot = (self._seen % self.history).reshape(1)
        old = self._norms.index_select(0, slot)
        self._norms.index_copy_(0, slot, torch.where(finite, total.to(torch.float64), old))
        self._seen += finite.to(torch.long)
        q = torch.nanquantile(self._norms, self.percentile / 100.0)  # NaN = empty slot, ignored
        # Before any finite norm there is no threshold: do not clip.
        return torch.where(torch.isnan(q), math.inf, q).to(total.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"percentile": self.percentile, "history": self.history, "norm_type": self.norm_type,
                "norms": None if self._norms is None else self._norms.clone(), "seen": self._seen.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.percentile, self.history = float(state["percentile"]), int(state["history"])
        self.norm_type = float(state["norm_type"])
        self._norms = None if state["norms"] is None else state["norms"].clone()
        self._seen = state["seen"].clone()


class ZScoreClip(_Stateful):
    """Clip when the total norm is a z-score outlier against its running mean and variance.

    After ``warmup`` finite steps (plain running mean/variance), the mean and variance are
    exponential moving averages with factor ``alpha``; a norm with z-score above
    ``z_threshold`` is clipped to ``mean + z_threshold * std`` (ZClip-style). Non-finite
    norms never update the statistics. Returns a :class:`ClipResult`.
    """

    def __init__(self, z_threshold: float = 2.5, alpha: float = 0.97, warmup: int = 25, norm_type: float = 2.0) -> None:
        _check_positive("z_threshold", z_threshold)
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be a positive integer, got {warmup!r}")
        self.z_threshold, self.alpha, self.warmup = float(z_threshold), float(alpha), warmup
        self.norm_type = float(norm_type)
        self._state: torch.Tensor | None = None  # [count of finite steps, mean, var], float64

    def __call__(self, parameters: Parameters) -> ClipResult:
        return self._apply(parameters, self._threshold)

    def _threshold(self, total: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
        if self._state is None or self._state.device != total.device:
            self._state = torch.zeros(3, dtype=torch.float64, device=total.device)
        n, mean, var = self._state.unbind()
        x = torch.where(finite, total.to(torch.float64), mean)
        warm = n >= self.warmup
        limit = torch.where(warm, mean + self.z_threshold * var.clamp_min(0).sqrt(), math.inf)
        clipped = torch.minimum(x, limit)
        # Update with the clipped value, so one spike does not inflate the statistics.
        n1 = n + 1
        delta = clipped - mean
        w_mean = torch.where(warm, mean + (1 - self.alpha) * delta, mean + delta / n1)
        w_var = torch.where(
            warm,
            self.alpha * (var + (1 - self.alpha) * delta * delta),
            var + (delta * (clipped - w_mean) - var) / n1,
        )
        new = torch.stack([n1, w_mean, w_var])
        self._state = torch.where(finite, new, self._state)  # a non-finite step changes nothing
        return limit.to(total.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"z_threshold": self.z_threshold, "alpha": self.alpha, "warmup": self.warmup,
                "norm_type": self.norm_type, "state": None if self._state is None else self._state.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.z_threshold, self.alpha = float(state["z_threshold"]), float(state["alpha"])
        self.warmup, self.norm_type = int(state["warmup"]), float(state["norm_type"])
        self._state = None if state["state"] is None else state["state"].clone()
