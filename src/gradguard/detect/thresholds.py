"""Detector thresholds, with documented defaults; override any of them by keyword."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class Thresholds:
    """When a detector speaks up. Ratios compare per-element gradient RMS between layers.

    - ``window``: how many recent recorded steps a rule looks at (median over them).
    - ``vanishing_warning`` / ``vanishing_error``: a layer's gradient RMS below this
      fraction of the best-flowing layer's (1e-3 = three orders of magnitude).
    - ``exploding_warning`` / ``exploding_error``: a layer's gradient RMS above this
      multiple of the output layer's (growth on the way back through depth).
    - ``growth_warning``: the total gradient norm above this multiple of its median over
      the earlier steps (growth over time), with at least ``growth_min_history`` steps.
    - ``saturation_warning`` / ``saturation_error``: fraction of saturated activations.
    - ``dead_warning`` / ``dead_error``: fraction of dead units.
    """

    window: int = 20
    vanishing_warning: float = 1e-3
    vanishing_error: float = 1e-6
    exploding_warning: float = 1e2
    exploding_error: float = 1e4
    growth_warning: float = 1e3
    growth_min_history: int = 10
    saturation_warning: float = 0.5
    saturation_error: float = 0.9
    dead_warning: float = 0.5
    dead_error: float = 0.9

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int":
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
                need = "a positive integer"
            else:
                # NaN fails every comparison, so it never passes; 0 or inf turn a rule off.
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
                need = "a non-negative number"
            if ok and f.name.startswith(("saturation_", "dead_")) and value > 1:
                ok, need = False, "a fraction in [0, 1]"
            if not ok:
                raise ValueError(f"Thresholds.{f.name} must be {need}, got {value!r}")

    def with_overrides(self, **overrides: Any) -> Thresholds:
        """A copy with some thresholds changed; unknown names raise ``TypeError``."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown threshold(s) {unknown}; known: {sorted(known)}")
        return replace(self, **overrides)
