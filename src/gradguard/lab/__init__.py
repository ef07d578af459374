"""The lab: the case studies of vanishing and exploding gradients, reproduced, checked against their sources."""

from __future__ import annotations

from .case import REGISTRY, Case, Context, Outcome, Source, case

__all__ = ["REGISTRY", "Case", "Context", "Outcome", "Source", "case"]
