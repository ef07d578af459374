"""Per-layer gradient and weight statistics, measured on the device without synchronisation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.hooks import RemovableHandle

from .distributed import MAX, SUM, ShardPlan, distributed, local
from .kernels import (
    AMAX,
    LARGE,
    N_STATS,
    NONFINITE,
    SUMSQ,
    device_stats,
    host_block,
    host_diff_sumsq,
    host_stats,
    host_stats_one,
    host_sumsq_many,
    host_sumsq_one,
    plan_groups,
)
from .layers import LayerIndex

STRATEGIES = ("auto", "fused", "hooks")
# How each statistic combines over the shards of a tensor: sumsq and nonfinite add up,
# amax is the largest; the fourth column says whether any rank had the tensor.
_SHARD_OPS = (SUM, MAX, SUM, MAX)
_NAN = float("nan")


class LayerReducer:
    """Sums per-parameter statistics into per-layer ones on the statistics device."""

    def __init__(self, index: LayerIndex, device: torch.device) -> None:
        self.n_layers = len(index)
        self.device = device
        self.layer_of = torch.tensor(index.param_layer, dtype=torch.long, device=device)
        self._layer_of_np = np.asarray(index.param_layer, dtype=np.int64)

    def __call__(self, rows: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """rows [P, 3] float64 and present [P] bool -> [3, L]: norm, absmax, nonfinite (NaN if none).

        Rows of missing parameters must be zero.
        """
        if self.device.type == "cpu":
            return torch.from_numpy(self._host(rows.numpy(), present.numpy()))
        acc = torch.zeros(self.n_layers, N_STATS, dtype=torch.float64, device=self.device)
        acc.index_add_(0, self.layer_of, rows)
        amax = torch.zeros(self.n_layers, dtype=torch.float64, device=self.device)
        amax.scatter_reduce_(0, self.layer_of, rows[:, 1], "amax", include_self=True)
        seen = torch.zeros(self.n_layers, dtype=torch.float64, device=self.device)
        seen.index_add_(0, self.layer_of, present.to(torch.float64))
        out = torch.stack([acc[:, 0].sqrt(), amax, acc[:, 2]])
        # A layer none of whose parameters has a gradient is missing, not zero.
        return torch.where(seen[None, :] > 0, out, torch.nan)

    def _host(self, rows: np.ndarray, present: np.ndarray) -> np.ndarray:
        # The same reduction in numpy: on the host, torch's per-op cost would dominate.
        idx, n = self._layer_of_np, self.n_layers
        out = np.empty((N_STATS, n), dtype=np.float64)
        out[0] = np.sqrt(np.bincount(idx, weights=rows[:, 0], minlength=n))
        if np.isnan(rows[:, 1]).all():  # max-abs not measured (not a full step)
            out[1] = np.nan
        else:
            out[1] = 0.0
            with np.errstate(invalid="ignore"):  # a NaN (not measured) makes its layer's NaN
                np.maximum.at(out[1], idx, rows[:, 1])
        out[2] = np.bincount(idx, weights=rows[:, 2], minlength=n)
        seen = np.bincount(idx, weights=present.astype(np.float64), minlength=n)
        out[:, seen == 0] = np.nan
        return out


def _group_stats(tensors: list[torch.Tensor], norm_only: bool) -> torch.Tensor:
    """Statistics of one planned group (same device; on CPU also same dtype and shape).

    ``norm_only``: sums of squares and non-finite counts only (max-abs NaN), one read per tensor.
    """
    if tensors[0].device.type != "cpu":
        return device_stats(tensors)
    if norm_only:
        return torch.from_numpy(_norm_rows(tensors))
    try:
        return torch.from_numpy(host_block(tensors))
    except RuntimeError:  # a gradient whose shape or dtype differs from its parameter's
        return torch.from_numpy(host_stats(tensors))


def _norm_rows(tensors: Sequence[torch.Tensor]) -> np.ndarray:
    """Rows [n, 3] of host tensors' sums of squares and non-finite counts (max-abs NaN: not measured)."""
    rows = np.full((len(tensors), N_STATS), _NAN)
    rows[:, [SUMSQ, NONFINITE]] = np.array(host_sumsq_many(tensors), dtype=np.float64).reshape(-1, 2)
    return rows


