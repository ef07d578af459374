"""Statistics across processes: DTensor shards (FSDP2) and per-rank values made global.

Under FSDP2 (``fully_shard``) parameters and gradients are DTensors: each rank holds a
shard (``Shard`` placement) of every tensor. A statistic of the whole tensor is a
reduction of its shards' statistics over the ranks that hold the shards: sums of squares
and non-finite counts add up, max-abs values take the maximum. Mesh dimensions with a
``Replicate`` placement hold identical copies and are not reduced (no double counting).

Everything here costs nothing without a process group: callers check
:func:`distributed` once, and plain tensors never reach a collective.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

# Rows reduced by reduce_rows: which reduction each column takes.
SUM, MAX = "sum", "max"


def distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_dtensor(t: object) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (the tensor itself for a plain tensor)."""
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]


def shard_groups(t: torch.Tensor) -> tuple[Any, ...]:
    """The process groups over which a DTensor's shard statistics must be reduced.

    One group per mesh dimension it is sharded along; ``()`` for plain tensors and for
    DTensors replicated on every mesh dimension (each rank already holds all of it).
    """
    if not is_dtensor(t):
        return ()
    from torch.distributed.tensor import Replicate, Shard

    mesh = t.device_mesh  # type: ignore[attr-defined]
    groups = []
    for dim, placement in enumerate(t.placements):  # type: ignore[attr-defined]
        if isinstance(placement, Shard):
            groups.append(mesh.get_group(dim))
        elif not isinstance(placement, Replicate):
            raise ValueError(
                f"gradguard cannot measure a DTensor with placement {placement} (a partial value): "
                "redistribute it to Shard or Replicate placements first, as FSDP2 does for gradients."
            )
    return tuple(groups)


class ShardPlan:
    """Which tensors of a fixed list are sharded, grouped by the process groups to reduce over."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        by_groups: dict[tuple[Any, ...], list[int]] = {}
        for i, t in enumerate(tensors):
            groups = shard_groups(t)
            if groups:
                by_groups.setdefault(groups, []).append(i)
        self.parts = [(groups, idx) for groups, idx in by_groups.items()]

    def __bool__(self) -> bool:
        return bool(self.parts)

    def reduce_rows(self, rows: torch.Tensor, ops: Sequence[str]) -> None:
        """Reduce rows [P, k] of per-tensor statistics in place over the shard groups.

        Column j is summed (``SUM``) or maximised (``MAX``) over the ranks. One all-gather
        per process group, whatever the number of tensors; every rank then reduces the
        gathered rows in rank order, so all ranks hold bit-identical results.
        """
        for groups, idx in self.parts:
            index = torch.tensor(idx, dtype=torch.long, device=rows.device)
            part = rows.index_select(0, index)
            for group in groups:
                part = _gather_reduce(part, ops, group)
            rows.index_copy_(0, index, part)


def _all_gather(rows: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Every rank's ``rows`` stacked in rank order: [world, *rows.shape], on every rank."""
    import torch.distributed as dist

    n = dist.get_world_size(group)
    # The concatenated form: gloo accepts no other. all_gather_single is the newer name.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    out = torch.empty((n * rows.shape[0], *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    gather(out, rows.contiguous(), group=group)
    return out.reshape(n, *rows.shape)


def _gather_reduce(part: torch.Tensor, ops: Sequence[str], group: Any) -> torch.Tensor:
    gathered = _all_gather(part, group)
    out = torch.empty_like(part)
    for j, op in enumerate(ops):
        col = gathered[..., j]
        out[:, j] = col.sum(dim=0) if op == SUM else col.amax(dim=0)
    return out


def all_reduce_max_(t: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum over all ranks, in place (no-op without a process group)."""
    import torch.distributed as dist

    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's rows [k, ...] stacked: [world, k, ...], in rank order, on every rank."""
    return _all_gather(rows)
