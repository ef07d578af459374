"""Pure rules that read a Trace and return Findings (no torch hooks, no I/O)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..trace import Trace
from .activations import dead_units, saturated_activation
from .exploding import exploding_gradient
from .finding import KINDS, SEVERITIES, Finding, Fix
from .nonfinite import nonfinite
from .thresholds import Thresholds
from .vanishing import vanishing_gradient

Rule = Callable[[Trace, Thresholds], list[Finding]]
RULES: dict[str, Rule] = {
    "nonfinite": nonfinite,
    "exploding_gradient": exploding_gradient,
    "vanishing_gradient": vanishing_gradient,
    "saturated_activation": saturated_activation,
    "dead_units": dead_units,
}
_RANK = {s: i for i, s in enumerate(SEVERITIES)}


def detect(trace: Trace, thresholds: Thresholds | None = None, **overrides: Any) -> list[Finding]:
    """Run every rule on ``trace``; findings sorted by severity (worst first), then step.

    Thresholds: pass a :class:`Thresholds` or override defaults by keyword,
    e.g. ``detect(trace, vanishing_warning=1e-4)``.
    """
    if not isinstance(trace, Trace):
        raise TypeError(f"detect() expects a gradguard Trace, got {type(trace).__name__}")
    th = (thresholds or Thresholds()).with_overrides(**overrides)
    found = [f for rule in RULES.values() for f in rule(trace, th)]
    return sorted(found, key=lambda f: (-_RANK[f.severity], f.step if f.step is not None else -1))


__all__ = ["KINDS", "RULES", "Finding", "Fix", "Thresholds", "detect"]