class Plan:
    """How to measure a fixed list of parameters: groups computed once, reused every step."""

    def __init__(self, params: Sequence[torch.Tensor], device: torch.device) -> None:
        self.device = device
        self.groups = plan_groups(params)
        self.index = [torch.tensor(g, dtype=torch.long, device=device) for g in self.groups]
        self.host = device.type == "cpu" and all(p.device.type == "cpu" for p in params)

    @torch.no_grad()
    def stats(
        self, tensors: Sequence[torch.Tensor | None], norm_only: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """rows [P, 3] float64 and present [P] bool on the statistics device (None = missing)."""
        if self.host:
            return self._host_stats(tensors, norm_only)
        rows, present = self._device_stats(tensors, norm_only)
        if norm_only:  # the device path measures the max-abs anyway (it scales by it): not reported
            rows[:, AMAX] = _NAN
        return rows, present

    def _device_stats(
        self, tensors: Sequence[torch.Tensor | None], norm_only: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.zeros(len(tensors), N_STATS, dtype=torch.float64, device=self.device)
        present = torch.zeros(len(tensors), dtype=torch.bool, device=self.device)
        for group, index in zip(self.groups, self.index):
            items = [tensors[i] for i in group]
            if all(t is not None for t in items):
                rows.index_copy_(0, index, _group_stats(items, norm_only).to(self.device, non_blocking=True))  # type: ignore[arg-type]
                present.index_fill_(0, index, True)
                continue
            real = [i for i in group if tensors[i] is not None]  # some have no gradient: rare
            if real:
                sub = torch.tensor(real, dtype=torch.long, device=self.device)
                got = _group_stats([tensors[i] for i in real], norm_only)  # type: ignore[misc]
                rows.index_copy_(0, sub, got.to(self.device, non_blocking=True))
                present.index_fill_(0, sub, True)
        return rows, present

    def _host_stats(
        self, tensors: Sequence[torch.Tensor | None], norm_only: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Everything here is host memory: numpy arrays, no per-op dispatch.
        rows = np.zeros((len(tensors), N_STATS), dtype=np.float64)
        present = np.array([t is not None for t in tensors], dtype=bool)
        if norm_only:  # one fused call for all the small tensors, whatever their shapes
            have = [i for i, t in enumerate(tensors) if t is not None]
            if have:
                rows[have] = _norm_rows([tensors[i] for i in have])  # type: ignore[misc]
            return torch.from_numpy(rows), torch.from_numpy(present)
        for group in self.groups:
            real = [i for i in group if tensors[i] is not None]
            if real:
                rows[real] = _group_stats([tensors[i] for i in real], norm_only).numpy()  # type: ignore[misc]
        return torch.from_numpy(rows), torch.from_numpy(present)


def _scale_rows(rows: torch.Tensor, scale: torch.Tensor | None) -> None:
    """Statistics of ``scale * g`` from those of ``g``, in place (scale > 0)."""
    if scale is None:
        return
    scale = scale.to(rows.device)
    rows[:, 0] *= scale * scale
    rows[:, 1] *= scale


class GradProbe:
    """Measures gradient statistics of every parameter, per layer.

    On host (CPU) tensors large enough to matter, statistics are taken inside backward,
    by a post-accumulate-grad hook, while the gradient is still in cache; the result is
    reused at :meth:`measure` only if ``p.grad`` is still the same tensor, unmodified
    (its version counter is unchanged). Everything else is measured at :meth:`measure`
    with fused ops. Under a multi-process group the hooks are off: gradients are only
    final after the all-reduce that ends backward.

    Under FSDP2, where parameters and gradients are DTensor shards, each rank measures its
    local shards and one collective per recorded step (per measurement) combines them, so
    every rank holds the statistics of the whole tensors.
    """

    def __init__(self, index: LayerIndex, device: torch.device, strategy: str = "auto") -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.index = index
        self.device = device
        self.reduce = LayerReducer(index, device)
        on_ranks = distributed()
        # None on a single process (and under DDP, where every rank holds whole tensors).
        self._shards = (ShardPlan(index.params) or None) if on_ranks else None
        self.plan = Plan([local(p) for p in index.params] if self._shards else index.params, device)
        # parameter -> (gradient, its version, full statistics?, statistics)
        self._cache: dict[int, tuple[torch.Tensor, int, bool, tuple[float, float, float]]] = {}
        self._handles: list[RemovableHandle] = []
        # Off for steps that will not be recorded (every > 1): the hooks then return at once.
        self.armed = True
        # On for full steps (those that also measure weights): the hook takes the gradient's
        # max-abs, and the weight's norm while backward has just read it (dX = dY W) and it is
        # still in cache. Off, it reads each gradient once: sum of squares, non-finite count.
        self.full_armed = False
        self._wcache: dict[int, tuple[int, float]] = {}
        # Only embeddings can have sparse gradients: check just those parameters each step.
        modules = index.modules
        self._sparse = [i for i, layer in enumerate(index.param_layer) if getattr(modules[layer], "sparse", False)]
        self._sparse_set = set(self._sparse)
        self._layer_of = list(index.param_layer)
        if strategy != "fused" and not on_ranks:
            limit = 1 if strategy == "hooks" else LARGE
            for i, p in enumerate(index.params):
                if p.device.type == "cpu" and p.requires_grad and p.numel() >= limit:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._make_hook(i)))

    @property
    def hooked(self) -> int:
        """How many parameters are measured inside backward."""
        return len(self._handles)

    def _make_hook(self, i: int):  # type: ignore[no-untyped-def]
        cache, wcache = self._cache, self._wcache

        def hook(p: torch.Tensor) -> None:
            if not self.armed:
                return
            g = p.grad
            full = self.full_armed
            if g is not None and not g.is_sparse:
                if full:
                    cache[i] = (g, g._version, True, host_stats_one(g))
                else:
                    sumsq, bad = host_sumsq_one(g)
                    cache[i] = (g, g._version, False, (sumsq, _NAN, bad))
            if full:
                wcache[i] = (p._version, host_sumsq_one(p)[0])

        return hook

    @property
    def host_ordinary(self) -> bool:
        """Whether an ordinary step is measured by :meth:`host_norms` (every tensor in host memory, unsharded)."""
        return self._shards is None and self.plan.host

    @torch.no_grad()
    def measure(
        self, hook_scale: torch.Tensor | None = None, step_scale: torch.Tensor | None = None, full: bool = True
    ) -> torch.Tensor:
        """Per-layer gradient statistics now, as float64 [3, L]: norm, absmax, nonfinite.

        ``hook_scale`` multiplies gradients measured inside backward and ``step_scale`` those
        measured now (AMP: the inverse loss scale where a gradient was still scaled). Without
        ``full``, absmax is NaN (not measured) and each gradient is read once; on the host,
        :meth:`host_norms` gives the same numbers faster, and the Watch takes it there.
        """
        grads: list[torch.Tensor | None] = [p.grad for p in self.index.params]
        for i in self._sparse:
            g = grads[i]
            if g is not None and g.is_sparse:
                grads[i] = g.coalesce()._values()
        cached: dict[int, tuple[float, float, float]] = {}
        for i, (g, version, was_full, stats) in self._cache.items():
            if grads[i] is g and g._version == version and (was_full or not full):
                cached[i] = stats if full else (stats[0], _NAN, stats[2])
                grads[i] = None  # measured already
        self._cache.clear()
        rows, present = self._stats(grads, norm_only=not full)
        _scale_rows(rows, step_scale)
        if cached:
            idx = list(cached)
            hooked = torch.from_numpy(np.array([cached[i] for i in idx], dtype=np.float64))
            _scale_rows(hooked, hook_scale)
            if rows.device.type == "cpu":
                rows.numpy()[idx] = hooked.numpy()
                present.numpy()[idx] = True
            else:
                rows[idx] = hooked.to(rows.device)
                present[idx] = True
        return self.reduce(rows, present)

    def host_norms(self, out: np.ndarray, hook_scale: torch.Tensor | None, step_scale: torch.Tensor | None) -> None:
        """An ordinary step's gradient statistics, written into ``out`` (float64 [3, L], absmax NaN).

        The same numbers as :meth:`measure`, in plain Python on floats: right after backward
        every distinct numpy or torch call costs 10-30 us (cold caches; ``torch.no_grad()``
        too, which nothing here needs: it only reads values), a Python loop over the
        parameters a fraction of a microsecond each.
        """
        hook_sq = 1.0 if hook_scale is None else float(hook_scale) ** 2  # AMP: squares scale by its square
        step_sq = 1.0 if step_scale is None else float(step_scale) ** 2
        layer_of, sparse, cache = self._layer_of, self._sparse_set, self._cache
        n = self.reduce.n_layers
        sumsq, bad, seen = [0.0] * n, [0.0] * n, [False] * n
        todo: list[torch.Tensor] = []
        todo_layers: list[int] = []
        for i, p in enumerate(self.index.params):
            g = p.grad
            if g is None:
                continue
            if i in sparse and g.is_sparse:
                g = g.coalesce()._values()
            hit = cache.get(i)
            layer = layer_of[i]
            if hit is not None and hit[0] is g and g._version == hit[1]:  # measured inside backward
                stats = hit[3]
                sumsq[layer] += stats[SUMSQ] * hook_sq
                bad[layer] += stats[NONFINITE]
                seen[layer] = True
            else:
                todo.append(g)
                todo_layers.append(layer)
        cache.clear()
        for layer, (s, b) in zip(todo_layers, host_sumsq_many(todo)):
            sumsq[layer] += s * step_sq
            bad[layer] += b
            seen[layer] = True
        out[0] = [math.sqrt(s) if k else _NAN for s, k in zip(sumsq, seen)]
        out[1] = _NAN
        out[2] = [b if k else _NAN for b, k in zip(bad, seen)]

    @torch.no_grad()
    def measure_weights(self) -> torch.Tensor:
        """Per-layer weight norms now: float64 [L] (in-backward results reused if unchanged)."""
        params = self.index.params
        todo: list[torch.Tensor | None] = list(params)
        cached: dict[int, float] = {}
        for i, (version, sumsq) in self._wcache.items():
            if params[i]._version == version:
                cached[i] = sumsq
                todo[i] = None
        self._wcache.clear()
        rows, present = self._stats(todo, norm_only=True)
        if cached:
            idx = list(cached)
            if rows.device.type == "cpu":
                rows.numpy()[idx, 0] = [cached[i] for i in idx]
                present.numpy()[idx] = True
            else:
                rows[idx, 0] = torch.tensor([cached[i] for i in idx], dtype=torch.float64, device=rows.device)
                present[idx] = True
        return self.reduce(rows, present)[0]

    @torch.no_grad()
    def measure_norms(self, tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """Per-layer L2 norms of per-parameter tensors (weights, updates): float64 [L]."""
        rows, present = self._stats(tensors, norm_only=True)
        return self.reduce(rows, present)[0]

    def measure_update(self, before: Sequence[torch.Tensor], after: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-layer norms of ``before - after`` (an optimizer step's update), float64 [L].

        ``before`` is overwritten with the difference. On the host each pair is subtracted and
        summed in one pass; elsewhere with fused ops.
        """
        if not self.host_ordinary:
            torch._foreach_sub_(list(before), list(after))
            return self.measure_norms(before)
        n = self.reduce.n_layers
        sumsq, seen = [0.0] * n, [False] * n
        for layer, b, a in zip(self._layer_of, before, after):
            sumsq[layer] += host_diff_sumsq(b, a)[0]
            seen[layer] = True
        return torch.tensor([math.sqrt(s) if k else _NAN for s, k in zip(sumsq, seen)], dtype=torch.float64)

    def _stats(
        self, tensors: Sequence[torch.Tensor | None], norm_only: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Plan.stats, with the statistics of sharded tensors combined over their ranks."""
        if self._shards is None:
            return self.plan.stats(tensors, norm_only)
        rows, present = self.plan.stats([None if t is None else local(t) for t in tensors], norm_only)
        packed = torch.cat([rows, present.to(rows.dtype)[:, None]], dim=1)
        self._shards.reduce_rows(packed, _SHARD_OPS)
        return packed[:, :N_STATS].contiguous(), packed[:, N_STATS] > 0

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._cache.clear()
        self._wcache.clear()
