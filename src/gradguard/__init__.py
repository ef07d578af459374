"""gradguard: detect, explain and fix vanishing and exploding gradients in PyTorch training."""

from __future__ import annotations

__version__ = "0.1.0"

from . import theory
from .detect import Finding, Fix, Thresholds, detect
from .diagnosis import Diagnosis, diagnose
from .record import StoreError, load, load_findings
from .remedy import (
    AutoClip,
    ClipResult,
    InputStandardizer,
    NonFiniteGuard,
    ZScoreClip,
    adaptive_clip_grad_,
    clip_grad_norm_,
    clip_grad_value_,
    init_,
    insert_normalization,
    l1_penalty,
    l2_penalty,
    localize,
    lsuv,
    prepend_standardizer,
    residualize,
    swap_activation,
    zero_init_residual_,
)
from .trace import METRICS, Trace
from .watch import Watch, watch

__all__ = [
    "Diagnosis",
    "diagnose",
    "METRICS",
    "AutoClip",
    "ClipResult",
    "InputStandardizer",
    "prepend_standardizer",
    "NonFiniteGuard",
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
    "residualize",
    "swap_activation",
    "zero_init_residual_",
    "Finding",
    "Fix",
    "StoreError",
    "Thresholds",
    "Trace",
    "Watch",
    "__version__",
    "detect",
    "load",
    "load_findings",
    "theory",
    "watch",
]
