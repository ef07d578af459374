"""Options the framework integrations share: ``clip=`` and ``guard=``, checked and applied the same way."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..probe.distributed import distributed
from ..remedy.clip import AutoClip, ClipResult, ZScoreClip, _clip_by_norm, _norms, clip_grad_norm_
from ..remedy.guard import POLICIES
from ..watch import _positive_int

Clip = float | AutoClip | ZScoreClip | Callable[[list[torch.Tensor]], Any]


def watch_options(
    *, every: int, weights_every: int, activations_every: int, flush_every: int, **rest: Any
) -> dict[str, Any]:
    """The keyword arguments a callback passes to :class:`gradguard.Watch`, checked now (at construction).

    Checked when the callback is made, not when training starts (in a worker process, under DDP).
    """
    _positive_int("every", every)
    _positive_int("weights_every", weights_every, allow_zero=True)
    _positive_int("activations_every", activations_every, allow_zero=True)
    _positive_int("flush_every", flush_every)
    sinks = rest.pop("sinks", ())
    return dict(every=every, weights_every=weights_every, activations_every=activations_every,
                flush_every=flush_every, sinks=list(sinks), **rest)


def check_clip(clip: object) -> None:
    """Raise a clear error unless ``clip`` is None, a positive max_norm, a gradguard clipper or a callable."""
    if clip is None or isinstance(clip, (AutoClip, ZScoreClip)):
        return
    if isinstance(clip, (int, float)) and not isinstance(clip, bool):
        if not clip > 0:
            raise ValueError(f"clip as a number is the max_norm of clip_grad_norm_ and must be positive, got {clip!r}")
        return
    if not callable(clip):
        raise TypeError(
            "clip must be a max_norm (a positive float), a gradguard.AutoClip or gradguard.ZScoreClip, or a "
            f"callable taking the list of parameters (like gradguard.clip_grad_norm_); got {type(clip).__name__}"
        )


def guard_policy(guard: object) -> str | None:
    """The NonFiniteGuard policy ``guard=`` asks for: None (off), or one of ``POLICIES``."""
    if guard is False or guard is None:
        return None
    if guard is True:
        return "skip"
    if isinstance(guard, str) and guard in POLICIES:
        return guard
    raise ValueError(f"guard must be True, False or a NonFiniteGuard policy {POLICIES}, got {guard!r}")


Norms = tuple[torch.Tensor, torch.Tensor]  # (each gradient's L2 norm, stacked; their total norm)


def shared_norms(clip: Clip | None, guarded: bool, params: list[torch.Tensor]) -> Norms | None:
    """The gradients' L2 norms, once, for both a guard's check and a clip by the total norm.

    Both would read every gradient for the same numbers: with ``clip=`` a max_norm and a guard,
    the second read (about a third of their cost) is saved. ``None`` where they do not share:
    another clipper, no guard, several processes (each computes on its shards), sparse gradients,
    gradients of several devices or dtypes.
    """
    if not guarded or not isinstance(clip, (int, float)) or distributed():
        return None
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or any(g.layout != torch.strided for g in grads):
        return None
    # _norms stacks them group by group (torch's grouping by device and dtype): that is the
    # parameters' order, which the guard's per-parameter flags need, only for a single group.
    if len({(g.device, g.dtype) for g in grads}) > 1:
        return None
    return _norms(grads, 2.0)


def apply_clip(clip: Clip, params: list[torch.Tensor], norms: Norms | None = None) -> torch.Tensor | None:
    """Clip ``params``' gradients in place with ``clip``; returns the total norm before clipping (a tensor).

    ``norms``: :func:`shared_norms` of the same, unchanged gradients (a max_norm ``clip`` only).
    """
    if isinstance(clip, (int, float)):
        if norms is not None:
            grads = [p.grad for p in params if p.grad is not None]
            return _clip_by_norm(grads, float(clip), 2.0, norms)[0].total_norm
        return clip_grad_norm_(params, float(clip))
    result = clip(params)
    if isinstance(result, ClipResult):
        return result.total_norm
    return result if isinstance(result, torch.Tensor) else None
