"""Remedies: the interventions that fix vanishing and exploding gradients."""

from .clip import AutoClip, ClipResult, ZScoreClip, adaptive_clip_grad_, clip_grad_norm_, clip_grad_value_
from .guard import GuardEvent, Localization, NonFiniteGuard, localize

__all__ = [
    "AutoClip",
    "ClipResult",
    "GuardEvent",
    "Localization",
    "NonFiniteGuard",
    "ZScoreClip",
    "adaptive_clip_grad_",
    "clip_grad_norm_",
    "clip_grad_value_",
    "localize",
]
