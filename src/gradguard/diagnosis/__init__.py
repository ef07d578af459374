"""diagnose: name the layer, the cause and the fix, predict it from theory, and measure which fix works."""

from __future__ import annotations

from .run import Diagnosis, diagnose
from .whatif import FIXES, FixResult

__all__ = ["FIXES", "Diagnosis", "FixResult", "diagnose"]
