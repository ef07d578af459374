"""Remedies: the interventions that fix vanishing and exploding gradients."""

from .architecture import (
    InputStandardizer,
    Residual,
    insert_normalization,
    prepend_standardizer,
    residualize,
    swap_activation,
)
from .clip import AutoClip, ClipResult, ZScoreClip, adaptive_clip_grad_, clip_grad_norm_, clip_grad_value_
from .guard import GuardEvent, Localization, NonFiniteGuard, localize
from .init import SCHEMES, init_, lsuv, zero_init_residual_
from .regularize import l1_penalty, l2_penalty

__all__ = [
    "AutoClip",
    "ClipResult",
    "GuardEvent",
    "InputStandardizer",
    "Localization",
    "NonFiniteGuard",
    "Residual",
    "SCHEMES",
    "ZScoreClip",
    "adaptive_clip_grad_",
    "clip_grad_norm_",
    "clip_grad_value_",
    "init_",
    "insert_normalization",
    "l1_penalty",
    "l2_penalty",
    "localize",
    "lsuv",
    "prepend_standardizer",
    "residualize",
    "swap_activation",
    "zero_init_residual_",
]
